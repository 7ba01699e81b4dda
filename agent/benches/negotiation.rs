//! Negotiation over loopback: accepted demands (signature and chain checked) per second and
//! their round-trip latency, through a real daemon (`provider::daemon::run`) and real
//! requestor swarms (TCP + noise + yamux).
//!
//! `cargo bench -p provider --bench negotiation` — prints figures; asserts nothing about
//! speed. `NEG_CLIENTS` (default 8) requestor peers each send `NEG_DEMANDS` (default 500)
//! demands one after another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use certs::testpki::{self, KeyKind, Validity};
use net::wire::{props, MarketRequest, MarketResponse};
use net::{Keypair, Multiaddr, NetConfig};
use openssl::hash::MessageDigest;
use provider::daemon::{self, DaemonConfig};
use provider::store::DataDir;
use serde_json::{json, Value};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let clients = env_usize("NEG_CLIENTS", 8);
    let per_client = env_usize("NEG_DEMANDS", 500);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    // RSA-2048 leaf → intermediate → root, as in the verdicts bench.
    let root = testpki::root("Bench Root", KeyKind::Rsa2048, Validity::current());
    let inter = testpki::issue(
        &root,
        "Bench Inter",
        KeyKind::Rsa2048,
        true,
        Validity::current(),
    );
    let leaf = testpki::issue(
        &inter,
        "Bench Author",
        KeyKind::Rsa2048,
        false,
        Validity::current(),
    );
    {
        let lock = data.lock().unwrap();
        data.save_cert_file(&lock, "root.pem", &root.cert.to_pem().unwrap())
            .unwrap();
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let manifest = json!({
        "version": "0.1.0", "createdAt": "2024-01-01T00:00:00Z", "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "bench", "version": "1"},
        "payload": [{"platform": {"arch": std::env::consts::ARCH, "os": "linux"},
                     "urls": ["https://images.example.com/a.tar.gz"],
                     "hash": format!("sha3:{}", "ab".repeat(32))}],
        "compManifest": {"version": "0.1.0"}
    });
    let m64 = b64.encode(manifest.to_string());
    let sig = testpki::sign(&leaf.key, MessageDigest::sha256(), m64.as_bytes());
    let properties: std::collections::BTreeMap<String, Value> = [
        (props::PAYLOAD, json!(m64)),
        (props::PAYLOAD_SIG, json!(b64.encode(sig))),
        (props::PAYLOAD_SIG_ALG, json!("sha256")),
        (
            props::PAYLOAD_CERT,
            json!(b64.encode(testpki::pem(&[&leaf.cert, &inter.cert]))),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Multiaddr>();
    let cfg = DaemonConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
        mdns: false,
        // Each requestor peer sends hundreds of demands and agrees to none.
        max_proposals_per_peer: usize::MAX,
        ..DaemonConfig::default()
    };
    let daemon_data = data.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(daemon::run(daemon_data, cfg, move |a| {
            let _ = addr_tx.send(a.clone());
        }))
        .unwrap();
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let Some(libp2p::multiaddr::Protocol::P2p(provider)) = addr.iter().last() else {
        panic!("no peer id in {addr}");
    };

    let properties = Arc::new(properties);
    let results = rt.block_on(async {
        let mut tasks = Vec::new();
        let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
        for _ in 0..clients {
            let addr = addr.clone();
            let properties = properties.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let (client, _inbound, event_loop) = net::new(
                    Keypair::generate_ed25519(),
                    NetConfig {
                        mdns: false,
                        ..NetConfig::default()
                    },
                )
                .unwrap();
                tokio::spawn(event_loop.run());
                client.dial(addr).await.unwrap();
                let demand = || MarketRequest::Demand {
                    properties: (*properties).clone(),
                    constraints: "(golem.runtime.name=vm)".into(),
                };
                // Warm-up: connection and the provider's chain cache.
                for _ in 0..5 {
                    client.market(provider, demand()).await.unwrap();
                }
                barrier.wait().await;
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let r = client.market(provider, demand()).await.unwrap();
                    lat.push(t.elapsed());
                    assert!(
                        matches!(r, MarketResponse::Proposal { .. }),
                        "expected an accept: {r:?}"
                    );
                }
                lat
            }));
        }
        barrier.wait().await;
        let start = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        (all, start.elapsed())
    });
    let (mut lat, wall) = results;
    lat.sort();
    let n = lat.len();
    println!("negotiation (accepted demands, RSA-2048 chain, sha256, loopback TCP+noise+yamux):");
    println!(
        "  {clients} requestors x {per_client} demands = {n} round trips in {:.2} s: {:.0} demands/s",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "  latency p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        lat[n - 1]
    );
}
