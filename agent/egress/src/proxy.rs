//! The proxy service: one job's [`Proxy`], served over any byte stream.
//!
//! Order of checks for every request, cheapest and least revealing first: the request's
//! form (absolute-form or CONNECT with a port), `Host` against the URI, upgrades (only a
//! WebSocket handshake), loops, the allowlist, the job's limits; then the name is resolved once, every resolved address is
//! checked (against the proxy's own addresses and the denied ranges), and only a checked
//! address is dialed. A CONNECT tunnel then waits for the client's TLS ClientHello and
//! forwards nothing until its SNI names the CONNECT host. An upstream's `101` is passed on
//! only in answer to an allowed WebSocket handshake. Redirects are passed to the
//! client untouched: the proxy never follows them, the client's next request is checked on
//! its own.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::audit::{now, AuditRecord, AuditSink};
use super::body::{Counted, OnClose, ProxyBody};
use super::io::{Metered, Usage};
use super::policy::{Access, Denial, DenyCode, Destination, EgressPolicy, Host, Scheme};
use super::sni::{self, SniError};

/// Tunnel copy buffers, per direction. Large enough that a bulk transfer moves in few
/// syscalls; small enough that a thousand idle tunnels stay cheap.
const TUNNEL_BUF: usize = 64 * 1024;
/// Header fields hyper accepts in one request head (its default; more get 431).
const MAX_HEADER_FIELDS: usize = 100;
/// The `Via` token this proxy adds, and refuses to see twice.
const VIA: &str = "1.1 provider-egress";
const VIA_TOKEN: &str = "provider-egress";
/// TLS fatal alert `access_denied`, sent when a tunnel is refused after the 200: the
/// client's TLS library then reports a refusal instead of a bare reset.
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// Why serving a connection ended with an error (the proxy itself keeps running).
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// One job's egress proxy: its policy, its usage so far, and where it writes audit lines.
#[derive(Debug)]
pub struct Proxy {
    policy: EgressPolicy,
    audit: Arc<dyn AuditSink>,
    usage: Arc<Usage>,
    tunnels: Arc<Semaphore>,
    /// Addresses this proxy listens on: never a destination.
    self_addrs: RwLock<Vec<SocketAddr>>,
}

impl Proxy {
    pub fn new(policy: EgressPolicy, audit: Arc<dyn AuditSink>) -> Arc<Self> {
        let limits = policy.limits();
        Arc::new(Self {
            usage: Arc::new(Usage::new(limits.max_bytes)),
            tunnels: Arc::new(Semaphore::new(limits.max_tunnels)),
            policy,
            audit,
            self_addrs: RwLock::new(Vec::new()),
        })
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Body and tunnel bytes the job has moved so far.
    pub fn bytes_used(&self) -> u64 {
        self.usage.used()
    }

    /// Registers an address clients reach this proxy on, so requests to it are refused
    /// ([`serve_listener`] does this for its listener).
    pub fn add_self_addr(&self, addr: SocketAddr) {
        self.self_addrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr);
    }

    /// Whether dialing `a` could reach this proxy: the same port on the same address, or
    /// on any address when either side is a wildcard, or anywhere on loopback.
    fn is_self(&self, a: SocketAddr) -> bool {
        let same_host = |s: IpAddr, d: IpAddr| {
            s == d
                || s.is_unspecified()
                || d.is_unspecified()
                || (s.is_loopback() && d.is_loopback())
        };
        self.self_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| s.port() == a.port() && same_host(canonical(s.ip()), canonical(a.ip())))
    }

    fn audit(&self, ask: &Ask, o: Outcome<'_>) {
        self.audit.record(AuditRecord {
            time: now(),
            event: "egress".into(),
            job: self.policy.job().to_owned(),
            method: ask.method.clone(),
            destination: ask.destination.clone(),
            resolved: o.resolved.map(|a| a.to_string()),
            decision: o.decision.into(),
            rule: o.rule.to_owned(),
            reason: o.reason,
            status: o.status,
            bytes_up: o.up,
            bytes_down: o.down,
            duration_ms: ask.started.elapsed().as_millis() as u64,
        });
    }

    /// Audits a refusal and builds the client's answer.
    fn refuse(&self, ask: &Ask, resolved: Option<SocketAddr>, d: Denial) -> Response<ProxyBody> {
        let failure = matches!(d.code, DenyCode::DnsFailed | DenyCode::UpstreamFailed);
        self.audit(
            ask,
            Outcome {
                resolved,
                decision: if failure { "error" } else { "deny" },
                rule: d.code.as_str(),
                reason: d.message.clone(),
                status: d.code.status(),
                up: 0,
                down: 0,
            },
        );
        refusal(&d)
    }

    /// Resolves once, checks every address, dials the first checked address that answers.
    async fn dial(
        &self,
        dest: &Destination,
    ) -> Result<(TcpStream, SocketAddr), (Denial, Option<SocketAddr>)> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        match &dest.host {
            Host::Ip(ip) => addrs.push(SocketAddr::new(*ip, dest.port)),
            Host::Name(name) => match tokio::time::timeout(
                self.policy.limits().connect_timeout,
                tokio::net::lookup_host((name.as_str(), dest.port)),
            )
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("no answer in time")))
            {
                Ok(found) => {
                    for a in found {
                        if !addrs.contains(&a) {
                            addrs.push(a);
                        }
                    }
                }
                Err(e) => {
                    return Err((
                        Denial::new(DenyCode::DnsFailed, format!("{name} does not resolve: {e}")),
                        None,
                    ))
                }
            },
        }
        if addrs.is_empty() {
            return Err((
                Denial::new(
                    DenyCode::DnsFailed,
                    format!("{} has no addresses", dest.host),
                ),
                None,
            ));
        }
        // Every address must pass: a name that resolves to a public and a private address
        // is how a rebinding attack looks, and which one the client would get is luck.
        for a in &addrs {
            if self.is_self(*a) {
                return Err((
                    Denial::new(DenyCode::SelfTarget, format!("{a} is this proxy")),
                    Some(*a),
                ));
            }
            if let Err(e) = self.policy.addresses().check(a.ip()) {
                let message = match &dest.host {
                    Host::Name(n) => format!("{n} resolves to {e}"),
                    Host::Ip(_) => e.to_string(),
                };
                return Err((Denial::new(DenyCode::AddressDenied, message), Some(*a)));
            }
        }
        let timeout = self.policy.limits().connect_timeout;
        let mut last = String::new();
        for a in &addrs {
            match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, *a));
                }
                Ok(Err(e)) => last = format!("{a}: {e}"),
                Err(_) => last = format!("{a}: no answer within {} s", timeout.as_secs()),
            }
        }
        Err((
            Denial::new(
                DenyCode::UpstreamFailed,
                format!("cannot connect to {last}"),
            ),
            addrs.last().copied(),
        ))
    }
}

/// IPv4-mapped addresses compare as the IPv4 address they reach.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The request as the client asked, for the audit line.
#[derive(Debug, Clone)]
struct Ask {
    method: String,
    destination: String,
    started: Instant,
}

struct Outcome<'a> {
    resolved: Option<SocketAddr>,
    decision: &'a str,
    rule: &'a str,
    reason: String,
    status: u16,
    up: u64,
    down: u64,
}

fn refusal(d: &Denial) -> Response<ProxyBody> {
    let text = format!("{}: {}\n", d.code, d.message);
    let mut resp = Response::new(ProxyBody::Text(Some(Bytes::from(text))));
    *resp.status_mut() = StatusCode::from_u16(d.code.status()).unwrap_or(StatusCode::FORBIDDEN);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        HeaderName::from_static("x-egress-deny"),
        HeaderValue::from_static(d.code.as_str()),
    );
    if d.code == DenyCode::BadRequest {
        // After a request we could not make sense of, the stream's framing is suspect.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Serves one client connection (a TCP socket, or a stream from a VM's host channel) until
/// the client closes it, it idles out, or it breaks the protocol. Errors end this
/// connection only.
pub async fn serve_connection<S>(stream: S, proxy: Arc<Proxy>) -> Result<(), EgressError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.policy.limits().clone();
    let io = TokioIo::new(Metered::new(stream, limits.idle_timeout, None));
    let conn = Arc::new(Conn::<S> {
        proxy: proxy.clone(),
        pooled: Mutex::new(None),
        _stream: PhantomData,
    });
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let started = Instant::now();
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        // `max_buf_size` alone does not bound the head: hyper checks it only while a head
        // is incomplete, and one read may fill more than it (the buffer's spare capacity
        // after growing), so a head that arrives at once was parsed whatever its size.
        // `max_header_size` is checked on the complete head as well.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .preserve_header_case(true)
        .serve_connection(io, service)
        .with_upgrades()
        .await
        .inspect_err(|e| audit_unparsed(&proxy, e, started))?;
    Ok(())
}

/// Audits a request hyper refused before the proxy saw it (it answered 400, 414 or 431
/// itself and closes the connection): there is no method or destination to name.
fn audit_unparsed(proxy: &Proxy, e: &hyper::Error, started: Instant) {
    if !e.is_parse() || e.is_parse_version_h2() {
        return;
    }
    let limit = proxy.policy.limits().max_header_bytes;
    let (d, status) = if e.is_parse_too_large() {
        // The same kind covers a URI over hyper's own limit (64 KiB - 2), answered 414.
        let uri = e.to_string().contains("URI");
        let d = Denial::new(
            DenyCode::HeadTooLarge,
            format!(
                "the request line and headers exceed the limit ({limit} bytes, {MAX_HEADER_FIELDS} fields)"
            ),
        );
        (d, if uri { 414 } else { 431 })
    } else {
        let d = Denial::new(
            DenyCode::BadRequest,
            format!("the request could not be parsed: {e}"),
        );
        (d, 400)
    };
    let ask = Ask {
        method: String::new(),
        destination: String::new(),
        started,
    };
    proxy.audit(
        &ask,
        Outcome {
            resolved: None,
            decision: "deny",
            rule: d.code.as_str(),
            reason: d.message,
            status,
            up: 0,
            down: 0,
        },
    );
}

/// Accepts connections and serves each on its own task, forever. Accept errors (out of
/// file descriptors, …) are logged and retried: they must not end the proxy. Beyond
/// `max_connections` concurrent clients, a new client gets a 503 and is closed; beyond
/// that many again being turned away, it is closed without one.
pub async fn serve_listener(listener: TcpListener, proxy: Arc<Proxy>) {
    if let Ok(addr) = listener.local_addr() {
        proxy.add_self_addr(addr);
    }
    let max = proxy.policy.limits().max_connections;
    let slots = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(max));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "egress: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = serve_connection(stream, proxy).await {
                        tracing::debug!(%peer, error = %e, "egress: connection ended with an error");
                    }
                });
            }
            Err(_) => {
                if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let _refusal = refusal;
                        turn_away(stream, proxy).await;
                    });
                }
            }
        }
    }
}

async fn turn_away(mut stream: TcpStream, proxy: Arc<Proxy>) {
    let d = Denial::new(
        DenyCode::TooManyConnections,
        format!(
            "the proxy already serves {} connections",
            proxy.policy.limits().max_connections
        ),
    );
    let ask = Ask {
        method: String::new(),
        destination: String::new(),
        started: Instant::now(),
    };
    proxy.refuse(&ask, None, d.clone());
    let body = format!("{}: {}\n", d.code, d.message);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nx-egress-deny: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        d.code,
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        // Closing with the client's request still unread would send a reset, which can
        // destroy the 503 before the client reads it: read until the client closes.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
}

/// State of one client connection: its proxy and the upstream connection its last plain
/// request used, reused while the client keeps asking for the same host and port.
struct Conn<S> {
    proxy: Arc<Proxy>,
    pooled: Mutex<Option<Pooled>>,
    _stream: PhantomData<fn() -> S>,
}

struct Pooled {
    host: Host,
    port: u16,
    addr: SocketAddr,
    sender: SendRequest<Counted<Incoming>>,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        if req.method() == Method::CONNECT {
            let ask = Ask {
                method: "CONNECT".into(),
                destination: req.uri().to_string(),
                started,
            };
            self.connect(req, ask).await
        } else {
            let ask = Ask {
                method: req.method().to_string(),
                destination: req.uri().to_string(),
                started,
            };
            self.forward(req, ask).await
        }
    }

    async fn connect(&self, mut req: Request<Incoming>, ask: Ask) -> Response<ProxyBody> {
        let proxy = &self.proxy;
        let bad = |m: String| Denial::new(DenyCode::BadRequest, m);
        let Some(authority) = req.uri().authority().cloned() else {
            return proxy.refuse(&ask, None, bad("CONNECT needs host:port".into()));
        };
        if authority.as_str().contains('@') {
            return proxy.refuse(&ask, None, bad("credentials in the CONNECT target".into()));
        }
        let Some(port) = authority.port_u16().filter(|p| *p != 0) else {
            return proxy.refuse(
                &ask,
                None,
                bad(format!(
                    "CONNECT {authority} has no port (CONNECT host:port)"
                )),
            );
        };
        let host = match Host::parse(authority.host()) {
            Ok(h) => h,
            Err(e) => return proxy.refuse(&ask, None, bad(e.to_string())),
        };
        let dest = Destination {
            host,
            port,
            access: Access::Tunnel,
        };
        let rule = match proxy.policy.check(&dest) {
            Ok(r) => r,
            Err(d) => return proxy.refuse(&ask, None, d),
        };
        if proxy.usage.spent() {
            return proxy.refuse(&ask, None, budget_denial(&proxy.usage));
        }
        let Ok(permit) = proxy.tunnels.clone().try_acquire_owned() else {
            return proxy.refuse(&ask, None, tunnels_denial(proxy));
        };
        let (upstream, addr) = match proxy.dial(&dest).await {
            Ok(d) => d,
            Err((d, addr)) => return proxy.refuse(&ask, addr, d),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let tunnel = Tunnel {
                proxy: &proxy,
                ask: &ask,
                addr,
                rule: &rule,
                permit: Some(permit),
            };
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tunnel.close(
                        0,
                        0,
                        format!("the client left before the tunnel opened: {e}"),
                    );
                    return;
                }
            };
            // On our own stream type we get the bare stream back, without hyper's
            // dynamic wrapper in the way of every read.
            match upgraded.downcast::<TokioIo<Metered<S>>>() {
                Ok(parts) => {
                    tunnel
                        .run(parts.io.into_inner(), parts.read_buf, upstream, &dest.host)
                        .await
                }
                Err(upgraded) => {
                    tunnel
                        .run(TokioIo::new(upgraded), Bytes::new(), upstream, &dest.host)
                        .await
                }
            }
        });
        Response::new(ProxyBody::Empty)
    }

    async fn forward(&self, mut req: Request<Incoming>, ask: Ask) -> Response<ProxyBody> {
        let proxy = &self.proxy;
        let bad = |m: &str| Denial::new(DenyCode::BadRequest, m);
        let uri = req.uri().clone();
        let scheme = match uri.scheme_str().map(Scheme::parse) {
            None => {
                return proxy.refuse(
                    &ask,
                    None,
                    bad("this is a forward proxy: send an absolute-form request (GET http://host/path) or CONNECT host:port"),
                )
            }
            Some(Some(s @ (Scheme::Http | Scheme::Ws))) => s,
            Some(Some(Scheme::Https | Scheme::Wss)) => {
                return proxy.refuse(
                    &ask,
                    None,
                    bad("the proxy does not speak TLS for the client: use CONNECT host:443"),
                )
            }
            Some(None) => return proxy.refuse(&ask, None, bad("unsupported URI scheme")),
        };
        let Some(authority) = uri.authority() else {
            return proxy.refuse(&ask, None, bad("the request URI has no host"));
        };
        if authority.as_str().contains('@') {
            // userinfo@host: a classic way to make two parsers see two hosts.
            return proxy.refuse(&ask, None, bad("credentials in the request URI"));
        }
        let host = match Host::parse(authority.host()) {
            Ok(h) => h,
            Err(e) => return proxy.refuse(&ask, None, bad(&e.to_string())),
        };
        let port = match authority.port_u16() {
            Some(0) => return proxy.refuse(&ask, None, bad("port 0")),
            Some(p) => p,
            None => scheme.default_port(),
        };
        if let Err(d) = check_host_header(req.headers(), &host, port, scheme) {
            return proxy.refuse(&ask, None, d);
        }
        let websocket = match upgrade_request(&req) {
            Upgrade::None => false,
            Upgrade::WebSocket => true,
            Upgrade::Other(why) => {
                return proxy.refuse(&ask, None, Denial::new(DenyCode::UpgradeNotAllowed, why))
            }
        };
        if scheme == Scheme::Ws && !websocket {
            return proxy.refuse(
                &ask,
                None,
                bad("a ws:// request must ask to upgrade to websocket"),
            );
        }
        if req
            .headers()
            .get_all(header::VIA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains(VIA_TOKEN)))
        {
            return proxy.refuse(
                &ask,
                None,
                Denial::new(
                    DenyCode::Loop,
                    "the request already passed through this proxy",
                ),
            );
        }
        let path = uri.path().to_owned();
        let dest = Destination {
            host,
            port,
            access: if websocket {
                Access::WebSocket { path }
            } else {
                Access::Http { path }
            },
        };
        let rule = match proxy.policy.check(&dest) {
            Ok(r) => r,
            Err(d) => return proxy.refuse(&ask, None, d),
        };
        if proxy.usage.spent() {
            return proxy.refuse(&ask, None, budget_denial(&proxy.usage));
        }
        let permit = if websocket {
            match proxy.tunnels.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return proxy.refuse(&ask, None, tunnels_denial(proxy)),
            }
        } else {
            None
        };

        let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        parts.uri = origin_form(&uri);
        strip_hop_by_hop(&mut parts.headers, websocket);
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        parts
            .headers
            .append(header::VIA, HeaderValue::from_static(VIA));
        let up = Arc::new(AtomicU64::new(0));
        let body = Counted::new(body, up.clone(), proxy.usage.clone(), None);
        let upstream_req = Request::from_parts(parts, body);

        let (mut resp, addr) = match self.send(&dest, upstream_req, websocket).await {
            Ok(r) => r,
            Err((d, addr)) => return proxy.refuse(&ask, addr, d),
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Err(d) = switched_as_asked(resp.headers(), websocket) {
                // The upstream connection is given up: after its 101 it speaks something
                // else.
                drop(resp);
                self.pooled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_if(|p| p.addr == addr);
                return proxy.refuse(&ask, Some(addr), d);
            }
        }
        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) =
            (client_upgrade, resp.status())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let (parts, _) = resp.into_parts();
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let tunnel = Tunnel {
                    proxy: &proxy,
                    ask: &ask,
                    addr,
                    rule: &rule,
                    permit,
                };
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        tunnel
                            .relay(TokioIo::new(client), TokioIo::new(upstream), &[])
                            .await
                    }
                    Err(e) => tunnel.close(0, 0, format!("the upgrade failed: {e}")),
                }
            });
            return Response::from_parts(parts, ProxyBody::Empty);
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let down = Arc::new(AtomicU64::new(0));
        let on_close = Box::new(RequestClosed {
            proxy: proxy.clone(),
            ask,
            addr,
            rule,
            status: parts.status.as_u16(),
            up,
            down: down.clone(),
            permit,
        });
        let body = Counted::new(body, down, proxy.usage.clone(), Some(on_close));
        Response::from_parts(parts, ProxyBody::Upstream(body))
    }

    /// Sends a plain request upstream: on the connection this client used last when it is
    /// for the same host and port and still open, else on a freshly dialed one. WebSocket
    /// upgrades always get their own connection, which the upgrade consumes.
    async fn send(
        &self,
        dest: &Destination,
        mut req: Request<Counted<Incoming>>,
        dedicated: bool,
    ) -> Result<(Response<Incoming>, SocketAddr), (Denial, Option<SocketAddr>)> {
        let failed = |addr: SocketAddr, e: hyper::Error| {
            (
                Denial::new(DenyCode::UpstreamFailed, format!("{addr}: {e}")),
                Some(addr),
            )
        };
        if !dedicated {
            let pooled = self.pooled.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(mut p) = pooled.filter(|p| p.host == dest.host && p.port == dest.port) {
                if p.sender.ready().await.is_ok() {
                    match p.sender.try_send_request(req).await {
                        Ok(resp) => {
                            let addr = p.addr;
                            *self.pooled.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
                            return Ok((resp, addr));
                        }
                        // The upstream closed the idle connection before it took the
                        // request: nothing was sent, so a new connection may carry it.
                        Err(mut e) => match e.take_message() {
                            Some(r) => req = r,
                            None => return Err(failed(p.addr, e.into_error())),
                        },
                    }
                }
            }
        }
        let (stream, addr) = self.proxy.dial(dest).await?;
        let idle = self.proxy.policy.limits().idle_timeout;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(Metered::new(stream, idle, None)))
            .await
            .map_err(|e| failed(addr, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "egress: upstream connection ended with an error");
            }
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| failed(addr, e))?;
        if !dedicated {
            *self.pooled.lock().unwrap_or_else(|p| p.into_inner()) = Some(Pooled {
                host: dest.host.clone(),
                port: dest.port,
                addr,
                sender,
            });
        }
        Ok((resp, addr))
    }
}

fn budget_denial(usage: &Usage) -> Denial {
    Denial::new(
        DenyCode::ByteBudget,
        format!("the job's egress budget of {} bytes is spent", usage.max()),
    )
}

fn tunnels_denial(proxy: &Proxy) -> Denial {
    Denial::new(
        DenyCode::TooManyTunnels,
        format!(
            "the job already has {} open tunnels",
            proxy.policy.limits().max_tunnels
        ),
    )
}

/// `Host` must name the URI's host and port: an upstream that routes by `Host` (virtual
/// hosting, CDNs) would otherwise serve a site the allowlist never saw. Absent (HTTP/1.0),
/// the proxy adds it from the URI.
fn check_host_header(
    headers: &HeaderMap,
    host: &Host,
    port: u16,
    scheme: Scheme,
) -> Result<(), Denial> {
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(Denial::new(
            DenyCode::BadRequest,
            "more than one Host header",
        ));
    }
    let mismatch = |shown: &str| {
        Denial::new(
            DenyCode::HostMismatch,
            format!("the Host header `{shown}` does not name the request's {host}:{port}"),
        )
    };
    let text = value.to_str().map_err(|_| mismatch("(not text)"))?;
    let authority: http::uri::Authority = text.parse().map_err(|_| mismatch(text))?;
    if authority.as_str().contains('@') {
        return Err(mismatch(text));
    }
    let same_host = Host::parse(authority.host()).is_ok_and(|h| h == *host);
    let same_port = authority.port_u16().unwrap_or(scheme.default_port()) == port;
    if same_host && same_port {
        Ok(())
    } else {
        Err(mismatch(text))
    }
}

/// What a request asks to switch to.
enum Upgrade {
    /// No `Upgrade` header: a plain request.
    None,
    /// A WebSocket opening handshake (RFC 6455 4.1): `GET`, HTTP/1.1, `Upgrade: websocket`,
    /// `Connection: upgrade`.
    WebSocket,
    /// Anything else with an `Upgrade` header (`h2c`, TLS, a handshake missing a part):
    /// refused, not stripped, so the client learns that it will not get it.
    Other(String),
}

fn upgrade_request<B>(req: &Request<B>) -> Upgrade {
    let headers = req.headers();
    if !headers.contains_key(header::UPGRADE) {
        return Upgrade::None;
    }
    let asked: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not text)"))
        .collect();
    let asked = asked.join(", ");
    let only = "the proxy relays only WebSocket upgrades (GET, HTTP/1.1, Upgrade: websocket, Connection: upgrade)";
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Upgrade::Other(format!("{only}; this request asks for `{asked}`"));
    }
    let missing = if req.method() != Method::GET {
        "is not a GET"
    } else if req.version() != http::Version::HTTP_11 {
        "is not HTTP/1.1"
    } else if !has_token(headers, header::CONNECTION, "upgrade") {
        "has no `Connection: upgrade`"
    } else {
        return Upgrade::WebSocket;
    };
    Upgrade::Other(format!("{only}; this upgrade request {missing}"))
}

/// Whether a comma-separated header lists `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// An upstream's `101` must answer a WebSocket handshake, with `Upgrade: websocket`: a 101
/// nobody asked for would turn the connection into a tunnel no check was made for.
fn switched_as_asked(headers: &HeaderMap, websocket: bool) -> Result<(), Denial> {
    let to: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not text)"))
        .collect();
    let to = to.join(", ");
    if !websocket {
        return Err(Denial::new(
            DenyCode::UnrequestedUpgrade,
            format!("the upstream switched protocols (101, Upgrade: `{to}`) although the request asked for no upgrade"),
        ));
    }
    if !to.trim().eq_ignore_ascii_case("websocket") {
        return Err(Denial::new(
            DenyCode::UnrequestedUpgrade,
            format!("the upstream switched to `{to}`, the request asked for websocket"),
        ));
    }
    Ok(())
}

fn origin_form(uri: &Uri) -> Uri {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let pq = if pq.is_empty() { "/" } else { pq };
    pq.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1) and whatever `Connection` names; keeps the
/// upgrade handshake when a WebSocket upgrade is being relayed.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    for name in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        // Only what was checked goes on: a client's `Upgrade: websocket, h2c` must not let
        // the upstream pick the other one.
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Writes the audit line of an allowed plain request when its response body ends.
struct RequestClosed {
    proxy: Arc<Proxy>,
    ask: Ask,
    addr: SocketAddr,
    rule: String,
    status: u16,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    /// A WebSocket request's tunnel slot, for when the upstream declined the upgrade.
    permit: Option<OwnedSemaphorePermit>,
}

impl OnClose for RequestClosed {
    fn close(self: Box<Self>, error: Option<String>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut this = *self;
        drop(this.permit.take());
        this.proxy.audit(
            &this.ask,
            Outcome {
                resolved: Some(this.addr),
                decision: "allow",
                rule: &this.rule,
                reason: error.unwrap_or_default(),
                status: this.status,
                up: this.up.load(Relaxed),
                down: this.down.load(Relaxed),
            },
        );
    }
}

/// An established tunnel (CONNECT, or an upgraded WebSocket).
struct Tunnel<'a> {
    proxy: &'a Arc<Proxy>,
    ask: &'a Ask,
    addr: SocketAddr,
    rule: &'a str,
    /// The job's tunnel slot, given back before the audit line is written: whoever reads
    /// the line may count on the slot being free.
    permit: Option<OwnedSemaphorePermit>,
}

enum HelloError {
    Sni(SniError),
    Closed,
    Io(std::io::Error),
}

impl Tunnel<'_> {
    fn close(mut self, up: u64, down: u64, reason: String) {
        drop(self.permit.take());
        self.proxy.audit(
            self.ask,
            Outcome {
                resolved: Some(self.addr),
                decision: "allow",
                rule: self.rule,
                reason,
                status: 200,
                up,
                down,
            },
        );
    }

    fn deny(mut self, d: Denial) {
        drop(self.permit.take());
        self.proxy.audit(
            self.ask,
            Outcome {
                resolved: Some(self.addr),
                decision: "deny",
                rule: d.code.as_str(),
                reason: d.message,
                status: 200,
                up: 0,
                down: 0,
            },
        );
    }

    /// A CONNECT tunnel: checks the ClientHello's SNI, then relays.
    async fn run<D>(self, mut down: D, buffered: Bytes, upstream: TcpStream, host: &Host)
    where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        let idle = self.proxy.policy.limits().idle_timeout;
        let hello = match tokio::time::timeout(idle, read_hello(&mut down, buffered)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let message = match e {
                    HelloError::Sni(e) => e.to_string(),
                    HelloError::Closed => {
                        "the client closed the tunnel before a complete TLS ClientHello".into()
                    }
                    HelloError::Io(e) => format!("reading the TLS ClientHello: {e}"),
                };
                self.deny(Denial::new(DenyCode::NotTls, message));
                return;
            }
            Err(_) => {
                self.deny(Denial::new(
                    DenyCode::NotTls,
                    format!("no TLS ClientHello within {} s", idle.as_secs()),
                ));
                return;
            }
        };
        if let Err(d) = sni_matches(host, hello.1.as_deref()) {
            let _ = down.write_all(&TLS_ACCESS_DENIED).await;
            let _ = down.shutdown().await;
            drop(down);
            self.deny(d);
            return;
        }
        self.relay(down, upstream, &hello.0).await;
    }

    /// Copies both ways until both sides are done, a side fails, the job's budget is spent
    /// or nothing moves for the idle timeout; a half-close is passed on as a half-close.
    async fn relay<D, U>(self, mut down: D, upstream: U, first: &[u8])
    where
        D: AsyncRead + AsyncWrite + Unpin,
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let limits = self.proxy.policy.limits();
        let mut up = Metered::new(
            upstream,
            limits.idle_timeout,
            Some(self.proxy.usage.clone()),
        );
        let mut result = up.write_all(first).await.map(|_| (0, 0));
        if result.is_ok() {
            result = tokio::io::copy_bidirectional_with_sizes(
                &mut down, &mut up, TUNNEL_BUF, TUNNEL_BUF,
            )
            .await;
        }
        let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
        self.close(up.written, up.read, reason);
    }
}

fn sni_matches(host: &Host, sni: Option<&str>) -> Result<(), Denial> {
    match (host, sni) {
        (Host::Name(name), Some(s)) if s.trim_end_matches('.') == name => Ok(()),
        (Host::Name(name), Some(s)) => Err(Denial::new(
            DenyCode::SniMismatch,
            format!("the TLS ClientHello names {s}, the tunnel was opened for {name}"),
        )),
        (Host::Name(name), None) => Err(Denial::new(
            DenyCode::SniMismatch,
            format!("the TLS ClientHello names no server (SNI); a tunnel to {name} requires it"),
        )),
        (Host::Ip(_), None) => Ok(()),
        (Host::Ip(ip), Some(s)) => Err(Denial::new(
            DenyCode::SniMismatch,
            format!("the tunnel was opened for the address {ip}, the TLS ClientHello names {s}"),
        )),
    }
}

/// Reads until a complete ClientHello is buffered; returns the bytes read (to forward
/// unchanged) and the SNI.
async fn read_hello<D: AsyncRead + Unpin>(
    down: &mut D,
    buffered: Bytes,
) -> Result<(Vec<u8>, Option<String>), HelloError> {
    // Records of one byte each would carry a maximal hello in 6 * MAX_HELLO bytes.
    const MAX_BUFFERED: usize = 6 * sni::MAX_HELLO + 5;
    let mut buf = Vec::with_capacity(4096.max(buffered.len()));
    buf.extend_from_slice(&buffered);
    loop {
        match sni::parse_client_hello(&buf) {
            Ok(Some(name)) => return Ok((buf, name)),
            Ok(None) => {}
            Err(e) => return Err(HelloError::Sni(e)),
        }
        if buf.len() >= MAX_BUFFERED {
            return Err(HelloError::Sni(SniError::TooLarge));
        }
        match down.read_buf(&mut buf).await {
            Ok(0) => return Err(HelloError::Closed),
            Ok(_) => {}
            Err(e) => return Err(HelloError::Io(e)),
        }
    }
}
