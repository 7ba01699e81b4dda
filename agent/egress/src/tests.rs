//! The proxy end to end on loopback: local upstreams (plain HTTP, TLS, WebSocket), a
//! proxy per test, real sockets. Every defence has a test whose allowed twin succeeds, so
//! the refusal is the defence's doing and not an unreachable upstream's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

use super::*;
use policies::{Mode, Outbound, WhitelistMatcher};

/// Every wait in these tests is bounded by this; nothing is timed.
const BOUND: Duration = Duration::from_secs(20);

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("bounded step took too long")
}

// ---------------------------------------------------------------------------------------
// Upstreams

/// A plain HTTP upstream: `/size/N` answers N pattern bytes, `/echo` returns the request
/// body, `/redirect` points elsewhere, `/socket` upgrades to an echoing WebSocket-ish
/// stream, anything else answers with the Host header and path it saw.
struct HttpUpstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn http_upstream() -> HttpUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    upstream_route(req)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    HttpUpstream { addr, hits }
}

async fn upstream_route(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(n) = path.strip_prefix("/size/") {
        let n: usize = n.parse().unwrap();
        return Ok(Response::new(Full::new(Bytes::from(pattern(n, 7)))));
    }
    if path == "/echo" {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        return Ok(Response::new(Full::new(body)));
    }
    if path == "/redirect" {
        let location = req.uri().query().unwrap_or("").to_owned();
        return Ok(Response::builder()
            .status(StatusCode::FOUND)
            .header("location", location)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if path == "/socket" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.unwrap());
            let mut buf = vec![0u8; 4096];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(Response::new(Full::new(Bytes::from(format!(
        "host={host} path={path}"
    )))))
}

/// A TLS upstream for `localhost` and `other.example`: reads until the client's half-close,
/// then sends back everything it read, then closes.
struct TlsUpstream {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    roots: rustls::RootCertStore,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn tls_upstream() -> TlsUpstream {
    let cert = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "other.example".to_owned(),
    ])
    .unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counter = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut got = Vec::new();
                if tls.read_to_end(&mut got).await.is_err() {
                    return;
                }
                let _ = tls.write_all(&got).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsUpstream {
        addr,
        handshakes,
        roots,
    }
}

// ---------------------------------------------------------------------------------------
// The proxy

fn manifest(urls: &[String]) -> Outbound {
    Outbound::Urls {
        protocols: vec!["http".into(), "https".into(), "ws".into(), "wss".into()],
        urls: urls.iter().map(|u| Url::parse(u).unwrap()).collect(),
    }
}

struct TestProxy {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    audit: Arc<Records>,
}

/// The test's sink: every record, in memory.
#[derive(Debug, Default)]
struct Records(std::sync::Mutex<Vec<AuditRecord>>);

impl AuditSink for Records {
    fn record(&self, record: AuditRecord) {
        self.0.lock().unwrap().push(record);
    }
}

impl Records {
    fn records(&self) -> Vec<AuditRecord> {
        self.0.lock().unwrap().clone()
    }
}

async fn start(outbound: Outbound, allow: &[&str], limits: Limits) -> TestProxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_on(listener, outbound, allow, limits).await
}

async fn start_on(
    listener: TcpListener,
    outbound: Outbound,
    allow: &[&str],
    limits: Limits,
) -> TestProxy {
    let addr = listener.local_addr().unwrap();
    let policy = EgressPolicy::new(
        "job-1",
        &outbound,
        Mode::All,
        &WhitelistMatcher::new(&[]).unwrap(),
        AddressPolicy::new(allow.iter().map(|c| c.parse().unwrap()).collect()),
        limits,
    );
    let audit = Arc::new(Records::default());
    let proxy = Proxy::new(policy, audit.clone());
    tokio::spawn(serve_listener(listener, proxy.clone()));
    TestProxy { addr, proxy, audit }
}

const LOOPBACK: &[&str] = &["127.0.0.0/8"];

impl TestProxy {
    /// Waits until an audit line satisfies `f` (allow lines are written at close, after
    /// the client already has its answer).
    async fn audited(&self, f: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
        bounded(async {
            loop {
                if let Some(r) = self.audit.records().into_iter().find(|r| f(r)) {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    async fn denied(&self, rule: &str) -> AuditRecord {
        self.audited(|r| r.decision == "deny" && r.rule == rule)
            .await
    }
}

// ---------------------------------------------------------------------------------------
// Clients

/// Sends one request through the proxy on a new connection; returns status, the deny code
/// header and the body.
async fn send(proxy: SocketAddr, req: Request<Full<Bytes>>) -> (StatusCode, Option<String>, Bytes) {
    bounded(async {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-egress-deny")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, code, body)
    })
    .await
}

async fn get(proxy: SocketAddr, uri: &str) -> (StatusCode, Option<String>, Bytes) {
    let host = Url::parse(uri).unwrap();
    let host = match host.port() {
        Some(p) => format!("{}:{p}", host.host_str().unwrap()),
        None => host.host_str().unwrap().to_owned(),
    };
    let req = Request::get(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(proxy, req).await
}

/// Writes raw bytes on a new connection; returns everything the proxy sent until it
/// closed the connection.
async fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    bounded(async {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        // The proxy may answer and close before it read all of a huge request.
        let _ = s.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

/// Reads a response head byte by byte (so nothing after it is consumed).
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Sends `CONNECT target` and returns the stream and the response head.
async fn connect(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
    bounded(async {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        (s, head)
    })
    .await
}

async fn tls_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    roots: &rustls::RootCertStore,
    name: &str,
    sni: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.enable_sni = sni;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    connector.connect(name, stream).await
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Allowed traffic passes unchanged

#[tokio::test]
async fn plain_http_large_bodies_pass_unchanged_both_ways() {
    let up = http_upstream().await;
    let p = start(
        manifest(&[format!("http://localhost:{}/", up.addr.port())]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let body = pattern(8 << 20, 42);
    let req = Request::post(format!("http://localhost:{}/echo", up.addr.port()))
        .header("host", format!("localhost:{}", up.addr.port()))
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let (status, _, echoed) = send(p.addr, req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(echoed[..] == body[..], "echoed body differs");

    let (status, _, got) = get(
        p.addr,
        &format!("http://localhost:{}/size/5000001", up.addr.port()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        got[..] == pattern(5_000_001, 7)[..],
        "downloaded body differs"
    );

    let r = p
        .audited(|r| r.decision == "allow" && r.destination.ends_with("/echo"))
        .await;
    assert_eq!((r.bytes_up, r.bytes_down), (8 << 20, 8 << 20));
    assert_eq!(r.rule, format!("http://localhost:{}/", up.addr.port()));
    assert_eq!(r.resolved, Some(up.addr.to_string()));
    assert_eq!(r.job, "job-1");
    let r = p
        .audited(|r| r.decision == "allow" && r.destination.ends_with("/size/5000001"))
        .await;
    assert_eq!((r.bytes_up, r.bytes_down, r.status), (0, 5_000_001, 200));
}

#[tokio::test]
async fn keep_alive_requests_reuse_one_upstream_connection_and_each_is_checked() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/ok")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    bounded(async {
        let stream = TcpStream::connect(p.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        for (path, want) in [("/ok/1", 200), ("/ok/2", 200), ("/no", 403), ("/ok/3", 200)] {
            let req = Request::get(format!("http://localhost:{port}{path}"))
                .header("host", format!("localhost:{port}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), want, "{path}");
            resp.into_body().collect().await.unwrap();
        }
    })
    .await;
    assert_eq!(up.hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        p.denied("path-not-allowed").await.destination,
        format!("http://localhost:{port}/no")
    );
}

#[tokio::test]
async fn connect_tls_passes_bytes_unchanged_with_half_close() {
    let tls = tls_upstream().await;
    let target = format!("localhost:{}", tls.addr.port());
    let p = start(
        manifest(&[format!("https://{target}")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let (stream, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 200, "{head}");
    let data = pattern(6 << 20, 9);
    let back = bounded(async {
        let mut s = tls_client(stream, &tls.roots, "localhost", true)
            .await
            .unwrap();
        s.write_all(&data).await.unwrap();
        // close_notify and FIN: the upstream only answers after it saw the end.
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    })
    .await;
    assert!(back == data, "echoed tunnel bytes differ");
    let r = p
        .audited(|r| r.decision == "allow" && r.method == "CONNECT")
        .await;
    assert_eq!(r.destination, target);
    assert_eq!(r.rule, format!("https://{target}/"));
    assert!(r.bytes_up > 6 << 20 && r.bytes_down > 6 << 20, "{r:?}");
    assert_eq!(r.reason, "");
    assert_eq!(p.proxy.bytes_used(), r.bytes_up + r.bytes_down);
}

#[tokio::test]
async fn websocket_upgrade_is_relayed_for_a_ws_url() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("ws://localhost:{port}/socket")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    // Both spellings a client may use for the request target.
    for scheme in ["http", "ws"] {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let req = format!(
            "GET {scheme}://localhost:{port}/socket HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
        let echoed = bounded(async {
            s.write_all(req.as_bytes()).await.unwrap();
            let head = read_head(&mut s).await;
            assert_eq!(status_of(&head), 101, "{head}");
            s.write_all(b"ping through the proxy").await.unwrap();
            let mut buf = [0u8; 22];
            s.read_exact(&mut buf).await.unwrap();
            buf
        })
        .await;
        assert_eq!(&echoed, b"ping through the proxy");
        drop(s);
        let destination = format!("{scheme}://localhost:{port}/socket");
        let r = p
            .audited(|r| r.decision == "allow" && r.destination == destination)
            .await;
        assert_eq!((r.bytes_up, r.bytes_down), (22, 22));
    }
    // A plain GET of the same URL is not what a ws:// URL allows.
    let (status, code, _) = get(p.addr, &format!("http://localhost:{port}/socket")).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (403, Some("wrong-scheme"))
    );
}

// ---------------------------------------------------------------------------------------
// Each defence

#[tokio::test]
async fn unlisted_host_is_refused() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let (status, code, body) = get(p.addr, &format!("http://unlisted.localhost:{port}/")).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (403, Some("not-listed"))
    );
    assert!(String::from_utf8_lossy(&body).contains("unlisted.localhost is not listed"));
    let (_, head) = connect(p.addr, &format!("unlisted.localhost:{port}")).await;
    assert_eq!(status_of(&head), 403);
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // The allowed twin.
    assert_eq!(
        get(p.addr, &format!("http://localhost:{port}/")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn listed_host_on_the_wrong_port_or_scheme_is_refused() {
    let listed = http_upstream().await;
    let other = http_upstream().await;
    let tls = tls_upstream().await;
    let p = start(
        manifest(&[
            format!("http://localhost:{}/", listed.addr.port()),
            format!("https://localhost:{}", tls.addr.port()),
        ]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let (status, code, _) = get(p.addr, &format!("http://localhost:{}/", other.addr.port())).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (403, Some("wrong-port"))
    );
    assert_eq!(other.hits.load(Ordering::SeqCst), 0);
    // CONNECT to the plain-HTTP port: an http URL allows no tunnel.
    let (_, head) = connect(p.addr, &format!("localhost:{}", listed.addr.port())).await;
    assert_eq!(status_of(&head), 403, "{head}");
    assert!(head.contains("x-egress-deny: wrong-scheme"), "{head}");
    // Plain HTTP to the https URL's port.
    let (status, code, _) = get(p.addr, &format!("http://localhost:{}/", tls.addr.port())).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (403, Some("wrong-scheme"))
    );
    // Absolute-form https: the proxy does not originate TLS.
    let (status, _, _) = get(p.addr, &format!("https://localhost:{}/", tls.addr.port())).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(listed.hits.load(Ordering::SeqCst), 0);
    assert_eq!(tls.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(
        get(p.addr, &format!("http://localhost:{}/", listed.addr.port()))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn ip_literal_of_an_allowed_host_is_refused() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    for uri in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let (status, code, _) = get(p.addr, &uri).await;
        assert_eq!(
            (status.as_u16(), code.as_deref()),
            (403, Some("ip-literal")),
            "{uri}"
        );
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // An IP-literal URL allows exactly its literal.
    let p = start(
        manifest(&[format!("http://127.0.0.1:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    assert_eq!(
        get(p.addr, &format!("http://127.0.0.1:{port}/")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn listed_name_resolving_to_loopback_needs_an_allowed_cidr() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let urls = [
        format!("http://localhost:{port}/"),
        format!("https://localhost:{port}"),
    ];
    let p = start(manifest(&urls), &[], Limits::default()).await;
    let (status, code, body) = get(p.addr, &format!("http://localhost:{port}/")).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (403, Some("address-denied"))
    );
    assert!(
        String::from_utf8_lossy(&body).contains("loopback"),
        "{body:?}"
    );
    let (_, head) = connect(p.addr, &format!("localhost:{port}")).await;
    assert_eq!(status_of(&head), 403);
    let r = p.denied("address-denied").await;
    assert_eq!(r.resolved, Some(format!("127.0.0.1:{port}")));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // A CIDR for another range does not help; the right one does.
    let p = start(
        manifest(&urls),
        &["10.0.0.0/8", "::1/128"],
        Limits::default(),
    )
    .await;
    assert_eq!(
        get(p.addr, &format!("http://localhost:{port}/"))
            .await
            .0
            .as_u16(),
        403
    );
    let p = start(manifest(&urls), &["127.0.0.1/32"], Limits::default()).await;
    assert_eq!(
        get(p.addr, &format!("http://localhost:{port}/")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn ipv4_mapped_literal_of_a_denied_address_is_refused() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("http://[::ffff:7f00:2]:{port}/"),
        ]),
        // Loopback is open in its IPv4 form; the mapped form stays closed.
        LOOPBACK,
        Limits::default(),
    )
    .await;
    for host in ["[::ffff:127.0.0.1]", "[::ffff:7f00:2]"] {
        let (status, code, _) = get(p.addr, &format!("http://{host}:{port}/")).await;
        assert_eq!(
            (status.as_u16(), code.as_deref()),
            (403, Some("address-denied")),
            "{host}"
        );
    }
    assert!(p
        .denied("address-denied")
        .await
        .reason
        .contains("IPv4-mapped"));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn sni_must_name_the_connect_host() {
    let tls = tls_upstream().await;
    let target = format!("localhost:{}", tls.addr.port());
    let p = start(
        manifest(&[format!("https://{target}")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;

    // The certificate is valid for other.example too: only the proxy stands in the way.
    let (stream, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 200);
    let err = bounded(tls_client(stream, &tls.roots, "other.example", true))
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("access"), "{err}");
    let r = p.denied("sni-mismatch").await;
    assert!(r.reason.contains("other.example"), "{r:?}");

    // No SNI at all, for a host name.
    let (stream, _) = connect(p.addr, &target).await;
    assert!(bounded(tls_client(stream, &tls.roots, "localhost", false))
        .await
        .is_err());
    let r = p
        .audited(|r| r.rule == "sni-mismatch" && r.reason.contains("names no server"))
        .await;
    assert_eq!(r.decision, "deny");

    // Not TLS at all.
    let (mut stream, _) = connect(p.addr, &target).await;
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = bounded(stream.read_to_end(&mut rest)).await;
    p.denied("not-tls").await;
    assert_eq!(tls.handshakes.load(Ordering::SeqCst), 0);

    // The allowed twin.
    let (stream, _) = connect(p.addr, &target).await;
    let mut s = bounded(tls_client(stream, &tls.roots, "localhost", true))
        .await
        .unwrap();
    bounded(async {
        s.write_all(b"hi").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hi");
    })
    .await;
}

#[tokio::test]
async fn host_header_must_name_the_uri_host() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    for host in [
        "other.example".to_owned(),
        format!("localhost:{}", port + 1),
        "localhost".to_owned(),
    ] {
        let req = Request::get(format!("http://localhost:{port}/"))
            .header("host", &host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, code, _) = send(p.addr, req).await;
        assert_eq!(
            (status.as_u16(), code.as_deref()),
            (403, Some("host-mismatch")),
            "{host}"
        );
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // Matching Host (any case), and none at all (HTTP/1.0 style: the proxy adds it).
    let req = Request::get(format!("http://localhost:{port}/x"))
        .header("host", format!("LocalHost:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(p.addr, req).await.0, StatusCode::OK);
    let out = raw(
        p.addr,
        format!("GET http://localhost:{port}/y HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(
        out.ends_with(&format!("host=localhost:{port} path=/y")),
        "{out}"
    );
}

#[tokio::test]
async fn requests_to_the_proxy_itself_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let me = listener.local_addr().unwrap();
    let p = start_on(
        listener,
        manifest(&[
            format!("http://127.0.0.1:{}/", me.port()),
            format!("https://localhost:{}", me.port()),
        ]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let (status, code, _) = get(p.addr, &format!("http://127.0.0.1:{}/", me.port())).await;
    assert_eq!((status.as_u16(), code.as_deref()), (403, Some("self")));
    let (_, head) = connect(p.addr, &format!("localhost:{}", me.port())).await;
    assert!(head.contains("x-egress-deny: self"), "{head}");
    // And a request that already went through (another instance of) this proxy.
    let up = http_upstream().await;
    let p = start(
        manifest(&[format!("http://localhost:{}/", up.addr.port())]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let req = Request::get(format!("http://localhost:{}/", up.addr.port()))
        .header("host", format!("localhost:{}", up.addr.port()))
        .header("via", "1.1 provider-egress")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(p.addr, req).await.1.as_deref(), Some("loop"));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn redirects_are_passed_to_the_client_not_followed() {
    let up = http_upstream().await;
    let elsewhere = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let target = format!("http://localhost:{}/secret", elsewhere.addr.port());
    let req = Request::get(format!("http://localhost:{port}/redirect?{target}"))
        .header("host", format!("localhost:{port}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    bounded(async {
        let stream = TcpStream::connect(p.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FOUND);
        assert_eq!(resp.headers()["location"], target.as_str());
    })
    .await;
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
    // Following it is a request of its own, and it is not listed.
    assert_eq!(get(p.addr, &target).await.1.as_deref(), Some("wrong-port"));
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
}

/// Sends one raw request head on a new connection and returns the response head (and
/// nothing after it, so an upgraded stream stays unread).
async fn raw_head(proxy: SocketAddr, head: &str) -> String {
    bounded(async {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        read_head(&mut s).await
    })
    .await
}

#[tokio::test]
async fn path_tricks_below_a_prefix_are_refused_before_the_upstream() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/allowed/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let request = |path: &str| {
        format!(
            "GET http://localhost:{port}{path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
        )
    };
    for path in [
        "/allowed/%2e%2e/admin",
        "/allowed/%252e%252e/admin",
        "/allowed/%252E%252E%252Fadmin",
        "/allowed/..;/admin",
        "/allowed/..;foo/admin",
        "/allowed/.;x/admin",
        "/allowed/%c0%ae%c0%ae/admin",
        "/allowed/..%c0%afadmin",
        "/allowed/%e0%80%ae%e0%80%ae/admin",
    ] {
        let out = raw(p.addr, request(path).as_bytes()).await;
        assert_eq!(status_of(&out), 403, "{path}: {out}");
        assert!(
            out.contains("x-egress-deny: path-not-allowed"),
            "{path}: {out}"
        );
        let destination = format!("http://localhost:{port}{path}");
        let r = p
            .audited(|r| r.decision == "deny" && r.destination == destination)
            .await;
        assert_eq!((r.rule.as_str(), r.status), ("path-not-allowed", 403));
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // Ordinary names pass, unchanged.
    for path in [
        "/allowed/a%20b.txt",
        "/allowed/file.tar.gz",
        "/allowed/v1.2/x",
        "/allowed/caf%C3%A9/%E2%82%AC.txt",
        "/allowed/100%25.txt",
    ] {
        let out = raw(p.addr, request(path).as_bytes()).await;
        assert_eq!(status_of(&out), 200, "{path}: {out}");
        assert!(out.ends_with(&format!("path={path}")), "{path}: {out}");
    }
}

/// A request head of exactly `len` bytes: the request line, Host, and one `X-Fill` header
/// that makes up the rest.
fn head_of_len(port: u16, len: usize) -> String {
    let start = format!(
        "GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nX-Fill: "
    );
    let end = "\r\n\r\n";
    let fill = len - start.len() - end.len();
    let head = format!("{start}{}{end}", "a".repeat(fill));
    assert_eq!(head.len(), len);
    head
}

#[tokio::test]
async fn request_heads_over_the_limit_get_431_and_an_audit_line() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let limit = Limits::default().max_header_bytes;
    assert_eq!(limit, 64 << 10);
    // One 100 KiB header.
    let out = raw(p.addr, head_of_len(port, 100 << 10).as_bytes()).await;
    assert_eq!(status_of(&out), 431, "{}", &out[..out.len().min(200)]);
    let r = p.denied("head-too-large").await;
    assert_eq!(r.status, 431);
    // One byte over the limit, and many headers that add up to more.
    let out = raw(p.addr, head_of_len(port, limit + 1).as_bytes()).await;
    assert_eq!(status_of(&out), 431, "{}", &out[..out.len().min(200)]);
    let mut many = format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n");
    for i in 0..90 {
        many.push_str(&format!("X-Part-{i}: {}\r\n", "b".repeat(1000)));
    }
    many.push_str("\r\n");
    let out = raw(p.addr, many.as_bytes()).await;
    assert_eq!(status_of(&out), 431, "{}", &out[..out.len().min(200)]);
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    // Exactly the limit passes.
    let out = raw(p.addr, head_of_len(port, limit).as_bytes()).await;
    assert_eq!(status_of(&out), 200, "{}", &out[..out.len().min(200)]);
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upgrades_are_refused_unless_a_ws_url_allows_them() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[
            format!("http://127.0.0.1:{port}/"),
            format!("http://localhost:{port}/"),
            format!("ws://localhost:{port}/socket"),
        ]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\n";
    for (line, headers) in [
        // A WebSocket upgrade where only plain HTTP is listed.
        (format!("GET http://127.0.0.1:{port}/"), ws.to_owned()),
        (format!("GET ws://127.0.0.1:{port}/"), ws.to_owned()),
        // Other protocols, even where a ws URL is listed.
        (
            format!("GET http://localhost:{port}/"),
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n".to_owned(),
        ),
        (
            format!("GET http://localhost:{port}/socket"),
            "Connection: Upgrade\r\nUpgrade: tls/1.3\r\n".to_owned(),
        ),
        // Not a WebSocket handshake: no `Connection: upgrade`, not a GET.
        (
            format!("GET http://localhost:{port}/socket"),
            "Upgrade: websocket\r\n".to_owned(),
        ),
        (format!("POST http://localhost:{port}/socket"), ws.to_owned()),
    ] {
        let host = line.split('/').nth(2).unwrap();
        let head = raw_head(
            p.addr,
            &format!("{line} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n{headers}\r\n"),
        )
        .await;
        assert_eq!(status_of(&head), 403, "{line} {headers}: {head}");
        assert!(
            head.contains("x-egress-deny: upgrade-not-allowed"),
            "{line} {headers}: {head}"
        );
    }
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);
    let r = p.denied("upgrade-not-allowed").await;
    assert_eq!(r.status, 403);
    // The allowed twins: a plain GET where plain HTTP is listed, an upgrade where ws is.
    assert_eq!(
        get(p.addr, &format!("http://127.0.0.1:{port}/")).await.0,
        StatusCode::OK
    );
    let head = raw_head(
        p.addr,
        &format!(
            "GET http://localhost:{port}/socket HTTP/1.1\r\nHost: localhost:{port}\r\n{ws}\r\n"
        ),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
}

/// An upstream that answers every request with `101 Switching Protocols` (to `protocol`)
/// and then bytes of that protocol.
async fn switching_upstream(protocol: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut b = [0u8; 1];
                while !got.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    got.push(b[0]);
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: {protocol}\r\n\r\nsmuggled"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_101_nobody_asked_for_is_refused() {
    let h2c = switching_upstream("h2c").await;
    let p = start(
        manifest(&[
            format!("http://localhost:{}/", h2c.port()),
            format!("ws://localhost:{}/socket", h2c.port()),
        ]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    // A plain request, and a WebSocket upgrade answered with another protocol.
    for (path, headers) in [
        ("/", ""),
        ("/socket", "Connection: Upgrade\r\nUpgrade: websocket\r\n"),
    ] {
        let head = raw_head(
            p.addr,
            &format!(
                "GET http://localhost:{port}{path} HTTP/1.1\r\nHost: localhost:{port}\r\n{headers}\r\n",
                port = h2c.port()
            ),
        )
        .await;
        assert_eq!(status_of(&head), 502, "{path}: {head}");
        assert!(
            head.contains("x-egress-deny: unrequested-upgrade"),
            "{head}"
        );
        let destination = format!("http://localhost:{}{path}", h2c.port());
        let r = p
            .audited(|r| r.rule == "unrequested-upgrade" && r.destination == destination)
            .await;
        assert_eq!((r.decision.as_str(), r.status), ("deny", 502));
    }
    // The twin: the same kind of upstream switching to websocket, as asked.
    let ws = switching_upstream("websocket").await;
    let p = start(
        manifest(&[format!("ws://localhost:{}/socket", ws.port())]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let head = raw_head(
        p.addr,
        &format!(
            "GET http://localhost:{port}/socket HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            port = ws.port()
        ),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
}

// ---------------------------------------------------------------------------------------
// Bad input never stops the proxy

#[tokio::test]
async fn bad_input_gets_an_error_status_and_the_proxy_keeps_serving() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let p = start(
        manifest(&[
            format!("http://localhost:{port}/"),
            format!("https://localhost:{port}"),
        ]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    let out = raw(p.addr, b"\x16\x03\x01garbage that is not HTTP\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Refused by the HTTP parser, before there is a destination: audited all the same.
    let r = p
        .audited(|r| r.rule == "bad-request" && r.reason.contains("could not be parsed"))
        .await;
    assert_eq!((r.decision.as_str(), r.status), ("deny", 400));

    let mut line = b"GET http://localhost/".to_vec();
    line.extend(std::iter::repeat_n(b'a', 1 << 20));
    line.extend(b" HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let out = raw(p.addr, &line).await;
    let status = status_of(&out);
    assert!(status == 414 || status == 431, "{out}");

    let out = raw(
        p.addr,
        b"CONNECT localhost HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("has no port"), "{out}");

    let out = raw(
        p.addr,
        b"GET /origin/form HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    let out = raw(
        p.addr,
        format!("GET http://user@localhost:{port}/ HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    let out = raw(p.addr, b"\0\0\0\0\0\0\0\0\0\0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    assert_eq!(
        get(p.addr, &format!("http://localhost:{port}/")).await.0,
        StatusCode::OK
    );
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn concurrent_tunnels_are_limited_per_job() {
    let tls = tls_upstream().await;
    let target = format!("localhost:{}", tls.addr.port());
    let limits = Limits {
        max_tunnels: 1,
        ..Limits::default()
    };
    let p = start(manifest(&[format!("https://{target}")]), LOOPBACK, limits).await;
    let (first, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 200);
    let (_, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 429, "{head}");
    assert!(head.contains("too-many-tunnels"), "{head}");
    // Closing the first frees the slot.
    drop(first);
    p.audited(|r| r.method == "CONNECT" && r.rule == "not-tls")
        .await;
    let (_, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 200, "{head}");
}

#[tokio::test]
async fn the_byte_budget_cuts_transfers_and_refuses_new_ones() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let limits = Limits {
        max_bytes: 1 << 20,
        ..Limits::default()
    };
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        limits,
    )
    .await;
    let failed = bounded(async {
        let stream = TcpStream::connect(p.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("http://localhost:{port}/size/{}", 4 << 20))
            .header("host", format!("localhost:{port}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        resp.into_body().collect().await.is_err()
    })
    .await;
    assert!(failed, "a 4 MiB body passed a 1 MiB budget");
    let (status, code, _) = get(p.addr, &format!("http://localhost:{port}/")).await;
    assert_eq!(
        (status.as_u16(), code.as_deref()),
        (503, Some("byte-budget"))
    );
    let r = p.audited(|r| r.decision == "allow").await;
    assert!(r.reason.contains("budget"), "{r:?}");
    assert!(r.bytes_down < 4 << 20, "{r:?}");
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let tls = tls_upstream().await;
    let target = format!("localhost:{}", tls.addr.port());
    let limits = Limits {
        idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = start(manifest(&[format!("https://{target}")]), LOOPBACK, limits).await;
    let (stream, head) = connect(p.addr, &target).await;
    assert_eq!(status_of(&head), 200);
    let mut s = bounded(tls_client(stream, &tls.roots, "localhost", true))
        .await
        .unwrap();
    // Send nothing: the upstream waits for our end, we wait for its answer.
    let mut buf = Vec::new();
    let _ = bounded(s.read_to_end(&mut buf)).await;
    let r = p.audited(|r| r.decision == "allow").await;
    assert!(r.reason.contains("idle"), "{r:?}");
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let up = http_upstream().await;
    let port = up.addr.port();
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        limits,
    )
    .await;
    // Hold the only slot with an open connection that has sent a complete request.
    let mut held = TcpStream::connect(p.addr).await.unwrap();
    held.write_all(
        format!("GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = bounded(read_head(&mut held)).await;
    assert_eq!(status_of(&head), 200);
    let out = raw(p.addr, b"GET http://localhost/ HTTP/1.1\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    p.denied("too-many-connections").await;
}

/// Fault campaign (docs/robustness.md): an upstream that resets the connection in the
/// middle of a response body, a few times over. The client gets the bytes that came and
/// then an error (never a body that looks complete), the transfer is audited with the bytes
/// that did pass, and the proxy serves the next request on a new connection.
#[tokio::test]
async fn an_upstream_reset_mid_body_cuts_the_response_and_the_proxy_carries_on() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /whole") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwhole")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                    .await;
                let _ = s.write_all(&pattern(3000, 9)).await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                // SO_LINGER 0: the close sends a RST, not a FIN.
                s.set_zero_linger().unwrap();
                drop(s);
            });
        }
    });
    let p = start(
        manifest(&[format!("http://localhost:{port}/")]),
        LOOPBACK,
        Limits::default(),
    )
    .await;
    for round in 0..3 {
        bounded(async {
            let stream = TcpStream::connect(p.addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("http://localhost:{port}/cut"))
                .header("host", format!("localhost:{port}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "round {round}");
            let mut body = resp.into_body();
            let mut got = 0usize;
            let outcome = loop {
                match body.frame().await {
                    Some(Ok(f)) => got += f.data_ref().map_or(0, |d| d.len()),
                    Some(Err(e)) => break Err(e),
                    None => break Ok(()),
                }
            };
            assert!(
                outcome.is_err(),
                "round {round}: a cut body looked complete ({got} bytes)"
            );
            assert!(got <= 3000, "round {round}: {got} bytes");
        })
        .await;
    }
    let r = p
        .audited(|r| r.decision == "allow" && r.destination.ends_with("/cut"))
        .await;
    assert!(r.bytes_down <= 3000, "{r:?}");
    let (status, _, body) = get(p.addr, &format!("http://localhost:{port}/whole")).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"whole"[..]));
}
