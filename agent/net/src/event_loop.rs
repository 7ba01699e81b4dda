//! [`EventLoop`]: owns the swarm, runs the commands [`Client`](super::Client)s send, and
//! hands inbound requests to the application.
//!
//! The loop never awaits the application: inbound requests go out with `try_send` (a full
//! queue is answered `busy` on the spot), and answers come back through per-request
//! oneshots polled alongside the swarm.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{autonat, dcutr, gossipsub, identify, kad, mdns, relay, Multiaddr, PeerId, Swarm};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::behaviour::{Behaviour, BehaviourEvent, GRAYLIST_THRESHOLD};
use super::client::{Command, GossipStanding, Reachability};
use super::gossip_guard::{ForwarderGuard, Gate};
use super::inbound::{Inbound, InboundRequest, Kind, Responder, Response};
use super::offer::{Admission, OfferBody, OfferCache, SignedOffer, OFFER_TOPIC, OFFER_VERSION};
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
    discovery: Discovery,
}

/// The state of discovery beyond one LAN: bootstrap peers, relays, reachability, this
/// peer's own offer and the cache of others'.
struct Discovery {
    keypair: Keypair,
    cache: OfferCache,
    topic: gossipsub::IdentTopic,
    bootstrap: HashMap<PeerId, Multiaddr>,
    /// Bootstrap peers that identified as relays (they speak the hop protocol).
    relays: HashSet<PeerId>,
    /// Relays a reservation was asked of, and those that granted one.
    reserving: HashMap<PeerId, ListenerId>,
    reserved: HashSet<PeerId>,
    /// A refused or lost reservation is asked again, at most this often.
    next_reservation_try: Instant,
    nat: autonat::NatStatus,
    /// Properties and constraints of this peer's offer, if it publishes one.
    offer: Option<(BTreeMap<String, Value>, String)>,
    /// Something in the offer changed (addresses): publish at the next tick.
    dirty: bool,
    last_published: Option<Instant>,
    provided: bool,
    offer_ttl: Duration,
    republish: Duration,
    /// Offer records already asked for, so a repeated provider lookup does not refetch.
    fetched: HashSet<PeerId>,
    relay_server: bool,
    /// The per-forwarding-peer bound on gossip, consulted before an offer is decoded.
    guard: ForwarderGuard,
    /// Counters for [`GossipStanding`].
    verified: u64,
    over_rate: u64,
    rejected: u64,
}

/// The DHT record key of `peer`'s offer.
fn offer_key(peer: &PeerId) -> kad::RecordKey {
    let mut key = b"/provider/offer/".to_vec();
    key.extend_from_slice(&peer.to_bytes());
    kad::RecordKey::new(&key)
}

/// The DHT key providers of `runtime` advertise under.
fn runtime_key(runtime: &str) -> kad::RecordKey {
    kad::RecordKey::new(&format!("/provider/runtime/{runtime}"))
}

/// Publishing again sooner than this is pointless: receivers rate-limit each provider.
const MIN_REPUBLISH: Duration = Duration::from_secs(2);

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        keypair: Keypair,
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
            discovery: Discovery {
                keypair,
                cache: OfferCache::new(config.offer_limits.clone()),
                topic: gossipsub::IdentTopic::new(OFFER_TOPIC),
                bootstrap: HashMap::new(),
                relays: HashSet::new(),
                reserving: HashMap::new(),
                reserved: HashSet::new(),
                next_reservation_try: Instant::now(),
                nat: autonat::NatStatus::Unknown,
                offer: None,
                dirty: false,
                last_published: None,
                provided: false,
                offer_ttl: config.offer_ttl,
                republish: config.offer_republish,
                fetched: HashSet::new(),
                relay_server: config.relay_server,
                guard: ForwarderGuard::new(config.offer_limits.forwarders.clone()),
                verified: 0,
                over_rate: 0,
                rejected: 0,
            },
        }
    }

    /// Runs until nobody can use the network any more: every [`Client`](super::Client) is
    /// dropped and so is the inbound receiver. (A daemon that only serves may drop its
    /// clients; a requestor that only asks may drop the receiver, and inbound requests are
    /// then answered `unavailable`.)
    pub async fn run(mut self) {
        let mut commands_open = true;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
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
            Command::Bootstrap { peer, addr, reply } => {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
                self.discovery.bootstrap.insert(peer, addr.clone());
                self.dial(peer, addr, reply);
                if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                    tracing::debug!(%e, "DHT bootstrap not started");
                }
            }
            Command::SetOffer {
                properties,
                constraints,
            } => {
                self.discovery.offer = Some((properties, constraints));
                self.discovery.dirty = true;
                self.discovery.provided = false;
                self.on_tick();
            }
            Command::Offers { reply } => {
                let now = chrono::Utc::now();
                self.discovery.cache.purge(now);
                let _ = reply.send(Ok(self.discovery.cache.snapshot(now)));
            }
            Command::FindProviders { runtime } => {
                self.discovery.fetched.clear();
                self.swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(runtime_key(&runtime));
            }
            Command::GossipStanding { reply } => {
                let gossipsub = &self.swarm.behaviour().gossipsub;
                let mut scores: Vec<(PeerId, f64)> = gossipsub
                    .all_peers()
                    .filter_map(|(p, _)| gossipsub.peer_score(p).map(|s| (*p, s)))
                    .collect();
                scores.sort_by_key(|a| a.0);
                let _ = reply.send(Ok(GossipStanding {
                    verified: self.discovery.verified,
                    over_rate: self.discovery.over_rate,
                    rejected: self.discovery.rejected,
                    banned: self.discovery.guard.banned(),
                    scores,
                }));
            }
            Command::Reachability { reply } => {
                let mut relays: Vec<_> = self.discovery.reserved.iter().copied().collect();
                relays.sort();
                let _ = reply.send(Ok(Reachability {
                    nat: nat_name(&self.discovery.nat),
                    addresses: self.offer_addresses(),
                    relays,
                }));
            }
        }
    }

    /// Addresses others can dial this peer at: confirmed external ones, relayed ones, and
    /// unless AutoNAT found it behind NAT, its routable listen addresses.
    fn offer_addresses(&self) -> Vec<Multiaddr> {
        let me = *self.swarm.local_peer_id();
        let mut out: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        let private = matches!(self.discovery.nat, autonat::NatStatus::Private);
        for addr in self.swarm.listeners() {
            if relayed(addr) || (!private && routable(addr)) {
                out.push(addr.clone());
            }
        }
        if out.is_empty() {
            // Nothing known to be reachable from elsewhere yet: the listen addresses still
            // serve peers on this host or link until AutoNAT has spoken.
            out.extend(self.swarm.listeners().filter(|a| !unspecified(a)).cloned());
        }
        let mut seen = HashSet::new();
        out.into_iter()
            .map(|a| {
                if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                    a
                } else {
                    a.with(Protocol::P2p(me))
                }
            })
            .filter(|a| seen.insert(a.clone()))
            .take(super::offer::MAX_OFFER_ADDRESSES)
            .collect()
    }

    /// Periodic work: ask again for reservations a relay refused or dropped; publish this
    /// peer's offer when it changed or is due.
    fn on_tick(&mut self) {
        let now = Instant::now();
        let (scores, unbanned) = self.discovery.guard.tick(now);
        let behaviour = self.swarm.behaviour_mut();
        for (peer, score) in scores {
            behaviour.gossipsub.set_application_score(&peer, score);
        }
        for peer in unbanned {
            tracing::info!(%peer, "ban for flooding over: the peer may connect again");
            behaviour.blocked.unblock_peer(peer);
            behaviour.gossipsub.set_application_score(&peer, 0.0);
        }
        // Graylisted peers' messages never reach `on_gossip`, yet gossipsub still decodes
        // and checks the signature of each one they send: such a peer is banned if it
        // offended here. A score sunk by IP colocation alone (peers sharing an address)
        // is no offence: those peers keep their connections for the market protocols.
        let guard = &self.discovery.guard;
        let graylisted: Vec<PeerId> = behaviour
            .gossipsub
            .all_peers()
            .filter(|(p, _)| {
                guard.has_offended(p)
                    && behaviour
                        .gossipsub
                        .peer_score(p)
                        .is_some_and(|s| s < GRAYLIST_THRESHOLD)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in graylisted {
            if self.discovery.guard.ban(peer, now) {
                tracing::warn!(%peer, "peer banned: gossipsub graylisted it (invalid or flooded offers)");
            }
            self.swarm.behaviour_mut().blocked.block_peer(peer);
        }
        if now >= self.discovery.next_reservation_try {
            self.discovery.next_reservation_try = now + Duration::from_secs(5);
            self.reserve_relays();
        }
        let Some((properties, constraints)) = self.discovery.offer.clone() else {
            return;
        };
        let now = Instant::now();
        let due = match self.discovery.last_published {
            None => true,
            Some(last) => {
                let since = now.duration_since(last);
                since >= self.discovery.republish
                    || (self.discovery.dirty && since >= MIN_REPUBLISH)
            }
        };
        if !due {
            return;
        }
        let addresses: Vec<String> = self
            .offer_addresses()
            .iter()
            .map(|a| a.to_string())
            .collect();
        let issued = chrono::Utc::now();
        let body = OfferBody {
            version: OFFER_VERSION,
            provider_id: self.swarm.local_peer_id().to_string(),
            properties: properties.clone(),
            constraints,
            addresses,
            issued_at: issued,
            expires_at: issued
                + chrono::Duration::from_std(self.discovery.offer_ttl)
                    .unwrap_or(chrono::Duration::minutes(10)),
        };
        let body_addresses = body.addresses.len();
        let signed = match SignedOffer::sign(&body, &self.discovery.keypair) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%e, "cannot sign the offer");
                self.discovery.offer = None;
                return;
            }
        };
        let bytes = match signed.to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%e, "the offer cannot be published (make it smaller)");
                self.discovery.offer = None;
                return;
            }
        };
        self.discovery.last_published = Some(now);
        let signed_addresses = body_addresses;
        let topic = self.discovery.topic.clone();
        let behaviour = self.swarm.behaviour_mut();
        let gossiped = match behaviour.gossipsub.publish(topic, bytes.clone()) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(%e, "offer not gossiped yet");
                false
            }
        };
        let mut record = kad::Record::new(offer_key(&self.swarm.local_peer_id().clone()), bytes);
        record.expires = Some(now + self.discovery.offer_ttl);
        let behaviour = self.swarm.behaviour_mut();
        let stored = behaviour.kad.put_record(record, kad::Quorum::One).is_ok();
        // Announced again with every publication: the provider record carries the
        // addresses known at the time, and a peer behind NAT has its relayed one only
        // after its reservation.
        if let Some(Value::String(runtime)) = properties.get("golem.runtime.name") {
            if behaviour.kad.start_providing(runtime_key(runtime)).is_ok() {
                self.discovery.provided = true;
            }
        }
        // Without a peer to gossip to, try again at the next tick rather than wait a
        // whole republish interval.
        self.discovery.dirty = !gossiped;
        tracing::info!(
            gossiped,
            stored,
            addresses = signed_addresses,
            "offer published"
        );
    }

    fn on_offer_bytes(
        &mut self,
        bytes: &[u8],
        claimed_source: Option<PeerId>,
    ) -> Result<Admission, super::offer::OfferError> {
        let now = chrono::Utc::now();
        let offer = SignedOffer::from_wire(bytes, now)?;
        let peer = offer.publisher;
        if let Some(source) = claimed_source {
            if source != peer {
                return Err(super::offer::OfferError::WrongPublisher {
                    claimed: peer.to_string(),
                    source_peer: source.to_string(),
                });
            }
        }
        if peer == *self.swarm.local_peer_id() {
            return Ok(Admission::Stale);
        }
        Ok(self.discovery.cache.insert(offer, now))
    }

    /// Decodes and checks a gossiped offer, counting the check (`GossipStanding`).
    fn verify_gossiped(
        &mut self,
        bytes: &[u8],
        source: PeerId,
    ) -> Result<Admission, super::offer::OfferError> {
        self.discovery.verified += 1;
        self.on_offer_bytes(bytes, Some(source))
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        // The forwarding peer's rate first: nothing of an over-rate message is decoded.
        match self
            .discovery
            .guard
            .admit(propagation_source, Instant::now())
        {
            Gate::Check => {}
            Gate::Drop { score } | Gate::Ban { score } => {
                self.discovery.over_rate += 1;
                let behaviour = self.swarm.behaviour_mut();
                behaviour
                    .gossipsub
                    .set_application_score(&propagation_source, score);
                if self.discovery.guard.is_banned(&propagation_source)
                    && behaviour.blocked.block_peer(propagation_source)
                {
                    tracing::warn!(peer = %propagation_source, "peer banned: it forwards offer gossip far over the rate");
                } else {
                    tracing::debug!(peer = %propagation_source, score, "offer dropped unchecked: its forwarding peer is over the rate");
                }
                // `Ignore`, not `Reject`: the message may be a valid offer that honest
                // peers forward too, and a rejected id penalises all of them.
                behaviour.gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    gossipsub::MessageAcceptance::Ignore,
                );
                return;
            }
        }
        let verdict = if message.topic != self.discovery.topic.hash() {
            gossipsub::MessageAcceptance::Reject
        } else {
            match message.source {
                // Strict validation makes gossipsub check `source`'s signature; the offer
                // must be signed by the same peer.
                None => gossipsub::MessageAcceptance::Reject,
                Some(source) => match self.verify_gossiped(&message.data, source) {
                    Ok(Admission::Stored) => gossipsub::MessageAcceptance::Accept,
                    // Valid but not kept here: still worth passing on to peers with room.
                    Ok(Admission::Full) => gossipsub::MessageAcceptance::Accept,
                    Ok(Admission::Stale) => gossipsub::MessageAcceptance::Ignore,
                    Ok(Admission::RateLimited) => {
                        tracing::debug!(%source, via = %propagation_source, "offer ignored: its provider publishes too often");
                        gossipsub::MessageAcceptance::Ignore
                    }
                    Err(e) => {
                        tracing::warn!(%source, via = %propagation_source, %e, "offer dropped");
                        gossipsub::MessageAcceptance::Reject
                    }
                },
            }
        };
        if matches!(verdict, gossipsub::MessageAcceptance::Reject) {
            self.discovery.rejected += 1;
            self.discovery
                .guard
                .offended(propagation_source, Instant::now());
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, verdict);
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                // Only an offer record, under its publisher's key, checked like a gossiped
                // one, may enter the store.
                let now = chrono::Utc::now();
                match SignedOffer::from_wire(&record.value, now) {
                    Ok(offer) if record.key == offer_key(&offer.publisher) => {
                        tracing::debug!(%source, publisher = %offer.publisher, "DHT offer record stored");
                        let _ = self.discovery.cache.insert(offer, now);
                        if let Err(e) = kad::store::RecordStore::put(
                            self.swarm.behaviour_mut().kad.store_mut(),
                            record,
                        ) {
                            tracing::debug!(%source, %e, "offer record not stored");
                        }
                    }
                    Ok(offer) => {
                        tracing::warn!(%source, peer = %offer.publisher, "DHT record refused: not under its publisher's key")
                    }
                    Err(e) => tracing::warn!(%source, %e, "DHT record refused"),
                }
            }
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(mut record),
                    },
            } => {
                // A provider that announced before it knew an address of its own would be
                // left out of answers (peers without an address are); its signed offer's
                // addresses stand in.
                if record.addresses.is_empty() {
                    if let Some(offer) = self.discovery.cache.get(&record.provider) {
                        record.addresses = offer.multiaddrs();
                    }
                }
                if let Err(e) = kad::store::RecordStore::add_provider(
                    self.swarm.behaviour_mut().kad.store_mut(),
                    record,
                ) {
                    tracing::debug!(%e, "provider record not stored");
                }
            }
            kad::Event::OutboundQueryProgressed { result, .. } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    let me = *self.swarm.local_peer_id();
                    tracing::debug!(found = providers.len(), "DHT providers");
                    for peer in providers {
                        let known = self.discovery.cache.contains(&peer);
                        if peer != me && !known && self.discovery.fetched.insert(peer) {
                            self.swarm.behaviour_mut().kad.get_record(offer_key(&peer));
                        }
                    }
                }
                kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(found))) => {
                    tracing::debug!(from = ?found.peer, "DHT offer record");
                    match SignedOffer::from_wire(&found.record.value, chrono::Utc::now()) {
                        Ok(offer) if found.record.key != offer_key(&offer.publisher) => {
                            tracing::warn!(peer = %offer.publisher, "DHT offer record under another peer's key ignored")
                        }
                        Ok(_) => {
                            let _ = self.on_offer_bytes(&found.record.value, None);
                        }
                        Err(e) => tracing::warn!(%e, "DHT offer record ignored"),
                    }
                }
                kad::QueryResult::Bootstrap(Err(e)) => tracing::debug!(?e, "DHT bootstrap"),
                kad::QueryResult::GetProviders(Err(e)) => tracing::debug!(?e, "provider lookup"),
                kad::QueryResult::GetRecord(Err(e)) => tracing::debug!(?e, "offer record lookup"),
                _ => {}
            },
            _ => {}
        }
    }

    /// Asks each known relay for a reservation once this peer is known to be unreachable.
    fn reserve_relays(&mut self) {
        if !matches!(self.discovery.nat, autonat::NatStatus::Private) {
            return;
        }
        let wanted: Vec<PeerId> = self
            .discovery
            .relays
            .iter()
            .filter(|p| !self.discovery.reserving.contains_key(p))
            .copied()
            .collect();
        for relay in wanted {
            let Some(addr) = self.discovery.bootstrap.get(&relay).cloned() else {
                continue;
            };
            let circuit = strip_p2p(addr)
                .with(Protocol::P2p(relay))
                .with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%relay, "behind NAT: asking the relay for a reservation");
                    self.discovery.reserving.insert(relay, id);
                }
                Err(e) => tracing::warn!(%relay, %e, "cannot listen through the relay"),
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
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad(event),
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                old,
                new,
            })) => {
                tracing::info!(
                    from = nat_name(&old),
                    to = nat_name(&new),
                    "reachability (AutoNAT)"
                );
                // A peer behind NAT must not serve the DHT: its relayed address counts as
                // confirmed, and others would route every query through the relay to it.
                let mode = match new {
                    autonat::NatStatus::Private => Some(kad::Mode::Client),
                    _ if self.discovery.relay_server => Some(kad::Mode::Server),
                    _ => None,
                };
                self.swarm.behaviour_mut().kad.set_mode(mode);
                self.discovery.nat = new;
                self.discovery.dirty = true;
                self.reserve_relays();
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                } => {
                    if !renewal {
                        tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                    }
                    self.discovery.reserved.insert(relay_peer_id);
                    self.discovery.dirty = true;
                }
                other => tracing::debug!(?other, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection (DCUtR)")
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, %e, "hole punching failed; staying relayed")
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => match event {
                identify::Event::Received { peer_id, info, .. } => {
                    tracing::debug!(
                        peer = %peer_id,
                        agent = %info.agent_version,
                        protocol = %info.protocol_version,
                        "identified peer"
                    );
                    let hop = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                    if hop && self.discovery.bootstrap.contains_key(&peer_id) {
                        self.discovery.relays.insert(peer_id);
                        self.reserve_relays();
                    }
                    // Peers that serve the DHT go into the routing table under the
                    // addresses they listen on.
                    if info
                        .protocols
                        .iter()
                        .any(|p| p.as_ref() == super::behaviour::KAD_PROTOCOL)
                    {
                        for addr in info.listen_addrs.iter().filter(|a| routable(a)) {
                            self.swarm
                                .behaviour_mut()
                                .kad
                                .add_address(&peer_id, addr.clone());
                        }
                    }
                }
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
                self.discovery.dirty = true;
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
                let lost: Vec<PeerId> = self
                    .discovery
                    .reserving
                    .iter()
                    .filter(|(_, id)| **id == listener_id)
                    .map(|(relay, _)| *relay)
                    .collect();
                for relay in lost {
                    tracing::info!(%relay, "relay reservation refused or lost; asking again in a few seconds");
                    self.discovery.reserving.remove(&relay);
                    self.discovery.reserved.remove(&relay);
                    self.discovery.dirty = true;
                }
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
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                self.discovery.dirty = true;
            }
            SwarmEvent::ExternalAddrExpired { .. } | SwarmEvent::ExpiredListenAddr { .. } => {
                self.discovery.dirty = true;
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

fn nat_name(status: &autonat::NatStatus) -> &'static str {
    match status {
        autonat::NatStatus::Public(_) => "public",
        autonat::NatStatus::Private => "private",
        autonat::NatStatus::Unknown => "unknown",
    }
}

/// An address another machine could dial: not loopback, not unspecified.
fn routable(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => !ip.is_loopback() && !ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => !ip.is_loopback() && !ip.is_unspecified(),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)) => true,
        _ => false,
    }
}

/// An address through a circuit relay.
fn relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn unspecified(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_unspecified(),
        Some(Protocol::Ip6(ip)) => ip.is_unspecified(),
        _ => false,
    }
}

fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}
