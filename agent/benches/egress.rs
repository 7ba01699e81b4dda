//! Egress proxy benchmark, all on loopback, in one run: the same clients and upstreams
//! measured directly (the limit), through a bare TCP relay (what any third hop costs on
//! this machine), through `provider egress serve` and through squid with an equivalent
//! allow ACL.
//!
//! Figures:
//! - CONNECT: one TLS session through a tunnel downloading `EGRESS_BENCH_CONNECT` bytes
//!   (default 1 GiB); MB/s.
//! - GET: plain-HTTP GETs of 256 MiB bodies on one keep-alive connection, `EGRESS_BENCH_GET`
//!   bytes in all (default 1 GiB); MB/s.
//! - small: 100-byte GETs, one keep-alive connection, one request at a time
//!   (`EGRESS_BENCH_SMALL` requests, default 20000); p50/p99 latency, and the latency the
//!   proxy adds over direct at the same percentile.
//! - rps: 100-byte GETs on 16 keep-alive connections at once for `EGRESS_BENCH_RPS_SECS`
//!   seconds (default 3); requests/s.
//!
//! Paths are interleaved within each of `EGRESS_BENCH_ROUNDS` rounds (default 3), so a
//! change in background load hits all paths alike; throughput figures are the median over
//! rounds, latency percentiles are over all requests. Setting a size to 0 skips that
//! figure; `EGRESS_BENCH_AUDIT=/dev/null` sends the proxy's audit lines nowhere, to see
//! what writing them costs; `EGRESS_BENCH_THREADS` sets the proxy's `--threads` (default 1).
//!
//! Run with `cargo bench -p provider --bench egress` (or `scripts/egress-bench.sh`); squid is
//! skipped with a note when `squid` is not installed.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 256 * 1024;
const SMALL: usize = 100;
const GET_BODY: u64 = 256 << 20;
const RPS_CONNS: usize = 16;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------
// Upstreams, on their own runtime thread

/// `size` bytes of one shared chunk, handed out without copying.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

struct Upstreams {
    http: SocketAddr,
    tls: SocketAddr,
    roots: rustls::RootCertStore,
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn start_upstreams() -> Upstreams {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let chunk = Bytes::from(vec![0x5a; CHUNK]);
            let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            let der = cert.cert.der().clone();
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(crypto())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![der.clone()], key)
                .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der).unwrap();
            tx.send(Upstreams {
                http: http.local_addr().unwrap(),
                tls: tls.local_addr().unwrap(),
                roots,
            })
            .unwrap();
            let http_chunk = chunk.clone();
            tokio::spawn(async move {
                loop {
                    let (s, _) = http.accept().await.unwrap();
                    let _ = s.set_nodelay(true);
                    let chunk = http_chunk.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<Incoming>| {
                            let n: u64 = req
                                .uri()
                                .path()
                                .strip_prefix("/size/")
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(SMALL as u64);
                            let body = Repeat {
                                chunk: chunk.clone(),
                                left: n,
                            };
                            async move { Ok::<_, Infallible>(Response::new(body)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            loop {
                let (s, _) = tls.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                let acceptor = acceptor.clone();
                let chunk = chunk.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(s).await else {
                        return;
                    };
                    // The client asks for a size (8 bytes, big-endian); we send that much.
                    let mut want = [0u8; 8];
                    if s.read_exact(&mut want).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(want);
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

// ---------------------------------------------------------------------------------------
// Proxies

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    /// A bare TCP forwarder per upstream (no HTTP, no policy): what any third hop costs.
    Relay {
        http: SocketAddr,
        tls: SocketAddr,
    },
    Proxy(SocketAddr),
}

struct Running {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ours(dir: &Path, up: &Upstreams) -> Running {
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"version":"0.1.0","createdAt":"2022-09-15T00:00:00Z","expiresAt":"2100-01-01T00:00:00Z",
"payload":[{{"urls":["https://example.com/image.tar.gz"],"hash":"sha3:{zero}"}}],
"compManifest":{{"version":"0.1.0","net":{{"inet":{{"out":{{"protocols":["http","https"],
"urls":["http://localhost:{http}/","https://localhost:{tls}"]}}}}}}}}}}"#,
            zero = "0".repeat(64),
            http = up.http.port(),
            tls = up.tls.port()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_provider"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "egress",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "all",
        ])
        .args(["--allow-cidr", "127.0.0.0/8", "--manifest"])
        .arg(&manifest)
        .arg("--threads")
        .arg(env_u64("EGRESS_BENCH_THREADS", 1).to_string())
        .arg("--audit")
        .arg(std::env::var_os("EGRESS_BENCH_AUDIT").map_or(dir.join("audit.jsonl"), Into::into))
        .stdout(Stdio::piped())
        .spawn()
        .expect("start provider egress serve");
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    // Keep draining what else it prints.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();
    Running {
        name: "provider egress",
        child,
        addr,
    }
}

fn start_squid(dir: &Path, up: &Upstreams) -> Option<Running> {
    let which = Command::new("squid").arg("-v").output();
    if !which.is_ok_and(|o| o.status.success()) {
        eprintln!("note: squid is not installed (apt-get install squid); skipping it");
        return None;
    }
    // A free port for squid: bind, read, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sq = dir.join("squid");
    std::fs::create_dir_all(&sq).unwrap();
    // Squid started as root drops to its own user; let it write its logs here.
    let _ = Command::new("chmod").arg("0777").arg(&sq).status();
    let conf = sq.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}
acl dst_ok dstdomain localhost
acl port_ok port {http} {tls}
http_access deny !port_ok
http_access allow dst_ok
http_access deny all
cache deny all
access_log stdio:{dir}/access.log
cache_log {dir}/cache.log
cache_store_log none
pid_filename {dir}/squid.pid
coredump_dir {dir}
hosts_file /etc/hosts
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
",
            http = up.http.port(),
            tls = up.tls.port(),
            dir = sq.display()
        ),
    )
    .unwrap();
    let child = Command::new("squid")
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start squid");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let running = Running {
        name: "squid",
        child,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            eprintln!("note: squid did not start; see {}/cache.log", sq.display());
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(running)
}

/// Starts a plain TCP forwarder for each upstream on its own thread (one core's worth, like
/// the proxy's default): the floor for any proxy on this machine.
fn start_relay(up: &Upstreams) -> Via {
    let (tx, rx) = std::sync::mpsc::channel();
    let targets = [up.http, up.tls];
    let builder = std::thread::Builder::new().name("relay".into());
    builder
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut addrs = Vec::new();
                for target in targets {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    addrs.push(l.local_addr().unwrap());
                    tokio::spawn(async move {
                        loop {
                            let (mut a, _) = l.accept().await.unwrap();
                            tokio::spawn(async move {
                                let mut b = TcpStream::connect(target).await.unwrap();
                                let _ = a.set_nodelay(true);
                                let _ = b.set_nodelay(true);
                                let _ = tokio::io::copy_bidirectional_with_sizes(
                                    &mut a, &mut b, 65536, 65536,
                                )
                                .await;
                            });
                        }
                    });
                }
                tx.send(Via::Relay {
                    http: addrs[0],
                    tls: addrs[1],
                })
                .unwrap();
                std::future::pending::<()>().await;
            });
        })
        .unwrap();
    rx.recv().unwrap()
}

// ---------------------------------------------------------------------------------------
// Clients

async fn tunnel(via: Via, target: SocketAddr) -> TcpStream {
    match via {
        Via::Direct | Via::Relay { .. } => {
            let target = match via {
                Via::Relay { tls, .. } => tls,
                _ => target,
            };
            let s = TcpStream::connect(target).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        }
        Via::Proxy(p) => {
            let mut s = TcpStream::connect(p).await.unwrap();
            s.set_nodelay(true).unwrap();
            let t = format!("localhost:{}", target.port());
            s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(
                    s.read(&mut b).await.unwrap(),
                    1,
                    "proxy closed during CONNECT"
                );
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head);
            assert!(
                head.split(' ').nth(1) == Some("200"),
                "CONNECT refused: {head}"
            );
            s
        }
    }
}

/// One TLS download of `size` bytes; returns seconds.
async fn connect_transfer(via: Via, up: &Upstreams, size: u64) -> f64 {
    let config = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(up.roots.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let start = Instant::now();
    let stream = tunnel(via, up.tls).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = connector.connect(name, stream).await.unwrap();
    s.write_all(&size.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < size {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "tunnel closed after {got} of {size} bytes");
        got += n as u64;
    }
    start.elapsed().as_secs_f64()
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_client(via: Via, up: &Upstreams) -> Sender {
    let addr = match via {
        Via::Direct => up.http,
        Via::Relay { http, .. } => http,
        Via::Proxy(p) => p,
    };
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get_request(via: Via, up: &Upstreams, path: &str) -> Request<Empty<Bytes>> {
    let host = format!("localhost:{}", up.http.port());
    let uri = match via {
        Via::Direct | Via::Relay { .. } => path.to_owned(),
        Via::Proxy(_) => format!("http://{host}{path}"),
    };
    Request::get(uri)
        .header("host", host)
        .body(Empty::new())
        .unwrap()
}

/// GETs of `GET_BODY` bytes until `total`; returns seconds.
async fn get_transfer(via: Via, up: &Upstreams, total: u64) -> f64 {
    let mut sender = http_client(via, up).await;
    let start = Instant::now();
    let mut got = 0u64;
    while got < total {
        let n = GET_BODY.min(total - got);
        sender.ready().await.unwrap();
        let resp = sender
            .send_request(get_request(via, up, &format!("/size/{n}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut this = 0u64;
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.unwrap().data_ref() {
                this += d.len() as u64;
            }
        }
        assert_eq!(this, n);
        got += n;
    }
    start.elapsed().as_secs_f64()
}

async fn small_get(sender: &mut Sender, req: Request<Empty<Bytes>>) {
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), SMALL);
}

/// Sequential small GETs; returns sorted latencies in microseconds.
async fn latencies(via: Via, up: &Upstreams, n: usize) -> Vec<f64> {
    let mut sender = http_client(via, up).await;
    for _ in 0..200 {
        small_get(&mut sender, get_request(via, up, "/small")).await;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let req = get_request(via, up, "/small");
        let t = Instant::now();
        small_get(&mut sender, req).await;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    out.sort_by(|a, b| a.partial_cmp(b).unwrap());
    out
}

/// Small GETs on `RPS_CONNS` connections for `secs`; returns requests/s.
async fn rps(via: Via, up: &Upstreams, secs: u64) -> f64 {
    let up = Arc::new(Upstreams {
        http: up.http,
        tls: up.tls,
        roots: up.roots.clone(),
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..RPS_CONNS {
        let up = up.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = http_client(via, &up).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                small_get(&mut sender, get_request(via, &up, "/small")).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Default)]
struct Figures {
    connect: Vec<f64>,
    get: Vec<f64>,
    latencies: Vec<f64>,
    rps: Vec<f64>,
}

/// Runs every figure for every path in rounds, paths interleaved within each round, so a
/// change in background load hits all paths alike instead of whichever ran last.
async fn run(paths: &[(&'static str, Via)], up: &Upstreams) -> Vec<Figures> {
    let connect_bytes = env_u64("EGRESS_BENCH_CONNECT", 1 << 30);
    let get_bytes = env_u64("EGRESS_BENCH_GET", 1 << 30);
    let small = env_u64("EGRESS_BENCH_SMALL", 20_000) as usize;
    let secs = env_u64("EGRESS_BENCH_RPS_SECS", 3);
    let rounds = env_u64("EGRESS_BENCH_ROUNDS", 3) as usize;
    let mb = |bytes: u64, s: f64| bytes as f64 / s / 1e6;
    let mut figs: Vec<Figures> = paths.iter().map(|_| Figures::default()).collect();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (i, (_, via)) in paths.iter().enumerate() {
            if connect_bytes > 0 {
                let t = connect_transfer(*via, up, connect_bytes).await;
                figs[i].connect.push(mb(connect_bytes, t));
            }
        }
        for (i, (_, via)) in paths.iter().enumerate() {
            if get_bytes > 0 {
                let t = get_transfer(*via, up, get_bytes).await;
                figs[i].get.push(mb(get_bytes, t));
            }
        }
        for (i, (_, via)) in paths.iter().enumerate() {
            if small > 0 {
                let l = latencies(*via, up, small / rounds).await;
                figs[i].latencies.extend(l);
            }
        }
        for (i, (_, via)) in paths.iter().enumerate() {
            if secs > 0 {
                figs[i].rps.push(rps(*via, up, secs).await);
            }
        }
    }
    for f in &mut figs {
        f.latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    figs
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` passes nothing and
    // should not spend a minute here.
    if !std::env::args().any(|a| a == "--bench") {
        println!("egress bench: run with `cargo bench -p provider --bench egress`");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = start_upstreams();
    let ours = start_ours(dir.path(), &up);
    let squid = start_squid(dir.path(), &up);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let relay = start_relay(&up);
    let mut paths = vec![
        ("direct", Via::Direct),
        ("tcp relay", relay),
        (ours.name, Via::Proxy(ours.addr)),
    ];
    if let Some(s) = &squid {
        paths.push((s.name, Via::Proxy(s.addr)));
    }
    eprintln!(
        "egress bench: loopback, {} CPUs, paths interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let figs = rt.block_on(run(&paths, &up));
    let d = &figs[0];
    let pct = |v: f64, base: f64| if base > 0.0 { 100.0 * v / base } else { 0.0 };
    let stat = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            median(v.to_vec())
        }
    };
    let pc = |v: &[f64], p: f64| if v.is_empty() { 0.0 } else { percentile(v, p) };
    println!();
    println!(
        "{:<16} {:>16} {:>16} {:>8} {:>8} {:>8} {:>8} {:>16}",
        "path", "CONNECT MB/s", "GET MB/s", "p50 us", "p99 us", "+p50 us", "+p99 us", "req/s"
    );
    for ((name, _), f) in paths.iter().zip(&figs) {
        println!(
            "{:<16} {:>9.0} ({:>3.0}%) {:>9.0} ({:>3.0}%) {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.0} ({:>3.0}%)",
            name,
            stat(&f.connect),
            pct(stat(&f.connect), stat(&d.connect)),
            stat(&f.get),
            pct(stat(&f.get), stat(&d.get)),
            pc(&f.latencies, 0.5),
            pc(&f.latencies, 0.99),
            pc(&f.latencies, 0.5) - pc(&d.latencies, 0.5),
            pc(&f.latencies, 0.99) - pc(&d.latencies, 0.99),
            stat(&f.rps),
            pct(stat(&f.rps), stat(&d.rps)),
        );
    }
    drop(squid);
    drop(ours);
}
