//! The swarm's behaviour: identify, optional mDNS, and one JSON request-response
//! behaviour per protocol, over TCP + noise + yamux.

use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, mdns, noise, tcp, yamux, StreamProtocol, Swarm, SwarmBuilder};

use super::codec::JsonCodec;
use super::wire::{
    ActivityRequest, ActivityResponse, MarketRequest, MarketResponse, ACTIVITY_PROTOCOL,
    MARKET_PROTOCOL, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};
use super::{NetConfig, NetError};

/// What identify announces as the protocol family; peers of another family are still
/// served, it is informational.
const IDENTIFY_PROTOCOL: &str = "/provider/id/1";

pub(crate) type MarketBehaviour =
    request_response::Behaviour<JsonCodec<MarketRequest, MarketResponse>>;
pub(crate) type ActivityBehaviour =
    request_response::Behaviour<JsonCodec<ActivityRequest, ActivityResponse>>;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) identify: identify::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
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
    let behaviour = Behaviour {
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("provider/{}", env!("CARGO_PKG_VERSION"))),
        ),
        mdns: Toggle::from(mdns),
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
        .with_behaviour(|_| behaviour)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}
