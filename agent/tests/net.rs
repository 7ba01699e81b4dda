//! `net` over real TCP + noise + yamux on 127.0.0.1: swarms in one process, one
//! serving, one asking; a third speaks raw bytes on the protocols to feed the server bad
//! input.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures::prelude::*;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder};
use net::wire::{
    ActivityRequest, ActivityResponse, MarketRequest, MarketResponse, Offer, ACTIVITY_PROTOCOL,
    MARKET_PROTOCOL, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
};
use net::{
    self, load_or_create_identity, Client, Inbound, InboundRequest, Keypair, NetConfig, NetError,
};
use tokio::sync::mpsc;

/// Longer than any test should take, shorter than the harness' patience: a hang shows up
/// as a failed assertion, not a stuck run.
const PATIENCE: Duration = Duration::from_secs(20);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("agent=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn loopback_config() -> NetConfig {
    NetConfig {
        mdns: false,
        // Long enough that a failure seen within PATIENCE cannot be a timeout.
        market_timeout: Duration::from_secs(60),
        activity_timeout: Duration::from_secs(60),
        ..NetConfig::default()
    }
}

/// A peer listening on 127.0.0.1 with its loop spawned; returns its address with `/p2p/`.
async fn start(config: NetConfig) -> (Client, mpsc::Receiver<Inbound>, Multiaddr) {
    start_on("/ip4/127.0.0.1/tcp/0", config).await
}

async fn start_on(listen: &str, config: NetConfig) -> (Client, mpsc::Receiver<Inbound>, Multiaddr) {
    init_tracing();
    let (client, inbound, event_loop) = net::new(Keypair::generate_ed25519(), config).unwrap();
    tokio::spawn(event_loop.run());
    let addr = client.listen(listen.parse().unwrap()).await.unwrap();
    assert!(
        matches!(addr.iter().last(), Some(Protocol::Tcp(port)) if port != 0),
        "{addr}"
    );
    let full = addr.with(Protocol::P2p(client.local_peer_id()));
    (client, inbound, full)
}

fn offer(provider: PeerId) -> Offer {
    Offer {
        provider_id: provider.to_string(),
        properties: [("golem.runtime.name".to_string(), "vm".into())].into(),
        constraints: String::new(),
    }
}

/// Answers every request the way a trivial provider would.
fn serve(me: PeerId, mut inbound: mpsc::Receiver<Inbound>) {
    tokio::spawn(async move {
        while let Some(Inbound {
            request, responder, ..
        }) = inbound.recv().await
        {
            let result = match request {
                InboundRequest::Market(MarketRequest::GetOffer) => {
                    responder.respond(MarketResponse::Offer { offer: offer(me) })
                }
                InboundRequest::Market(other) => responder.respond(MarketResponse::Error {
                    reason: net::wire::Reason::new(
                        net::wire::Code::Internal,
                        format!("unexpected: {other:?}"),
                    ),
                }),
                InboundRequest::Activity(ActivityRequest::Create { agreement_id }) => responder
                    .respond(ActivityResponse::Created {
                        activity_id: format!("act-{agreement_id}"),
                    }),
                InboundRequest::Activity(other) => responder.respond(ActivityResponse::Error {
                    reason: net::wire::Reason::new(
                        net::wire::Code::Internal,
                        format!("unexpected: {other:?}"),
                    ),
                }),
            };
            result.unwrap();
        }
    });
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {PATIENCE:?} (hang)"))
}

async fn get_offer(client: &Client, server: PeerId) -> MarketResponse {
    within("get-offer", client.market(server, MarketRequest::GetOffer))
        .await
        .unwrap()
}

#[tokio::test]
async fn market_and_activity_requests_are_answered() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    serve(server.local_peer_id(), inbound);
    let (client, _inbound, _) = start(loopback_config()).await;

    let peer = client.dial(server_addr).await.unwrap();
    assert_eq!(peer, server.local_peer_id());

    assert_eq!(
        get_offer(&client, peer).await,
        MarketResponse::Offer { offer: offer(peer) }
    );
    let created = within(
        "create",
        client.activity(
            peer,
            ActivityRequest::Create {
                agreement_id: "ag1".into(),
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        created,
        ActivityResponse::Created {
            activity_id: "act-ag1".into()
        }
    );
    // The server's listen address is what it reported.
    let listening = server.listen_addrs().await.unwrap();
    assert_eq!(listening.len(), 1, "{listening:?}");
}

#[tokio::test]
async fn requests_dial_on_demand_with_a_known_address() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    serve(server.local_peer_id(), inbound);
    let (client, _inbound, _) = start(loopback_config()).await;
    client
        .add_address(server.local_peer_id(), server_addr)
        .await
        .unwrap();
    assert!(matches!(
        get_offer(&client, server.local_peer_id()).await,
        MarketResponse::Offer { .. }
    ));
}

#[tokio::test]
async fn a_request_to_an_unknown_peer_fails_with_a_dial_failure() {
    let (client, _inbound, _) = start(loopback_config()).await;
    let nobody = Keypair::generate_ed25519().public().to_peer_id();
    let err = within(
        "unknown peer",
        client.market(nobody, MarketRequest::GetOffer),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Request {
                failure: OutboundFailure::DialFailure,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn dial_wants_a_peer_id() {
    let (client, _inbound, _) = start(loopback_config()).await;
    let err = client
        .dial("/ip4/127.0.0.1/tcp/1".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::AddressWithoutPeerId { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_dropped_responder_fails_the_request_at_once() {
    let (server, mut inbound, server_addr) = start(loopback_config()).await;
    let (client, _inbound, _) = start(loopback_config()).await;
    let peer = client.dial(server_addr).await.unwrap();
    tokio::spawn(async move {
        while let Some(request) = inbound.recv().await {
            drop(request.responder);
        }
    });
    let started = std::time::Instant::now();
    let err = within(
        "dropped responder",
        client.market(peer, MarketRequest::GetOffer),
    )
    .await
    .unwrap_err();
    // Not the 60 s timeout: the closed stream is the answer.
    assert!(
        !matches!(
            err,
            NetError::Request {
                failure: OutboundFailure::Timeout,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
    eprintln!("dropped responder -> {err}");
    drop(server);
}

#[tokio::test]
async fn a_response_of_the_wrong_protocol_is_refused() {
    let (_server, mut inbound, server_addr) = start(loopback_config()).await;
    let (client, _inbound, _) = start(loopback_config()).await;
    let peer = client.dial(server_addr).await.unwrap();
    let answered = tokio::spawn(async move {
        let request = inbound.recv().await.unwrap();
        request
            .responder
            .respond(ActivityResponse::Created {
                activity_id: "x".into(),
            })
            .unwrap_err()
    });
    let err = within(
        "wrong protocol",
        client.market(peer, MarketRequest::GetOffer),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Request { .. }), "{err}");
    let refused = answered.await.unwrap();
    assert!(
        matches!(refused, NetError::WrongResponse { .. }),
        "{refused}"
    );
}

#[tokio::test]
async fn a_full_inbound_queue_answers_busy() {
    let (server, inbound, server_addr) = start(NetConfig {
        inbound_queue: 1,
        ..loopback_config()
    })
    .await;
    let (client, _inbound, _) = start(loopback_config()).await;
    let peer = client.dial(server_addr).await.unwrap();

    // The first request fills the queue: nobody reads it yet.
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.market(peer, MarketRequest::GetOffer).await }
    });
    within("first request queued", async {
        while inbound.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    match get_offer(&client, peer).await {
        MarketResponse::Error { reason } => assert_eq!(reason.code, net::REASON_BUSY),
        other => panic!("expected busy, got {other:?}"),
    }
    let busy_activity = within(
        "busy activity",
        client.activity(
            peer,
            ActivityRequest::Terminate {
                activity_id: "a".into(),
            },
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(&busy_activity, ActivityResponse::Error { reason } if reason.code == net::REASON_BUSY),
        "{busy_activity:?}"
    );

    // The queued one is still answered once the application gets to it.
    serve(server.local_peer_id(), inbound);
    let first = within("first request", first).await.unwrap().unwrap();
    assert!(matches!(first, MarketResponse::Offer { .. }), "{first:?}");
}

#[tokio::test]
async fn a_peer_without_an_inbound_receiver_answers_unavailable() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    drop(inbound);
    let (client, _inbound, _) = start(loopback_config()).await;
    let peer = client.dial(server_addr).await.unwrap();
    match get_offer(&client, peer).await {
        MarketResponse::Error { reason } => assert_eq!(reason.code, net::REASON_UNAVAILABLE),
        other => panic!("expected unavailable, got {other:?}"),
    }
    drop(server);
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_sending() {
    let (client, _inbound, _) = start(loopback_config()).await;
    let big = "x".repeat(MAX_REQUEST_BYTES as usize);
    let err = client
        .market(
            client.local_peer_id(),
            MarketRequest::Demand {
                properties: [("big".to_string(), big.into())].into(),
                constraints: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::RequestTooLarge { .. }), "{err}");
}

#[tokio::test]
async fn the_loop_ends_when_no_client_and_no_receiver_are_left() {
    let (client, inbound, event_loop) =
        net::new(Keypair::generate_ed25519(), loopback_config()).unwrap();
    let running = tokio::spawn(event_loop.run());
    let other = client.clone();
    drop(client);
    drop(inbound);
    // One client left: the loop still runs and answers it.
    assert!(other.listen_addrs().await.unwrap().is_empty());
    drop(other);
    within("event loop end", running).await.unwrap();
}

#[tokio::test]
async fn a_serving_loop_outlives_its_clients() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    let server_id = server.local_peer_id();
    serve(server_id, inbound);
    drop(server);
    let (client, _inbound, _) = start(loopback_config()).await;
    client.dial(server_addr).await.unwrap();
    assert!(matches!(
        get_offer(&client, server_id).await,
        MarketResponse::Offer { .. }
    ));
}

#[tokio::test]
async fn a_response_too_large_for_the_requestor_becomes_an_error() {
    let (_server, mut inbound, server_addr) = start(loopback_config()).await;
    let (client, _inbound, _) = start(loopback_config()).await;
    let peer = client.dial(server_addr).await.unwrap();
    let answered = tokio::spawn(async move {
        let request = inbound.recv().await.unwrap();
        let now = chrono::Utc::now();
        let huge = net::wire::CommandResult {
            index: 0,
            command: "run".into(),
            outcome: net::wire::Outcome::Ok,
            exit_code: Some(0),
            stdout: "x".repeat(MAX_RESPONSE_BYTES as usize),
            stderr: String::new(),
            truncated: false,
            reason: None,
            started_at: now,
            ended_at: now,
        };
        request.responder.respond(ActivityResponse::Results {
            results: vec![huge],
            done: true,
        })
    });
    let response = within(
        "huge response",
        client.activity(
            peer,
            ActivityRequest::GetResults {
                activity_id: "a".into(),
                batch_id: "b".into(),
                from: 0,
                wait_ms: 0,
            },
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(&response, ActivityResponse::Error { reason } if reason.code == net::REASON_RESPONSE_TOO_LARGE),
        "{response:?}"
    );
    let err = answered.await.unwrap().unwrap_err();
    assert!(matches!(err, NetError::ResponseTooLarge { .. }), "{err}");
}

#[tokio::test]
async fn an_unanswered_request_times_out_instead_of_hanging() {
    // The server would wait longer than the requestor: the requestor's own timeout ends it.
    let (_server, mut inbound, server_addr) = start(loopback_config()).await;
    let (client, _inbound, _) = start(NetConfig {
        market_timeout: Duration::from_secs(1),
        ..loopback_config()
    })
    .await;
    let peer = client.dial(server_addr).await.unwrap();
    // The application takes the request and sits on the responder.
    let held = tokio::spawn(async move { inbound.recv().await });
    let err = within(
        "held responder",
        client.market(peer, MarketRequest::GetOffer),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Request {
                failure: OutboundFailure::Timeout,
                ..
            }
        ),
        "{err}"
    );
    drop(held);
}

// --- raw bytes on the wire -------------------------------------------------------------

/// Writes a request's bytes as given and reads whatever comes back: a peer that ignores
/// the JSON format and the size limits.
#[derive(Clone, Default)]
struct RawCodec;

#[async_trait::async_trait]
impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.read_to_end(&mut buf).await?;
        // The server closing the stream without a word is its way of refusing.
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}

#[derive(NetworkBehaviour)]
struct RawBehaviour {
    market: request_response::Behaviour<RawCodec>,
    activity: request_response::Behaviour<RawCodec>,
    bogus: request_response::Behaviour<RawCodec>,
}

fn raw_swarm() -> Swarm<RawBehaviour> {
    let outbound = |protocol: &'static str| {
        request_response::Behaviour::with_codec(
            RawCodec,
            [(StreamProtocol::new(protocol), ProtocolSupport::Outbound)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(15)),
        )
    };
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| RawBehaviour {
            market: outbound(MARKET_PROTOCOL),
            activity: outbound(ACTIVITY_PROTOCOL),
            bogus: outbound("/provider/bogus/1"),
        })
        .unwrap()
        .build()
}

#[derive(Clone, Copy, Debug)]
enum Raw {
    Market,
    Activity,
    Bogus,
}

/// Sends `bytes` on `which` protocol and drives the swarm until that request ends.
async fn raw_request(
    swarm: &mut Swarm<RawBehaviour>,
    peer: PeerId,
    which: Raw,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, OutboundFailure> {
    let behaviour = swarm.behaviour_mut();
    let id = match which {
        Raw::Market => behaviour.market.send_request(&peer, bytes),
        Raw::Activity => behaviour.activity.send_request(&peer, bytes),
        Raw::Bogus => behaviour.bogus.send_request(&peer, bytes),
    };
    within("raw request", async {
        loop {
            let event = match swarm.select_next_some().await {
                SwarmEvent::Behaviour(RawBehaviourEvent::Market(e))
                | SwarmEvent::Behaviour(RawBehaviourEvent::Activity(e))
                | SwarmEvent::Behaviour(RawBehaviourEvent::Bogus(e)) => e,
                _ => continue,
            };
            match event {
                request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                } if request_id == id => return Ok(response),
                request_response::Event::OutboundFailure {
                    request_id, error, ..
                } if request_id == id => return Err(error),
                _ => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn bad_input_fails_that_request_and_the_server_keeps_serving() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    let server_id = server.local_peer_id();
    serve(server_id, inbound);
    refuses_bad_input_and_keeps_serving(server_id, server_addr).await;
}

/// The same bad input against the whole daemon (`provider::daemon::run`, with its market and
/// jobs behind the network layer): each bad request fails, the daemon answers the next.
#[tokio::test]
async fn the_daemon_refuses_bad_input_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let data = provider::store::DataDir::new(dir.path());
    let (tx, rx) = std::sync::mpsc::channel::<Multiaddr>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg = provider::daemon::DaemonConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            mdns: false,
            ..Default::default()
        };
        let _ = rt.block_on(provider::daemon::run(data, cfg, move |a| {
            let _ = tx.send(a.clone());
        }));
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the daemon listens");
    let Some(Protocol::P2p(server_id)) = addr.iter().last() else {
        panic!("no peer id in {addr}");
    };
    refuses_bad_input_and_keeps_serving(server_id, addr).await;
    drop(dir);
}

async fn refuses_bad_input_and_keeps_serving(server_id: PeerId, server_addr: Multiaddr) {
    let (client, _inbound, _) = start(loopback_config()).await;
    let mut raw = raw_swarm();
    raw.add_peer_address(server_id, server_addr.clone());
    client.dial(server_addr).await.unwrap();

    // Sanity: well-formed JSON written raw is answered, so the failures below are the
    // server refusing the content, not the raw peer being unable to talk.
    let ok = raw_request(
        &mut raw,
        server_id,
        Raw::Market,
        br#"{"type":"get-offer"}"#.to_vec(),
    )
    .await
    .unwrap();
    let ok: MarketResponse = serde_json::from_slice(&ok).unwrap();
    assert!(matches!(ok, MarketResponse::Offer { .. }), "{ok:?}");

    let mut oversized = br#"{"type":"demand","constraints":"","properties":{"x":""#.to_vec();
    oversized.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES as usize + 4096));
    oversized.extend(br#""}}"#);
    let cases: Vec<(&str, Raw, Vec<u8>)> = vec![
        (
            "malformed JSON",
            Raw::Market,
            b"{\"type\": \"get-off".to_vec(),
        ),
        (
            "not JSON at all",
            Raw::Activity,
            vec![0xff, 0x00, 0x13, 0x37],
        ),
        (
            "unknown message type",
            Raw::Market,
            br#"{"type":"reboot"}"#.to_vec(),
        ),
        (
            "unknown field",
            Raw::Activity,
            br#"{"type":"create","agreement_id":"a","sudo":true}"#.to_vec(),
        ),
        ("empty request", Raw::Market, Vec::new()),
        ("oversized request", Raw::Market, oversized),
        (
            "unknown protocol",
            Raw::Bogus,
            br#"{"type":"get-offer"}"#.to_vec(),
        ),
    ];
    for (what, which, bytes) in cases {
        let result = raw_request(&mut raw, server_id, which, bytes).await;
        match result {
            Err(OutboundFailure::Timeout) => panic!("{what}: the server hung instead of refusing"),
            Err(e) => eprintln!("{what}: refused as expected ({e})"),
            Ok(body) => panic!(
                "{what}: answered {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        }
        // The server still answers a good request, from the raw peer and from a client.
        let again = raw_request(
            &mut raw,
            server_id,
            Raw::Market,
            br#"{"type":"get-offer"}"#.to_vec(),
        )
        .await
        .unwrap_or_else(|e| panic!("after {what}: good raw request failed: {e}"));
        assert!(
            serde_json::from_slice::<MarketResponse>(&again).is_ok(),
            "after {what}"
        );
        assert!(
            matches!(
                get_offer(&client, server_id).await,
                MarketResponse::Offer { .. }
            ),
            "after {what}"
        );
    }
}

#[tokio::test]
async fn the_unknown_protocol_is_reported_as_unsupported() {
    let (server, inbound, server_addr) = start(loopback_config()).await;
    serve(server.local_peer_id(), inbound);
    let mut raw = raw_swarm();
    raw.add_peer_address(server.local_peer_id(), server_addr);
    let err = raw_request(&mut raw, server.local_peer_id(), Raw::Bogus, b"{}".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, OutboundFailure::UnsupportedProtocols),
        "{err}"
    );
}

// --- identity --------------------------------------------------------------------------

#[test]
fn identity_is_created_0600_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    let first = load_or_create_identity(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = load_or_create_identity(&path).unwrap();
    assert_eq!(
        first.public().to_peer_id(),
        second.public().to_peer_id(),
        "the second load must reuse the key"
    );
    assert!(first.clone().try_into_ed25519().is_ok());
    // No temp file left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["identity.key"]);
}

#[test]
fn concurrent_first_runs_agree_on_one_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    let ids: Vec<PeerId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    load_or_create_identity(&path)
                        .unwrap()
                        .public()
                        .to_peer_id()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_readable_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    load_or_create_identity(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = load_or_create_identity(&path).unwrap_err();
    assert!(
        matches!(err, NetError::IdentityPermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_malformed_identity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    std::fs::write(&path, b"not a key").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = load_or_create_identity(&path).unwrap_err();
    assert!(matches!(err, NetError::IdentityMalformed { .. }), "{err}");
    assert!(err.to_string().contains("move it away"), "{err}");
}

#[test]
fn a_missing_data_dir_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("identity.key");
    let err = load_or_create_identity(&path).unwrap_err();
    assert!(matches!(err, NetError::IdentityIo { .. }), "{err}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

// --- mDNS ------------------------------------------------------------------------------

/// Whether a multicast datagram to the mDNS group comes back to a member socket on this
/// host: the precondition for two local swarms to find each other. `Err` says why not.
fn multicast_works() -> Result<(), String> {
    use std::net::{Ipv4Addr, UdpSocket};
    let group = Ipv4Addr::new(224, 0, 0, 251);
    let member = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {e}"))?;
    member
        .join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)
        .map_err(|e| format!("cannot join {group}: {e}"))?;
    member
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let port = member.local_addr().map_err(|e| e.to_string())?.port();
    let sender = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| format!("bind: {e}"))?;
    sender
        .set_multicast_loop_v4(true)
        .map_err(|e| e.to_string())?;
    sender
        .send_to(b"probe", (group, port))
        .map_err(|e| format!("cannot send to {group}: {e}"))?;
    let mut buf = [0u8; 16];
    match member.recv_from(&mut buf) {
        Ok((5, _)) if &buf[..5] == b"probe" => Ok(()),
        Ok(_) => Err("an unexpected datagram arrived instead of the probe".into()),
        Err(e) => Err(format!("the probe sent to {group} did not loop back: {e}")),
    }
}

#[tokio::test]
async fn mdns_discovers_a_local_peer() {
    if provider::testsupport::rerun_in_private_netns("mdns_discovers_a_local_peer") {
        return;
    }
    if let Err(why) = multicast_works() {
        // Not a pass: say loudly that the test did not run and why.
        eprintln!("SKIPPED mdns_discovers_a_local_peer: multicast unavailable here: {why}");
        return;
    }
    let config = NetConfig {
        mdns: true,
        ..loopback_config()
    };
    // mDNS announces each listener's port with the address of the interface it multicasts
    // on (loopback is skipped), so a peer found by mDNS must listen beyond 127.0.0.1.
    let (a, inbound, _) = start_on("/ip4/0.0.0.0/tcp/0", config.clone()).await;
    serve(a.local_peer_id(), inbound);
    let (b, _inbound, _) = start_on("/ip4/0.0.0.0/tcp/0", config).await;
    let found = within("mDNS discovery", async {
        loop {
            let peers = b.discovered().await.unwrap();
            if let Some((_, addrs)) = peers.iter().find(|(p, _)| *p == a.local_peer_id()) {
                break addrs.clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    eprintln!("mDNS found {} at {found:?}", a.local_peer_id());
    // The discovered addresses are enough to reach it: no explicit dial.
    assert!(matches!(
        get_offer(&b, a.local_peer_id()).await,
        MarketResponse::Offer { .. }
    ));
}

/// Discovery without mDNS: a provider publishes its signed offer through a bootstrap peer;
/// a requestor joining later finds it (DHT provider lookup + offer record), verified, with
/// the provider's properties, and an offer change reaches it too (gossip or DHT).
#[tokio::test]
async fn a_signed_offer_reaches_a_requestor_through_a_bootstrap_peer() {
    init_tracing();
    let (boot, _boot_in, boot_addr) = start(NetConfig {
        relay_server: true,
        only_global_ips: false,
        ..loopback_config()
    })
    .await;
    let boot_full = boot_addr.clone();
    let _ = &boot;
    let (provider, _p_in, _) = start(NetConfig {
        only_global_ips: false,
        ..loopback_config()
    })
    .await;
    within("provider bootstrap", provider.bootstrap(boot_full.clone()))
        .await
        .unwrap();
    let props = |mem: f64| {
        [
            ("golem.runtime.name".to_string(), serde_json::json!("vm")),
            ("golem.inf.mem.gib".to_string(), serde_json::json!(mem)),
        ]
        .into_iter()
        .collect()
    };
    provider.set_offer(props(0.5), String::new()).await.unwrap();

    let (requestor, _r_in, _) = start(loopback_config()).await;
    within("requestor bootstrap", requestor.bootstrap(boot_full))
        .await
        .unwrap();
    let wait_for = |mem: f64| {
        let requestor = requestor.clone();
        let me = provider.local_peer_id();
        async move {
            loop {
                requestor.find_providers("vm").await.unwrap();
                let offers = requestor.offers().await.unwrap();
                if let Some(o) = offers.iter().find(|o| o.publisher == me) {
                    if o.body.properties["golem.inf.mem.gib"] == serde_json::json!(mem) {
                        return o.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let found = within("the offer at the requestor", wait_for(0.5)).await;
    assert_eq!(found.body.provider_id, provider.local_peer_id().to_string());
    // What was received still verifies on its own.
    found.signed.clone().verify(chrono::Utc::now()).unwrap();
    // The requestor never lists itself or the bootstrap's (absent) offer.
    assert!(requestor
        .offers()
        .await
        .unwrap()
        .iter()
        .all(|o| o.publisher == provider.local_peer_id()));

    // A changed offer replaces the old one (after the 2 s republish floor).
    provider.set_offer(props(1.0), String::new()).await.unwrap();
    within("the changed offer", wait_for(1.0)).await;
}

/// Makes one forged offer, given the forger's key.
type Forgery = Box<dyn Fn(&Keypair) -> Vec<u8>>;

/// A hostile gossip peer: a stock gossipsub node (its own signing key, no validation of
/// what it sends) that publishes whatever bytes the test hands it on the offers topic.
struct Hostile {
    peer: PeerId,
    key: Keypair,
    publish: mpsc::UnboundedSender<Vec<u8>>,
    /// Set when its last connection to the target closed.
    disconnected: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Starts a hostile peer, connects it to `target` and waits until gossipsub knows the
/// target is subscribed to the offers topic (so a publish reaches it).
async fn hostile(target: Multiaddr) -> Hostile {
    use libp2p::gossipsub;
    use std::sync::atomic::{AtomicBool, Ordering};
    let key = Keypair::generate_ed25519();
    let target_peer = match target.iter().last() {
        Some(Protocol::P2p(p)) => p,
        _ => panic!("{target} has no /p2p/"),
    };
    let config = gossipsub::ConfigBuilder::default()
        // Room for the oversized offer: the target's own limit is what is tested.
        .max_transmit_size(64 * 1024)
        .heartbeat_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let mut behaviour: gossipsub::Behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)
            .unwrap();
    let topic = gossipsub::IdentTopic::new(net::offer::OFFER_TOPIC);
    behaviour.subscribe(&topic).unwrap();
    let mut swarm = SwarmBuilder::with_existing_identity(key.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm.dial(target).unwrap();
    let (publish, mut to_publish) = mpsc::unbounded_channel::<Vec<u8>>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let disconnected = std::sync::Arc::new(AtomicBool::new(false));
    let gone = disconnected.clone();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            tokio::select! {
                event = swarm.select_next_some() => match event {
                    SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. })
                        if peer_id == target_peer =>
                    {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. }
                        if peer_id == target_peer =>
                    {
                        gone.store(true, Ordering::SeqCst);
                    }
                    _ => {}
                },
                bytes = to_publish.recv() => match bytes {
                    // A peer that closed the connection leaves nobody to publish to.
                    Some(bytes) => { let _ = swarm.behaviour_mut().publish(topic.clone(), bytes); }
                    None => break,
                },
            }
        }
    });
    within("hostile peer subscribed", ready_rx).await.unwrap();
    Hostile {
        peer: key.public().to_peer_id(),
        key,
        publish,
        disconnected,
    }
}

fn offer_body(
    key: &Keypair,
    issued: chrono::DateTime<chrono::Utc>,
    ttl_s: i64,
) -> net::offer::OfferBody {
    net::offer::OfferBody {
        version: net::offer::OFFER_VERSION,
        provider_id: key.public().to_peer_id().to_string(),
        properties: [("golem.runtime.name".to_string(), serde_json::json!("vm"))].into(),
        constraints: String::new(),
        addresses: vec!["/ip4/127.0.0.1/tcp/9".into()],
        issued_at: issued,
        expires_at: issued + chrono::Duration::seconds(ttl_s),
    }
}

/// Signs arbitrary body text with `key` (an offer `SignedOffer::sign` would not make).
fn sign_text(text: String, key: &Keypair) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut signed = net::offer::SIGNING_CONTEXT.to_vec();
    signed.extend_from_slice(text.as_bytes());
    let offer = net::offer::SignedOffer {
        offer: text,
        public_key: b64.encode(key.public().encode_protobuf()),
        signature: b64.encode(key.sign(&signed).unwrap()),
    };
    serde_json::to_vec(&offer).unwrap()
}

/// Hostile gossip over the wire: real swarms on loopback. An honest provider gossips its
/// offer to a requestor; hostile peers connected to the same requestor publish forged
/// offers (bad signature, key of another peer than the source, oversized, expired,
/// future-dated, an unknown field, not JSON), one floods valid offers of its own and one
/// floods garbage. The requestor keeps only the valid offers, verifies a bounded number
/// of the flood (its forwarding peer's rate), penalises every forger in gossipsub's score
/// and bans (disconnects) the flooders, while the honest provider stays connected and
/// well scored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_gossip_is_refused_scored_down_and_flooders_are_banned() {
    use std::sync::atomic::Ordering;
    init_tracing();
    let forwarders = net::gossip_guard::GossipLimits {
        rate: 20.0,
        burst: 40,
        excess_half_life: Duration::from_secs(30),
        ban_after: 16.0,
        ban_for: Duration::from_secs(600),
        max_peers: 64,
    };
    let (requestor, _r_in, r_addr) = start(NetConfig {
        offer_limits: net::offer::OfferLimits {
            forwarders: forwarders.clone(),
            ..Default::default()
        },
        ..loopback_config()
    })
    .await;
    let (provider, _p_in, _) = start(loopback_config()).await;
    within(
        "provider dials the requestor",
        provider.dial(r_addr.clone()),
    )
    .await
    .unwrap();
    provider
        .set_offer(
            [("golem.runtime.name".to_string(), serde_json::json!("vm"))].into(),
            String::new(),
        )
        .await
        .unwrap();
    let honest = provider.local_peer_id();
    within("the honest offer at the requestor", async {
        while !requestor
            .offers()
            .await
            .unwrap()
            .iter()
            .any(|o| o.publisher == honest)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let before = requestor.gossip_standing().await.unwrap();

    // One forger per kind, so that each forgery meets the validator on a fresh score
    // (a second invalid offer from one peer already graylists it).
    let now = chrono::Utc::now();
    let other = Keypair::generate_ed25519();
    let other_peer = other.public().to_peer_id();
    let mut forgers = Vec::new();
    let kinds: Vec<(&str, Forgery)> = vec![
        (
            "bad signature",
            Box::new(move |k: &Keypair| {
                let mut o = net::offer::SignedOffer::sign(&offer_body(k, now, 600), k).unwrap();
                o.offer = o.offer.replace("\"vm\"", "\"vx\"");
                serde_json::to_vec(&o).unwrap()
            }),
        ),
        (
            "key is not the source",
            Box::new(move |_: &Keypair| {
                // Validly signed by `other`, for `other`, but published by the forger.
                net::offer::SignedOffer::sign(&offer_body(&other, now, 600), &other)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
            }),
        ),
        (
            "oversized",
            Box::new(move |k: &Keypair| {
                let mut b = offer_body(k, now, 600);
                b.properties
                    .insert("pad".into(), serde_json::json!("x".repeat(16 * 1024 - 100)));
                let o = net::offer::SignedOffer::sign(&b, k).unwrap();
                let bytes = serde_json::to_vec(&o).unwrap();
                // Past the offer limit, within gossipsub's transmit limit.
                assert!(bytes.len() > net::offer::MAX_OFFER_BYTES);
                assert!(bytes.len() < net::offer::MAX_OFFER_BYTES + 700);
                bytes
            }),
        ),
        (
            "expired",
            Box::new(move |k: &Keypair| {
                let b = offer_body(k, now - chrono::Duration::seconds(1200), 600);
                net::offer::SignedOffer::sign(&b, k)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
            }),
        ),
        (
            "future-dated",
            Box::new(move |k: &Keypair| {
                let b = offer_body(k, now + chrono::Duration::seconds(3600), 600);
                net::offer::SignedOffer::sign(&b, k)
                    .unwrap()
                    .to_bytes()
                    .unwrap()
            }),
        ),
        (
            "unknown field",
            Box::new(move |k: &Keypair| {
                let mut v = serde_json::to_value(offer_body(k, now, 600)).unwrap();
                v["price"] = serde_json::json!(0);
                sign_text(v.to_string(), k)
            }),
        ),
        (
            "not JSON",
            Box::new(|_: &Keypair| b"\x00\xffnot an offer".to_vec()),
        ),
    ];
    let mut rejected = before.clone();
    for (kind, make) in &kinds {
        let h = hostile(r_addr.clone()).await;
        h.publish.send(make(&h.key)).unwrap();
        let seen = rejected.rejected;
        rejected = within(&format!("the {kind} forgery rejected"), async {
            loop {
                let s = requestor.gossip_standing().await.unwrap();
                if s.rejected > seen {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // gossipsub's penalty for an invalid message (it decays within seconds).
        let score = rejected
            .scores
            .iter()
            .find(|(p, _)| *p == h.peer)
            .map(|s| s.1);
        assert!(
            score.is_some_and(|s| s < 0.0),
            "the {kind} forger is not penalised: {score:?}"
        );
        forgers.push(h);
    }
    assert_eq!(rejected.rejected - before.rejected, kinds.len() as u64);
    // A flood of valid offers of the flooder's own (each newer than the last: only the
    // per-publisher rate would stop them after their signature is checked), and a flood of
    // garbage, from two more peers.
    let flooder = hostile(r_addr.clone()).await;
    let garbage = hostile(r_addr.clone()).await;
    let start_flood = std::time::Instant::now();
    let flood = 400;
    for i in 0..flood {
        let issued = chrono::Utc::now() + chrono::Duration::milliseconds(i);
        let b = offer_body(&flooder.key, issued, 600);
        flooder
            .publish
            .send(
                net::offer::SignedOffer::sign(&b, &flooder.key)
                    .unwrap()
                    .to_bytes()
                    .unwrap(),
            )
            .unwrap();
        garbage
            .publish
            .send(format!("garbage {i}").into_bytes())
            .unwrap();
    }
    let banned = within("both flooders banned and disconnected", async {
        loop {
            let s = requestor.gossip_standing().await.unwrap();
            let both = [flooder.peer, garbage.peer]
                .iter()
                .all(|p| s.banned.contains(p));
            if both
                && flooder.disconnected.load(Ordering::SeqCst)
                && garbage.disconnected.load(Ordering::SeqCst)
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let elapsed = start_flood.elapsed().as_secs_f64();
    // The flood cost at most the flooder's bucket plus its refill (and one check for each
    // garbage message before gossipsub graylisted its peer, and the honest republishes).
    let verified = banned.verified - rejected.verified;
    let bound = f64::from(forwarders.burst) + forwarders.rate * elapsed + 2.0 * 10.0;
    assert!(
        (verified as f64) <= bound && verified < flood as u64,
        "{verified} of the {flood}-offer flood verified in {elapsed:.1} s (bound {bound:.0})"
    );
    assert!(banned.over_rate > 0, "{banned:?}");

    // The cache: the honest offer and the flooder's one valid offer, none of the forged.
    let offers = requestor.offers().await.unwrap();
    let publishers: Vec<PeerId> = offers.iter().map(|o| o.publisher).collect();
    assert!(publishers.contains(&honest), "{publishers:?}");
    for p in &publishers {
        assert!(
            *p == honest || *p == flooder.peer,
            "a forged offer was kept: {p}"
        );
    }
    assert!(!publishers.contains(&other_peer));
    for o in &offers {
        o.signed.clone().verify(chrono::Utc::now()).unwrap();
    }
    // The honest provider is neither banned nor penalised, and still connected: a new
    // offer of its own still arrives.
    assert!(!banned.banned.contains(&honest));
    let honest_score = banned
        .scores
        .iter()
        .find(|(p, _)| *p == honest)
        .map(|s| s.1);
    assert!(honest_score.is_some_and(|s| s >= 0.0), "{honest_score:?}");
    let issued_before = offers
        .iter()
        .find(|o| o.publisher == honest)
        .unwrap()
        .body
        .issued_at;
    provider
        .set_offer(
            [
                ("golem.runtime.name".to_string(), serde_json::json!("vm")),
                ("golem.inf.mem.gib".to_string(), serde_json::json!(1.0)),
            ]
            .into(),
            String::new(),
        )
        .await
        .unwrap();
    within("the honest provider's next offer", async {
        loop {
            let offers = requestor.offers().await.unwrap();
            if offers
                .iter()
                .any(|o| o.publisher == honest && o.body.issued_at > issued_before)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
