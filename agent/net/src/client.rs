//! [`Client`]: the cloneable handle the application uses to drive the event loop.

use std::collections::BTreeMap;

use libp2p::{Multiaddr, PeerId};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::offer::VerifiedOffer;

use super::wire::{
    ActivityRequest, ActivityResponse, MarketRequest, MarketResponse, ACTIVITY_PROTOCOL,
    MARKET_PROTOCOL, MAX_REQUEST_BYTES,
};
use super::{encoded_len, NetError};

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

/// What a [`Client`] asks the event loop to do; each carries where to send the answer.
#[derive(Debug)]
pub(crate) enum Command {
    Listen {
        addr: Multiaddr,
        reply: Reply<Multiaddr>,
    },
    ListenAddrs {
        reply: Reply<Vec<Multiaddr>>,
    },
    Dial {
        peer: PeerId,
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Market {
        peer: PeerId,
        request: MarketRequest,
        reply: Reply<MarketResponse>,
    },
    Activity {
        peer: PeerId,
        request: ActivityRequest,
        reply: Reply<ActivityResponse>,
    },
    Discovered {
        reply: Reply<Vec<(PeerId, Vec<Multiaddr>)>>,
    },
    Bootstrap {
        peer: PeerId,
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    SetOffer {
        properties: BTreeMap<String, Value>,
        constraints: String,
    },
    Offers {
        reply: Reply<Vec<VerifiedOffer>>,
    },
    FindProviders {
        runtime: String,
    },
    Reachability {
        reply: Reply<Reachability>,
    },
    GossipStanding {
        reply: Reply<GossipStanding>,
    },
}

/// How offer gossip has gone on this peer: what it checked and dropped, and how it
/// scores the peers that forward to it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GossipStanding {
    /// Gossiped offers decoded and verified (each costs a signature check).
    pub verified: u64,
    /// Gossiped offers dropped unverified: their forwarding peer was over its rate.
    pub over_rate: u64,
    /// Gossiped offers refused as invalid (`Reject`: the forwarding peer is penalised).
    pub rejected: u64,
    /// Peers banned for flooding (connections closed and refused for a while).
    pub banned: Vec<PeerId>,
    /// gossipsub's score of each connected gossip peer, sorted by peer id.
    pub scores: Vec<(PeerId, f64)>,
}

/// What this peer knows about how others can reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    /// AutoNAT's verdict: `public`, `private` or `unknown`.
    pub nat: &'static str,
    /// Addresses confirmed reachable from outside, and relayed (`/p2p-circuit`) ones.
    pub addresses: Vec<Multiaddr>,
    /// Relays holding a reservation for this peer.
    pub relays: Vec<PeerId>,
}

/// A handle on the network. Cheap to clone; every method fails with
/// [`NetError::Stopped`] once the event loop has ended.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

impl Client {
    pub(crate) fn new(commands: mpsc::Sender<Command>, local_peer_id: PeerId) -> Self {
        Self {
            commands,
            local_peer_id,
        }
    }

    /// This peer's id (derived from the identity key).
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Starts listening on `addr` (e.g. `/ip4/0.0.0.0/tcp/0`) and returns the first
    /// address actually bound, with the real port.
    pub async fn listen(&self, addr: Multiaddr) -> Result<Multiaddr, NetError> {
        self.ask(|reply| Command::Listen { addr, reply }).await
    }

    /// Every address this peer listens on now.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Connects to `addr`, which must end in `/p2p/<peer id>`, and remembers the address
    /// so later requests can redial after the connection idles out. Returns the peer id.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        let peer = peer_of(&addr)?;
        self.ask(|reply| Command::Dial { peer, addr, reply }).await
    }

    /// Remembers `addr` for `peer` without connecting: the next request to `peer` dials it.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetError> {
        self.commands
            .send(Command::AddAddress { peer, addr })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Sends a market request and waits for the response (at most the market timeout).
    /// Dials `peer` if needed, with addresses from [`Client::dial`],
    /// [`Client::add_address`] or mDNS.
    pub async fn market(
        &self,
        peer: PeerId,
        request: MarketRequest,
    ) -> Result<MarketResponse, NetError> {
        check_request_size(MARKET_PROTOCOL, &request)?;
        self.ask(|reply| Command::Market {
            peer,
            request,
            reply,
        })
        .await
    }

    /// Sends an activity request and waits for the response (at most the activity
    /// timeout).
    pub async fn activity(
        &self,
        peer: PeerId,
        request: ActivityRequest,
    ) -> Result<ActivityResponse, NetError> {
        check_request_size(ACTIVITY_PROTOCOL, &request)?;
        self.ask(|reply| Command::Activity {
            peer,
            request,
            reply,
        })
        .await
    }

    /// Peers mDNS has found and not yet expired, with their addresses, sorted by peer id.
    pub async fn discovered(&self) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, NetError> {
        self.ask(|reply| Command::Discovered { reply }).await
    }

    /// Connects to a bootstrap peer (`addr` ends in `/p2p/<peer id>`), adds it to the DHT's
    /// routing table, and starts a DHT bootstrap. A bootstrap peer that is a relay is used
    /// for a reservation when AutoNAT finds this peer unreachable.
    pub async fn bootstrap(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        let peer = peer_of(&addr)?;
        self.ask(|reply| Command::Bootstrap { peer, addr, reply })
            .await
    }

    /// Sets the offer this peer publishes (signed with its identity key, with its current
    /// addresses, on gossipsub and in the DHT), re-published before it expires and when
    /// the addresses change. Also advertises this peer in the DHT as a provider of the
    /// offer's `golem.runtime.name`.
    pub async fn set_offer(
        &self,
        properties: BTreeMap<String, Value>,
        constraints: String,
    ) -> Result<(), NetError> {
        self.commands
            .send(Command::SetOffer {
                properties,
                constraints,
            })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// The verified, unexpired offers this peer has received, sorted by provider id.
    pub async fn offers(&self) -> Result<Vec<VerifiedOffer>, NetError> {
        self.ask(|reply| Command::Offers { reply }).await
    }

    /// Asks the DHT for the providers of `runtime` (e.g. `vm`) and fetches each one's
    /// offer record into the cache (see [`Client::offers`]). Returns at once.
    pub async fn find_providers(&self, runtime: &str) -> Result<(), NetError> {
        self.commands
            .send(Command::FindProviders {
                runtime: runtime.to_string(),
            })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// AutoNAT's verdict, the addresses others can use, and the relays in use.
    pub async fn reachability(&self) -> Result<Reachability, NetError> {
        self.ask(|reply| Command::Reachability { reply }).await
    }

    /// What offer gossip cost this peer and how it scores its gossip peers.
    pub async fn gossip_standing(&self) -> Result<GossipStanding, NetError> {
        self.ask(|reply| Command::GossipStanding { reply }).await
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }
}

/// The peer id an address names in its final `/p2p/` component.
pub(crate) fn peer_of(addr: &Multiaddr) -> Result<PeerId, NetError> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Ok(peer),
        _ => Err(NetError::AddressWithoutPeerId { addr: addr.clone() }),
    }
}

/// Refuses locally what the peer would refuse anyway, with a clearer error than the
/// remote's decode failure.
fn check_request_size<T: serde::Serialize>(
    protocol: &'static str,
    request: &T,
) -> Result<(), NetError> {
    let size = encoded_len(protocol, request)?;
    if size > MAX_REQUEST_BYTES {
        return Err(NetError::RequestTooLarge {
            protocol,
            size,
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}
