//! The swarm's behaviour: identify, optional mDNS, one JSON request-response behaviour
//! per protocol, and for discovery beyond one LAN Kademlia (peer routing, provider
//! records, offer records), gossipsub (signed offers), AutoNAT (reachability), circuit
//! relay v2 (client always, server when the operator enables it) and DCUtR (hole
//! punching), over TCP + noise + yamux (directly or through a relay).

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, tcp,
    yamux, StreamProtocol, Swarm, SwarmBuilder,
};

use super::codec::JsonCodec;
use super::offer::{MAX_OFFER_BYTES, OFFER_TOPIC};
use super::wire::{
    ActivityRequest, ActivityResponse, MarketRequest, MarketResponse, ACTIVITY_PROTOCOL,
    MARKET_PROTOCOL, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};
use super::{NetConfig, NetError};

/// Our Kademlia protocol: a DHT of this marketplace's peers only, not the IPFS one.
pub(crate) const KAD_PROTOCOL: &str = "/provider/kad/1.0.0";

/// Below this gossipsub score a peer's RPCs are ignored (graylisted), and the event loop
/// bans it (gossipsub's default value).
pub(crate) const GRAYLIST_THRESHOLD: f64 = -80.0;

/// What identify announces as the protocol family; peers of another family are still
/// served, it is informational.
const IDENTIFY_PROTOCOL: &str = "/provider/id/1";

pub(crate) type MarketBehaviour =
    request_response::Behaviour<JsonCodec<MarketRequest, MarketResponse>>;
pub(crate) type ActivityBehaviour =
    request_response::Behaviour<JsonCodec<ActivityRequest, ActivityResponse>>;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// Peers banned for flooding the offer gossip (`gossip_guard`): their connections are
    /// closed and refused until the ban ends.
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    pub(crate) dcutr: dcutr::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) market: MarketBehaviour,
    pub(crate) activity: ActivityBehaviour,
}

/// The JSON codec with the wire limits: a peer reads at most `MAX_REQUEST_BYTES` of a
/// request and `MAX_RESPONSE_BYTES` of a response, so a hostile peer cannot make it
/// buffer without bound.
fn codec<Req, Resp>() -> JsonCodec<Req, Resp> {
    JsonCodec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES)
}

pub(crate) fn build_swarm(
    keypair: Keypair,
    config: &NetConfig,
) -> Result<Swarm<Behaviour>, NetError> {
    let local_peer_id = keypair.public().to_peer_id();
    let mdns = if config.mdns {
        Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), local_peer_id)
                .map_err(NetError::Mdns)?,
        )
    } else {
        None
    };
    let idle = config.idle_connection_timeout;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            // Requests are small and latency-bound: don't let Nagle hold them back.
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|key, relay_client| behaviour(key, relay_client, mdns, config))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}

fn behaviour(
    keypair: &Keypair,
    relay_client: relay::client::Behaviour,
    mdns: Option<mdns::tokio::Behaviour>,
    config: &NetConfig,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let local_peer_id = keypair.public().to_peer_id();
    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    // Offer records are checked before they are stored (signature, expiry, size).
    kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
    kad_config.set_query_timeout(std::time::Duration::from_secs(30));
    // A found record is not written back to other peers: offers are re-published by their
    // providers, and a write-back would go to peers the requestor merely queried.
    kad_config.set_caching(kad::Caching::Disabled);
    // A provider lookup's answer lists every provider of a runtime with its (relayed)
    // addresses: more than the 16 KiB default allows once there are a few dozen.
    kad_config.set_max_packet_size(1 << 20);
    let store = kad::store::MemoryStore::with_config(
        local_peer_id,
        kad::store::MemoryStoreConfig {
            max_records: config.offer_limits.max_offers,
            max_value_bytes: MAX_OFFER_BYTES,
            // Every provider of a runtime advertises under the same key, so a node near
            // that key holds more than k of them; bounded all the same.
            max_providers_per_key: 1024,
            max_provided_keys: 16,
        },
    );
    let mut kad = kad::Behaviour::with_config(local_peer_id, store, kad_config);
    if config.relay_server {
        // A relay is meant to be publicly reachable: it serves the DHT from the start
        // instead of waiting for AutoNAT to confirm an address.
        kad.set_mode(Some(kad::Mode::Server));
    }

    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(MAX_OFFER_BYTES + 1024)
        // The event loop checks every offer before it is forwarded or kept.
        .validate_messages()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .heartbeat_interval(std::time::Duration::from_millis(700))
        .build()?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )?;
    let topic = gossipsub::IdentTopic::new(OFFER_TOPIC);
    let mut score = gossipsub::PeerScoreParams {
        // The forwarder guard (`gossip_guard`) sets a flooding peer's application score to
        // minus its excess of over-rate messages: weighted 10, one excess message puts it
        // at the gossip threshold (-10), eight at the graylist (-80).
        app_specific_weight: 10.0,
        ..gossipsub::PeerScoreParams::default()
    };
    score.topics.insert(
        topic.hash(),
        gossipsub::TopicScoreParams {
            // Each invalid offer a peer forwards counts hard against it; below the graylist
            // threshold its messages are ignored altogether.
            invalid_message_deliveries_weight: -100.0,
            invalid_message_deliveries_decay: 0.5,
            // Offers are a trickle (one per provider every few minutes): the default
            // expectation of 20 deliveries per mesh peer would score every honest peer
            // below the graylist threshold within seconds and silence the topic.
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            ..gossipsub::TopicScoreParams::default()
        },
    );
    gossipsub.with_peer_score(
        score,
        gossipsub::PeerScoreThresholds {
            graylist_threshold: GRAYLIST_THRESHOLD,
            ..gossipsub::PeerScoreThresholds::default()
        },
    )?;
    gossipsub.subscribe(&topic)?;

    let autonat = autonat::Behaviour::new(
        local_peer_id,
        autonat::Config {
            boot_delay: config.autonat_boot_delay,
            retry_interval: config.autonat_retry_interval,
            refresh_interval: std::time::Duration::from_secs(5 * 60),
            throttle_server_period: std::time::Duration::from_secs(10),
            only_global_ips: config.only_global_ips,
            ..autonat::Config::default()
        },
    );
    let relay_server = config.relay_server.then(|| {
        relay::Behaviour::new(
            local_peer_id,
            relay::Config {
                // A job's requests and results pass through the relay until DCUtR
                // upgrades the connection: the default 2 min / 128 KiB would cut a job.
                max_circuit_duration: config.relay_circuit_duration,
                max_circuit_bytes: config.relay_circuit_bytes,
                ..relay::Config::default()
            },
        )
    });
    Ok(Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("provider/{}", env!("CARGO_PKG_VERSION"))),
        ),
        mdns: Toggle::from(mdns),
        kad,
        gossipsub,
        autonat,
        relay_server: Toggle::from(relay_server),
        relay_client,
        dcutr: dcutr::Behaviour::new(local_peer_id),
        ping: ping::Behaviour::default(),
        market: request_response::Behaviour::with_codec(
            codec(),
            [(StreamProtocol::new(MARKET_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(config.market_timeout),
        ),
        activity: request_response::Behaviour::with_codec(
            codec(),
            [(
                StreamProtocol::new(ACTIVITY_PROTOCOL),
                ProtocolSupport::Full,
            )],
            request_response::Config::default().with_request_timeout(config.activity_timeout),
        ),
    })
}
