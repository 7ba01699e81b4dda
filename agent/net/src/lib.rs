//! The network: a libp2p peer (TCP + noise + yamux, identify, mDNS, request-response on
//! the market and activity protocols; Kademlia, gossipsub, AutoNAT, circuit relay v2 and
//! DCUtR for discovery beyond one LAN) and the messages it carries.
//!
//! Shape (as in rust-libp2p's file-sharing example): [`new`] builds the swarm and returns
//! a cloneable [`Client`] handle, the receiver of [`Inbound`] requests, and the
//! [`EventLoop`] that owns the swarm. The caller spawns [`EventLoop::run`]; everything
//! else talks to it over channels, so no lock guards the swarm and the loop never waits
//! on the application (a full inbound queue is answered `busy` at once).
//!
//! See `docs/network.md` for the protocols, limits and timeouts.
//!
//! Beside the peer: [`codes`], the stable reason codes every answer on the wire carries,
//! [`receipt`], the signed receipt a terminated job's answer holds, and [`offer`], the
//! signed offers providers publish and the bounded cache every peer keeps of them.
#![forbid(unsafe_code)]

mod behaviour;
mod client;
mod codec;
pub mod codes;
mod event_loop;
pub mod gossip_guard;
mod identity;
mod inbound;
pub mod offer;
pub mod receipt;
pub mod wire;

use std::path::PathBuf;
use std::time::Duration;

use libp2p::request_response::OutboundFailure;

use crate::codes::Code;
use tokio::sync::mpsc;

pub use client::{Client, GossipStanding};
pub use event_loop::EventLoop;
pub use identity::load_or_create_identity;
pub use inbound::{Inbound, InboundRequest, Responder, Response};
/// Re-exported so callers need not name libp2p themselves.
pub use libp2p::{identity::Keypair, Multiaddr, PeerId};

/// How the peer behaves; [`NetConfig::default`] suits a daemon on a LAN.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Announce and discover peers on the local network with mDNS. Tests and daemons that
    /// only use loopback turn it off (it needs a multicast-capable interface).
    pub mdns: bool,
    /// How long a market request may take, end to end (both as requestor and server).
    pub market_timeout: Duration,
    /// How long an activity request may take: creating a job fetches an image and boots a
    /// VM, so this is minutes, not seconds.
    pub activity_timeout: Duration,
    /// A connection with no open stream is closed after this long; requests redial.
    pub idle_connection_timeout: Duration,
    /// Inbound requests waiting for the application; beyond this they are answered `busy`.
    pub inbound_queue: usize,
    /// Serve as a circuit relay v2 (and a DHT server from the start) for peers behind NAT.
    /// Only for a publicly reachable peer whose operator accepts to carry others' traffic.
    pub relay_server: bool,
    /// Longest a relayed connection may last (relay server side).
    pub relay_circuit_duration: Duration,
    /// Most bytes a relayed connection may carry (relay server side).
    pub relay_circuit_bytes: u64,
    /// AutoNAT's first probe after start.
    pub autonat_boot_delay: Duration,
    /// AutoNAT's next probe while reachability is unknown or not yet confident.
    pub autonat_retry_interval: Duration,
    /// AutoNAT only counts global addresses (true on the internet). Turn it off where every
    /// peer has a private or documentation address (a test network, one organisation's
    /// routed LANs).
    pub only_global_ips: bool,
    /// How long a published offer is valid; it is re-published well before.
    pub offer_ttl: Duration,
    /// A provider re-publishes its offer at least this often (and at once when its
    /// addresses change).
    pub offer_republish: Duration,
    /// Bounds of the offer cache and of gossip from one peer.
    pub offer_limits: offer::OfferLimits,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            mdns: true,
            market_timeout: Duration::from_secs(60),
            activity_timeout: Duration::from_secs(10 * 60),
            idle_connection_timeout: Duration::from_secs(60),
            inbound_queue: 64,
            relay_server: false,
            relay_circuit_duration: Duration::from_secs(30 * 60),
            relay_circuit_bytes: 256 << 20,
            autonat_boot_delay: Duration::from_secs(5),
            autonat_retry_interval: Duration::from_secs(30),
            only_global_ips: true,
            offer_ttl: Duration::from_secs(10 * 60),
            offer_republish: Duration::from_secs(2 * 60),
            offer_limits: offer::OfferLimits::default(),
        }
    }
}

/// Reason code sent when the inbound queue is full.
pub const REASON_BUSY: Code = Code::Busy;
/// Reason code sent when no application is taking inbound requests any more.
pub const REASON_UNAVAILABLE: Code = Code::Unavailable;
/// Reason code sent in place of a response larger than [`wire::MAX_RESPONSE_BYTES`].
pub const REASON_RESPONSE_TOO_LARGE: Code = Code::ResponseTooLarge;

/// Everything that can fail in the network layer, each saying what failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot {action} identity key {path}: {source}")]
    IdentityIo {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "identity key {path} has mode {mode:03o}: group or others have access to it, and \
         whoever holds it can impersonate this provider; run `chmod 600 {path}` if no one \
         else could have copied it, otherwise move it away so a new identity is created"
    )]
    IdentityPermissions { path: PathBuf, mode: u32 },
    #[error(
        "identity key {path} is not a protobuf-encoded ed25519 keypair ({detail}); restore \
         it from a backup, or move it away so a new identity (with a new peer id) is created"
    )]
    IdentityMalformed { path: PathBuf, detail: String },
    #[error("cannot set up the TCP + noise + yamux transport: {0}")]
    Transport(String),
    #[error("cannot start mDNS discovery (turn it off with `mdns: false`): {0}")]
    Mdns(std::io::Error),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("address {addr} does not end in /p2p/<peer id>, so the peer to expect is unknown")]
    AddressWithoutPeerId { addr: Multiaddr },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("{protocol} request to {peer} failed: {failure}")]
    Request {
        protocol: &'static str,
        peer: PeerId,
        #[source]
        failure: OutboundFailure,
    },
    #[error("{protocol} request is {size} bytes, more than the {max} a peer accepts")]
    RequestTooLarge {
        protocol: &'static str,
        size: u64,
        max: u64,
    },
    #[error(
        "{protocol} response is {size} bytes, more than the {max} a requestor accepts; \
         the requestor was sent a `response-too-large` error instead"
    )]
    ResponseTooLarge {
        protocol: &'static str,
        size: u64,
        max: u64,
    },
    #[error("a {got} response cannot answer a {expected} request")]
    WrongResponse {
        expected: &'static str,
        got: &'static str,
    },
    #[error(
        "the {protocol} request no longer waits for an answer (it timed out, or the \
         network stopped)"
    )]
    NotWaiting { protocol: &'static str },
    #[error("cannot encode a {protocol} message as JSON: {source}")]
    Encode {
        protocol: &'static str,
        source: serde_json::Error,
    },
    #[error("the network event loop has stopped")]
    Stopped,
}

/// Builds the swarm for `keypair`: the [`Client`] handle, the queue of [`Inbound`]
/// requests the application must answer, and the [`EventLoop`] to spawn.
///
/// Nothing listens yet: call [`Client::listen`] once the loop runs.
pub fn new(
    keypair: Keypair,
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<Inbound>, EventLoop), NetError> {
    let local_peer_id = keypair.public().to_peer_id();
    let swarm = behaviour::build_swarm(keypair.clone(), &config)?;
    // Commands are small and answered quickly; a modest bound only throttles a flood of
    // calls from the application, it never blocks the loop.
    let (command_tx, command_rx) = mpsc::channel(64);
    let (inbound_tx, inbound_rx) = mpsc::channel(config.inbound_queue.max(1));
    let client = Client::new(command_tx, local_peer_id);
    let event_loop = EventLoop::new(swarm, keypair, command_rx, inbound_tx, &config);
    Ok((client, inbound_rx, event_loop))
}

/// Serialised size of `value` as the JSON codec writes it, without keeping the bytes.
pub(crate) fn encoded_len<T: serde::Serialize>(
    protocol: &'static str,
    value: &T,
) -> Result<u64, NetError> {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)
        .map_err(|source| NetError::Encode { protocol, source })?;
    Ok(count.0)
}
