//! `transfer` into the VM from the network, through the job's own egress proxy.
//!
//! The host fetches `from` by speaking HTTP to the job's [`Proxy`] over an in-memory
//! pipe, exactly as a payload process would through the guest's proxy listener: the same
//! allowlist, address checks, byte budget and audit lines apply, so a transfer can never
//! reach what the payload itself could not. `http://` is a plain proxied request;
//! `https://` is a `CONNECT` tunnel with TLS inside it (the system's trust anchors plus the
//! operator's extra ones, hostname checked; no SNI for IP literals, as the proxy demands).
//! The body lands in a temporary file in the job directory (at most the job's
//! `max_transfer_bytes`) and is then uploaded into the guest.
//!
//! Supported: `from` an `http://` or `https://` URL, `to` a `container:/absolute/path`.
//! Everything else (downloads out of the VM, archive `format`/`depth`/`fileset`) is refused
//! with a reason rather than approximated; see `docs/activity.md`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HOST, USER_AGENT};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_native_tls::TlsConnector;
use url::{Position, Url};

use egress::{serve_connection, Proxy};
use net::wire::{Code, Reason};

/// A transfer this job can carry out.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub url: Url,
    /// Absolute path inside the payload root.
    pub guest_path: String,
}

/// Checks what the transfer asks for before anything moves.
pub(crate) fn plan(t: &exescript::Transfer) -> Result<Plan, Reason> {
    let unsupported = |m: String| Reason::new(Code::TransferUnsupported, m);
    if t.format.is_some() || t.depth.is_some() || !t.fileset.is_empty() {
        return Err(unsupported(
            "archive transfers (`format`, `depth`, `fileset`) are not supported; transfer one file"
                .into(),
        ));
    }
    let Some(guest_path) = t.to.strip_prefix("container:") else {
        return Err(unsupported(format!(
            "`to` must be `container:/path` (a file in the VM); `{}` is not supported",
            t.to
        )));
    };
    if !guest_path.starts_with('/') || guest_path.split('/').any(|c| c == "..") {
        return Err(Reason::new(
            Code::TransferInvalid,
            format!("`to` must name an absolute path without `..`; got `{guest_path}`"),
        ));
    }
    let mut url = Url::parse(&t.from).map_err(|e| {
        Reason::new(
            Code::TransferInvalid,
            format!("`from` is not a URL ({e}): `{}`", t.from),
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(unsupported(format!(
            "`from` must be an http:// or https:// URL (fetched through the job's egress proxy); `{}` sources are not supported",
            url.scheme()
        )));
    }
    // A fragment is the client's business; it is never sent.
    url.set_fragment(None);
    if url.host_str().is_none() {
        return Err(Reason::new(
            Code::TransferInvalid,
            format!("`from` has no host: `{}`", t.from),
        ));
    }
    Ok(Plan {
        url,
        guest_path: guest_path.to_owned(),
    })
}

enum Msg {
    Chunk(Bytes),
    /// The whole body arrived. Without it a closed channel means the fetch was cut off
    /// (its task panicked or was cancelled), never a complete file.
    Done,
    /// The proxy or the upstream refused: status, the proxy's refusal code, body text.
    Refused(u16, Option<String>, String),
    Error(String),
}

/// Fetches `url` through `proxy` into `dest` (created), at most `max` bytes; returns the
/// size. Blocks the calling thread, which must not be one of the runtime's.
pub(crate) fn fetch(
    rt: &Handle,
    proxy: Arc<Proxy>,
    tls: &TlsConnector,
    url: &Url,
    dest: &Path,
    max: u64,
) -> Result<u64, Reason> {
    let (tx, mut rx) = mpsc::channel::<Msg>(8);
    let task = rt.spawn(request(proxy, tls.clone(), url.clone(), tx));
    let mut file = std::fs::File::create(dest).map_err(|e| {
        task.abort();
        Reason::new(
            Code::TransferFailed,
            format!("create {}: {e}", dest.display()),
        )
    })?;
    let mut total = 0u64;
    let result = loop {
        match rx.blocking_recv() {
            Some(Msg::Done) => break Ok(total),
            None => {
                break Err(Reason::new(
                    Code::TransferFailed,
                    format!("{url}: the download ended before its body was complete"),
                ))
            }
            Some(Msg::Chunk(b)) => {
                total += b.len() as u64;
                if total > max {
                    break Err(Reason::new(
                        Code::TransferTooLarge,
                        format!("{url} is larger than the job's transfer limit of {max} bytes"),
                    ));
                }
                if let Err(e) = file.write_all(&b) {
                    break Err(Reason::new(
                        Code::TransferFailed,
                        format!("write {}: {e}", dest.display()),
                    ));
                }
            }
            Some(Msg::Refused(status, Some(code), text)) => {
                break Err(Reason::new(
                    Code::EgressDenied,
                    format!("the egress proxy refused {url} ({status}, {code}): {text}"),
                ))
            }
            Some(Msg::Refused(status, None, _)) => {
                break Err(Reason::new(
                    Code::TransferFailed,
                    format!("{url} answered {status}"),
                ))
            }
            Some(Msg::Error(e)) => {
                break Err(Reason::new(Code::TransferFailed, format!("{url}: {e}")))
            }
        }
    };
    // Dropping the receiver stops a download that went over the limit.
    drop(rx);
    if result.is_err() {
        task.abort();
        return result;
    }
    file.sync_all().map_err(|e| {
        Reason::new(
            Code::TransferFailed,
            format!("write {}: {e}", dest.display()),
        )
    })?;
    result
}

async fn request(proxy: Arc<Proxy>, tls: TlsConnector, url: Url, tx: mpsc::Sender<Msg>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        if let Err(e) = serve_connection(server, proxy).await {
            tracing::debug!(error = %e, "transfer: proxy connection ended with an error");
        }
    });
    let result = if url.scheme() == "https" {
        https(client, &tls, &url, &tx).await
    } else {
        http(client, &url, &tx).await
    };
    if let Err(e) = result {
        let _ = tx.send(Msg::Error(e)).await;
    }
}

/// `Host` as the URL names it: the host, and the port when it is not the default.
fn host_header(url: &Url) -> Result<String, String> {
    match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => Ok(format!("{h}:{p}")),
        (Some(h), None) => Ok(h.to_owned()),
        (None, _) => Err("the URL has no host".into()),
    }
}

fn get(target: &str, host: String) -> Result<Request<Empty<Bytes>>, String> {
    Request::get(target)
        .header(HOST, host)
        .header(
            USER_AGENT,
            concat!("provider-transfer/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("build the request: {e}"))
}

/// A plain request through the proxy, in absolute form as forward proxies expect.
async fn http(
    client: tokio::io::DuplexStream,
    url: &Url,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), String> {
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .map_err(|e| format!("talk to the egress proxy: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send
        .send_request(get(url.as_str(), host_header(url)?)?)
        .await
        .map_err(|e| format!("request: {e}"))?;
    forward(resp, tx, true).await
}

/// A `CONNECT` tunnel through the proxy, TLS with the origin inside it, then the request.
async fn https(
    client: tokio::io::DuplexStream,
    tls: &TlsConnector,
    url: &Url,
    tx: &mpsc::Sender<Msg>,
) -> Result<(), String> {
    let (name, port) = match (url.host(), url.port_or_known_default()) {
        (Some(url::Host::Domain(d)), Some(p)) => (d.to_owned(), p),
        (Some(url::Host::Ipv4(a)), Some(p)) => (a.to_string(), p),
        (Some(url::Host::Ipv6(a)), Some(p)) => (a.to_string(), p),
        _ => return Err("the URL has no host".into()),
    };
    let authority = match url.host() {
        Some(url::Host::Ipv6(_)) => format!("[{name}]:{port}"),
        _ => format!("{name}:{port}"),
    };
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .map_err(|e| format!("talk to the egress proxy: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let connect = Request::connect(authority.as_str())
        .header(HOST, authority.as_str())
        .body(Empty::new())
        .map_err(|e| format!("build the CONNECT request: {e}"))?;
    let resp = send
        .send_request(connect)
        .await
        .map_err(|e| format!("CONNECT {authority}: {e}"))?;
    if !resp.status().is_success() {
        return forward(resp, tx, true).await;
    }
    let tunnel = hyper::upgrade::on(resp)
        .await
        .map_err(|e| format!("CONNECT {authority}: {e}"))?;
    // native-tls sends no SNI for an IP literal, which is what the proxy requires then.
    let stream = tls
        .connect(&name, TokioIo::new(tunnel))
        .await
        .map_err(|e| format!("TLS with {authority}: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {authority}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let target = &url[Position::BeforePath..Position::AfterQuery];
    let resp = send
        .send_request(get(target, host_header(url)?)?)
        .await
        .map_err(|e| format!("request: {e}"))?;
    forward(resp, tx, false).await
}

/// Passes a response on: its body in chunks, or a refusal with the proxy's code (when the
/// answer came from the proxy itself, `from_proxy`) and the start of its text.
async fn forward(
    resp: Response<Incoming>,
    tx: &mpsc::Sender<Msg>,
    from_proxy: bool,
) -> Result<(), String> {
    let status = resp.status();
    if !status.is_success() {
        let deny = from_proxy
            .then(|| resp.headers().get("x-egress-deny"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = resp.into_body();
        let mut text = Vec::new();
        while text.len() < 1024 {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        text.extend_from_slice(d);
                    }
                }
                _ => break,
            }
        }
        text.truncate(1024);
        let text = String::from_utf8_lossy(&text).trim().to_owned();
        let _ = tx.send(Msg::Refused(status.as_u16(), deny, text)).await;
        return Ok(());
    }
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if tx.send(Msg::Chunk(data)).await.is_err() {
                // The receiver gave up (over the limit): stop reading.
                return Ok(());
            }
        }
    }
    let _ = tx.send(Msg::Done).await;
    Ok(())
}

/// The TLS client for `https://` transfers: the system's trust anchors and `extra` (PEM
/// files, each one or more certificates).
pub(crate) fn tls_connector(extra: &[std::path::PathBuf]) -> Result<TlsConnector, String> {
    let mut b = native_tls::TlsConnector::builder();
    for path in extra {
        let pem = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let certs = openssl::x509::X509::stack_from_pem(&pem)
            .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        for c in certs {
            let der = c.to_der().map_err(|e| format!("{}: {e}", path.display()))?;
            let cert = native_tls::Certificate::from_der(&der)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            b.add_root_certificate(cert);
        }
    }
    b.build()
        .map(TlsConnector::from)
        .map_err(|e| format!("TLS client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(from: &str, to: &str) -> exescript::Transfer {
        exescript::Transfer {
            from: from.into(),
            to: to.into(),
            format: None,
            depth: None,
            fileset: Vec::new(),
        }
    }

    /// An upstream on loopback: `/big` is 100 000 bytes, `/short` promises 1000 and sends
    /// 10 before closing, anything else is 404. A proxy allowing it, and a runtime.
    fn rig() -> (u16, Arc<Proxy>, tokio::runtime::Runtime) {
        let port = crate::testsupport::http_responder(|path| match path {
            "/big" => crate::testsupport::http_ok(&[7u8; 100_000]),
            "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789".to_vec(),
            _ => crate::testsupport::HTTP_NOT_FOUND.to_vec(),
        })
        .port;
        let policy = egress::EgressPolicy::new(
            "transfer-test",
            &policies::Outbound::Urls {
                protocols: vec!["http".into()],
                urls: vec![format!("http://127.0.0.1:{port}/").parse().unwrap()],
            },
            policies::Mode::All,
            &policies::WhitelistMatcher::new(&[]).unwrap(),
            egress::AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
            egress::Limits::default(),
        );
        let proxy = Proxy::new(policy, Arc::new(crate::audit::AuditLog::memory()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        (port, proxy, rt)
    }

    #[test]
    fn fetches_whole_bodies_and_refuses_cut_large_or_unlisted_ones() {
        let (port, proxy, rt) = rig();
        let tls = tls_connector(&[]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let url = |p: &str| Url::parse(&format!("http://127.0.0.1:{port}{p}")).unwrap();
        let fetch = |u: &Url, max: u64| fetch(rt.handle(), proxy.clone(), &tls, u, &dest, max);

        assert_eq!(fetch(&url("/big"), 1 << 20).unwrap(), 100_000);
        assert_eq!(std::fs::read(&dest).unwrap(), vec![7u8; 100_000]);

        let e = fetch(&url("/big"), 50_000).unwrap_err();
        assert_eq!(e.code, "transfer-too-large", "{e:?}");

        let e = fetch(&url("/short"), 1 << 20).unwrap_err();
        assert_eq!(e.code, "transfer-failed", "{e:?}");

        let e = fetch(&url("/missing"), 1 << 20).unwrap_err();
        assert_eq!(e.code, "transfer-failed", "{e:?}");
        assert!(e.message.contains("404"), "{e:?}");

        // Not on the allowlist: the proxy refuses, nothing is fetched.
        let other = Url::parse("http://127.0.0.2:1/x").unwrap();
        let e = fetch(&other, 1 << 20).unwrap_err();
        assert_eq!(e.code, "egress-denied", "{e:?}");
        assert!(
            e.message.contains("not-listed") || e.message.contains("ip-literal"),
            "{e:?}"
        );
    }

    #[test]
    fn only_http_and_https_into_the_container_are_planned() {
        let p = plan(&t("http://example.com/a.bin", "container:/tmp/a.bin")).unwrap();
        assert_eq!(p.guest_path, "/tmp/a.bin");
        assert_eq!(p.url.as_str(), "http://example.com/a.bin");
        let code = |from: &str, to: &str| plan(&t(from, to)).unwrap_err().code;
        plan(&t("https://example.com/a", "container:/a")).unwrap();
        assert_eq!(
            code("ftp://example.com/a", "container:/a"),
            "transfer-unsupported"
        );
        // Fragments never leave the host.
        let p = plan(&t("http://example.com/a#part", "container:/a")).unwrap();
        assert_eq!(p.url.as_str(), "http://example.com/a");
        assert_eq!(
            code("container:/a", "http://example.com/a"),
            "transfer-unsupported"
        );
        assert_eq!(
            code("http://example.com/a", "container:tmp/a"),
            "transfer-invalid"
        );
        assert_eq!(
            code("http://example.com/a", "container:/tmp/../a"),
            "transfer-invalid"
        );
        assert_eq!(code("not a url", "container:/a"), "transfer-invalid");
    }
}
