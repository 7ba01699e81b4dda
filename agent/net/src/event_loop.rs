//! [`EventLoop`]: owns the swarm, runs the commands [`Client`](super::Client)s send, and
//! hands inbound requests to the application.
//!
//! The loop never awaits the application: inbound requests go out with `try_send` (a full
//! queue is answered `busy` on the spot), and answers come back through per-request
//! oneshots polled alongside the swarm.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::client::Command;
use super::inbound::{Inbound, InboundRequest, Kind, Responder, Response};
use super::wire::{ActivityResponse, MarketResponse, Reason, ACTIVITY_PROTOCOL, MARKET_PROTOCOL};
use super::{NetConfig, NetError, REASON_BUSY, REASON_UNAVAILABLE};

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

/// Where the answer to an inbound request must go, by protocol.
enum Channel {
    Market(ResponseChannel<MarketResponse>),
    Activity(ResponseChannel<ActivityResponse>),
}

impl Channel {
    fn kind(&self) -> Kind {
        match self {
            Channel::Market(_) => Kind::Market,
            Channel::Activity(_) => Kind::Activity,
        }
    }
}

/// An inbound request handed to the application, resolved when it answers, drops the
/// responder, or the request's timeout passes (`None` in the last two cases).
type Answer = BoxFuture<'static, (PeerId, Option<Response>, Channel)>;

/// Owns the swarm; spawn [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    market_timeout: Duration,
    activity_timeout: Duration,
    pending_listen: HashMap<ListenerId, (Multiaddr, Reply<Multiaddr>)>,
    pending_dial: HashMap<ConnectionId, (Multiaddr, Reply<PeerId>)>,
    pending_market: HashMap<OutboundRequestId, Reply<MarketResponse>>,
    pending_activity: HashMap<OutboundRequestId, Reply<ActivityResponse>>,
    answers: FuturesUnordered<Answer>,
    discovered: HashMap<PeerId, Vec<Multiaddr>>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        inbound: mpsc::Sender<Inbound>,
        config: &NetConfig,
    ) -> Self {
        Self {
            swarm,
            commands,
            inbound,
            market_timeout: config.market_timeout,
            activity_timeout: config.activity_timeout,
            pending_listen: HashMap::new(),
            pending_dial: HashMap::new(),
            pending_market: HashMap::new(),
            pending_activity: HashMap::new(),
            answers: FuturesUnordered::new(),
            discovered: HashMap::new(),
        }
    }

    /// Runs until nobody can use the network any more: every [`Client`](super::Client) is
    /// dropped and so is the inbound receiver. (A daemon that only serves may drop its
    /// clients; a requestor that only asks may drop the receiver, and inbound requests are
    /// then answered `unavailable`.)
    pub async fn run(mut self) {
        let mut commands_open = true;
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command),
                    None => {
                        commands_open = false;
                        if self.inbound.is_closed() {
                            break;
                        }
                    }
                },
                Some((peer, answer, channel)) = self.answers.next() => {
                    self.on_answer(peer, answer, channel)
                }
                () = self.inbound.closed(), if !commands_open => break,
            }
        }
        tracing::debug!("network event loop stopped: no client and no inbound receiver left");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.pending_listen.insert(id, (addr, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(NetError::Listen {
                        addr,
                        reason: e.to_string(),
                    }));
                }
            },
            Command::ListenAddrs { reply } => {
                let _ = reply.send(Ok(self.swarm.listeners().cloned().collect()));
            }
            Command::Dial { peer, addr, reply } => self.dial(peer, addr, reply),
            Command::AddAddress { peer, addr } => self.swarm.add_peer_address(peer, addr),
            Command::Market {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .market
                    .send_request(&peer, request);
                self.pending_market.insert(id, reply);
            }
            Command::Activity {
                peer,
                request,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .activity
                    .send_request(&peer, request);
                self.pending_activity.insert(id, reply);
            }
            Command::Discovered { reply } => {
                let mut peers: Vec<_> = self
                    .discovered
                    .iter()
                    .map(|(peer, addrs)| (*peer, addrs.clone()))
                    .collect();
                peers.sort_by_key(|a| a.0);
                let _ = reply.send(Ok(peers));
            }
        }
    }

    fn dial(&mut self, peer: PeerId, addr: Multiaddr, reply: Reply<PeerId>) {
        // Kept so that requests can redial once this connection idles out.
        self.swarm.add_peer_address(peer, addr.clone());
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(peer));
            return;
        }
        // `Always`: with the default condition a dial already under way (started by a
        // request) would make this one fail instead of waiting; a second attempt is cheap.
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr.clone()])
            .condition(PeerCondition::Always)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dial.insert(id, (addr, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(NetError::Dial {
                    addr,
                    reason: e.to_string(),
                }));
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Market(event)) => {
                if let Some((peer, request, channel)) =
                    on_rr_event(MARKET_PROTOCOL, event, &mut self.pending_market)
                {
                    self.deliver(
                        peer,
                        InboundRequest::Market(request),
                        Channel::Market(channel),
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Activity(event)) => {
                if let Some((peer, request, channel)) =
                    on_rr_event(ACTIVITY_PROTOCOL, event, &mut self.pending_activity)
                {
                    self.deliver(
                        peer,
                        InboundRequest::Activity(request),
                        Channel::Activity(channel),
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(event)) => self.on_mdns(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => match event {
                identify::Event::Received { peer_id, info, .. } => tracing::debug!(
                    peer = %peer_id,
                    agent = %info.agent_version,
                    protocol = %info.protocol_version,
                    "identified peer"
                ),
                identify::Event::Error { peer_id, error, .. } => {
                    tracing::debug!(peer = %peer_id, %error, "identify failed")
                }
                _ => {}
            },
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, "listening");
                if let Some((_, reply)) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let reason = match reason {
                    Ok(()) => "the listener closed".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(%reason, "listener closed");
                if let Some((addr, reply)) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Err(NetError::Listen { addr, reason }));
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                tracing::warn!(%error, "listener error");
                if let Some((addr, reply)) = self.pending_listen.remove(&listener_id) {
                    let _ = reply.send(Err(NetError::Listen {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, address = %endpoint.get_remote_address(), "connected");
                if let Some((_, reply)) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
                if let Some((addr, reply)) = self.pending_dial.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                // A peer that failed the handshake (not noise, wrong key, garbage): its
                // connection is dropped, nothing else is affected.
                tracing::warn!(from = %send_back_addr, %error, "incoming connection failed")
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed")
            }
            _ => {}
        }
    }

    fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(found) => {
                for (peer, addr) in found {
                    tracing::debug!(%peer, %addr, "mDNS discovered");
                    // So that a request to a discovered peer can dial it.
                    self.swarm.add_peer_address(peer, addr.clone());
                    let addrs = self.discovered.entry(peer).or_default();
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
            mdns::Event::Expired(gone) => {
                for (peer, addr) in gone {
                    tracing::debug!(%peer, %addr, "mDNS expired");
                    if let Some(addrs) = self.discovered.get_mut(&peer) {
                        addrs.retain(|a| *a != addr);
                        if addrs.is_empty() {
                            self.discovered.remove(&peer);
                        }
                    }
                }
            }
        }
    }

    /// Hands an inbound request to the application without waiting: a full queue gets
    /// `busy`, a closed one `unavailable`.
    fn deliver(&mut self, peer: PeerId, request: InboundRequest, channel: Channel) {
        let kind = channel.kind();
        let (tx, rx) = oneshot::channel();
        let inbound = Inbound {
            peer,
            request,
            responder: Responder { kind, tx },
        };
        match self.inbound.try_send(inbound) {
            Ok(()) => {
                // Past the request timeout libp2p has given up on the stream anyway;
                // bounding the wait keeps a forgotten responder from pinning the channel.
                let wait = match kind {
                    Kind::Market => self.market_timeout,
                    Kind::Activity => self.activity_timeout,
                };
                self.answers.push(Box::pin(async move {
                    let answer = tokio::time::timeout(wait, rx)
                        .await
                        .ok()
                        .and_then(Result::ok);
                    (peer, answer, channel)
                }));
            }
            Err(TrySendError::Full(_)) => {
                tracing::warn!(%peer, protocol = kind.protocol(), "inbound queue full: answering busy");
                let reason = Reason::new(
                    REASON_BUSY,
                    "the provider has too many requests waiting; retry later",
                );
                self.send(peer, channel, Response::error(kind, reason));
            }
            Err(TrySendError::Closed(_)) => {
                tracing::warn!(%peer, protocol = kind.protocol(), "nobody takes inbound requests: answering unavailable");
                let reason = Reason::new(
                    REASON_UNAVAILABLE,
                    "this peer does not serve requests (it is shutting down, or only a requestor)",
                );
                self.send(peer, channel, Response::error(kind, reason));
            }
        }
    }

    fn on_answer(&mut self, peer: PeerId, answer: Option<Response>, channel: Channel) {
        match answer {
            Some(response) => self.send(peer, channel, response),
            // Dropping the channel closes the stream without a response, which the
            // requestor sees as a failed request at once instead of waiting its timeout.
            None => tracing::warn!(
                %peer,
                protocol = channel.kind().protocol(),
                "the application dropped an inbound request unanswered (or did not answer in time)"
            ),
        }
    }

    fn send(&mut self, peer: PeerId, channel: Channel, response: Response) {
        let protocol = channel.kind().protocol();
        let sent = match (channel, response) {
            (Channel::Market(ch), Response::Market(r)) => self
                .swarm
                .behaviour_mut()
                .market
                .send_response(ch, r)
                .is_ok(),
            (Channel::Activity(ch), Response::Activity(r)) => self
                .swarm
                .behaviour_mut()
                .activity
                .send_response(ch, r)
                .is_ok(),
            // `Responder::respond` refuses a response of the other protocol before it gets
            // here; dropping the channel fails the request rather than send nonsense.
            (_, response) => {
                tracing::error!(%peer, protocol, got = response.kind().protocol(), "response of the wrong protocol dropped");
                return;
            }
        };
        if !sent {
            tracing::warn!(%peer, protocol, "response not sent: the request timed out or its connection closed");
        }
    }
}

/// The part of a request-response event common to both protocols: outbound results go to
/// their waiting callers, failures are logged, and an inbound request is returned for
/// delivery.
fn on_rr_event<Req, Resp>(
    protocol: &'static str,
    event: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, Reply<Resp>>,
) -> Option<(PeerId, Req, ResponseChannel<Resp>)> {
    match event {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => return Some((peer, request, channel)),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(reply) = pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            tracing::debug!(%peer, protocol, %error, "outbound request failed");
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(NetError::Request {
                    protocol,
                    peer,
                    failure: error,
                }));
            }
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            // Malformed or oversized JSON, an unknown message type, a stream that timed
            // out or was cut: that one request is dropped, the loop carries on.
            tracing::warn!(%peer, protocol, %error, "inbound request failed");
        }
        request_response::Event::ResponseSent { .. } => {}
    }
    None
}
