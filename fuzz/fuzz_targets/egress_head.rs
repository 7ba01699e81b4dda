//! The egress proxy's request side (`egress::serve_connection`): whatever bytes a payload
//! writes to its proxy connection — request heads (hyper's parser and the proxy's own
//! checks of the target, the `Host` header, upgrades), bodies, CONNECT tunnels and the
//! TLS ClientHello after them.
//!
//! No traffic leaves the process: the policy allows only IP-literal URLs, in ranges the
//! address policy then refuses, so every request ends in the proxy's own answer.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use egress::{AddressPolicy, AuditRecord, AuditSink, EgressPolicy, Limits, Proxy};
use libfuzzer_sys::fuzz_target;
use policies::{Mode, Outbound, WhitelistMatcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
struct Discard;

impl AuditSink for Discard {
    fn record(&self, record: AuditRecord) {
        // Every record names a decision; building it must not have panicked.
        assert!(!record.decision.is_empty());
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn proxy() -> Arc<Proxy> {
    let urls = [
        "http://192.0.2.1/api/",
        "https://192.0.2.1/",
        "ws://192.0.2.1:8080/socket",
        "wss://[2001:db8::1]/",
        "http://198.51.100.7:81/",
    ];
    let outbound = Outbound::Urls {
        protocols: vec!["http".into(), "https".into(), "ws".into(), "wss".into()],
        urls: urls
            .iter()
            .map(|u| url::Url::parse(u).expect("url"))
            .collect(),
    };
    let limits = Limits {
        idle_timeout: Duration::from_millis(200),
        connect_timeout: Duration::from_millis(200),
        max_header_bytes: 8 << 10,
        ..Limits::default()
    };
    let policy = EgressPolicy::new(
        "fuzz",
        &outbound,
        Mode::All,
        &WhitelistMatcher::new(&[]).expect("whitelist"),
        AddressPolicy::new(Vec::new()),
        limits,
    );
    Proxy::new(policy, Arc::new(Discard))
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let task = tokio::spawn(egress::serve_connection(server, proxy()));
        let writer = async {
            let _ = client.write_all(&data).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the proxy answers and closes within its idle timeout");
        if !answer.is_empty() {
            assert!(
                answer.starts_with(b"HTTP/1."),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the connection ends");
    });
});
