//! Fetching a requestor's payload image: the one path by which a manifest makes the
//! provider's host (not the VM) open a connection.
//!
//! A requestor must not be able to use it to read the host's files, probe the host's own
//! network, or fill its disk, so it follows the egress proxy's rules rather than a browser's:
//! - only `http://` and `https://` (`file://` and local paths are the operator's own
//!   `provider vm run`, never a manifest's);
//! - the name is resolved once, every address is checked against the same
//!   [`AddressPolicy`] as the job's egress (loopback, private, link-local, CGNAT, … are
//!   refused unless the operator's `--allow-cidr` opens them) and the connection goes only
//!   to the checked addresses;
//! - redirects are followed by hand, at most [`MAX_REDIRECTS`], each target checked the
//!   same way;
//! - the body is capped while it streams (the operator's `max_image_size`, and never more
//!   than the free disk minus a reserve);
//! - what the requestor is told names the policy that refused ([`ImageError::code`]), never
//!   a file system or socket error of the host: those go to the operator's log only.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use url::{Host, Url};

use egress::AddressPolicy;
use vm::image::ImageError;

/// Redirects one image fetch may follow.
pub const MAX_REDIRECTS: usize = 5;

/// How a requestor's image may be fetched: the operator's settings.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The egress address policy (`--allow-cidr`), applied to every hop.
    pub addresses: AddressPolicy,
    /// Largest image (`max_image_size`).
    pub max_bytes: u64,
    /// Free disk the fetch must leave (`image_disk_reserve`).
    pub disk_reserve: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            addresses: AddressPolicy::default(),
            max_bytes: 4 << 30,
            disk_reserve: 1 << 30,
        }
    }
}

impl FetchLimits {
    /// The operator's own `provider vm run --image http…`: any address (a local mirror is
    /// the operator's business) and no size limit beyond the free disk.
    pub fn operator() -> Self {
        Self {
            addresses: AddressPolicy::new(vec![
                egress::Cidr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0),
                egress::Cidr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0),
            ]),
            max_bytes: u64::MAX,
            disk_reserve: 0,
        }
    }
}

/// The byte limit of one fetch and which setting set it, for the refusal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cap {
    pub bytes: u64,
    pub why: &'static str,
}

impl FetchLimits {
    /// The smaller of `max_bytes` and the space free in `dir` beyond the reserve.
    pub(crate) fn cap(&self, available: Option<u64>) -> Cap {
        let disk = available.map(|a| a.saturating_sub(self.disk_reserve));
        match disk {
            Some(d) if d < self.max_bytes => Cap {
                bytes: d,
                why: "the provider's free disk space less its reserve",
            },
            // Unknown free space: the configured maximum still holds.
            _ => Cap {
                bytes: self.max_bytes,
                why: "the provider's max_image_size",
            },
        }
    }
}

fn refused(url: &Url, why: impl Into<String>) -> ImageError {
    ImageError::UrlRefused {
        url: url.to_string(),
        why: why.into(),
    }
}

/// Refuses anything but `http`/`https` before anything is opened.
pub(crate) fn requestor_url(source: &str) -> Result<Url, ImageError> {
    let url = Url::parse(source).map_err(|e| ImageError::UrlRefused {
        url: source.to_owned(),
        why: format!("not an absolute URL ({e}); a payload URL must be http:// or https://"),
    })?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        "file" => Err(refused(
            &url,
            "file:// names the provider's own files; a requestor's payload must be fetched over http or https",
        )),
        other => Err(refused(
            &url,
            format!("scheme `{other}` is not fetched for requestors; use http:// or https://"),
        )),
    }
}

/// The addresses `url`'s host may be dialed at: all of them pass `policy`, or none is
/// returned. The requestor's message does not say what a name resolves to or whether it
/// resolves at all, so the refusal is no oracle of the provider's network; the operator's
/// log says.
fn checked_addrs(url: &Url, policy: &AddressPolicy) -> Result<Vec<SocketAddr>, ImageError> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| refused(url, "has no port"))?;
    let not_public = || {
        refused(
            url,
            "its host is not one the provider fetches from (only public addresses, or ranges its operator opened)",
        )
    };
    let ips: Vec<IpAddr> = match url.host() {
        Some(Host::Ipv4(a)) => vec![a.into()],
        Some(Host::Ipv6(a)) => vec![a.into()],
        Some(Host::Domain(name)) => match (name, port).to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.ip()).collect(),
            Err(e) => {
                tracing::warn!(%url, error = %e, "payload host does not resolve");
                return Err(not_public());
            }
        },
        None => return Err(refused(url, "has no host")),
    };
    if ips.is_empty() {
        tracing::warn!(%url, "payload host resolves to no address");
        return Err(not_public());
    }
    for ip in &ips {
        if let Err(e) = policy.check(*ip) {
            tracing::warn!(%url, denied = %e, "payload fetch refused by the address policy");
            return Err(not_public());
        }
    }
    Ok(ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

/// Streams `url` into `sink` under `limits`, at most `cap` bytes, following checked
/// redirects. `progress` is told the expected length (if known) and every chunk.
pub(crate) fn fetch(
    url: Url,
    limits: &FetchLimits,
    cap: Cap,
    sink: &mut dyn Write,
    progress: &mut dyn FnMut(Option<u64>, u64),
) -> Result<(), ImageError> {
    let (url, resp) = send(url, limits, &http::HeaderMap::new())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(ImageError::Fetch {
            url: url.to_string(),
            message: format!("HTTP {status}"),
        });
    }
    stream_body(&url, resp, cap, sink, progress)
}

fn failed(url: &Url, e: &dyn std::error::Error) -> ImageError {
    tracing::warn!(%url, error = %error_chain(e), "payload fetch failed");
    ImageError::Fetch {
        url: url.to_string(),
        message: "the connection failed or timed out".into(),
    }
}

/// One GET of `url` with `headers`, every hop's addresses checked against `limits` and the
/// connection pinned to them, redirects followed by hand (at most [`MAX_REDIRECTS`]).
/// `Authorization` goes only to the origin it was meant for: a registry's redirect of a
/// blob to a storage host gets no credentials. Returns the last URL and its answer,
/// whatever its status.
pub(crate) fn send(
    url: Url,
    limits: &FetchLimits,
    headers: &http::HeaderMap,
) -> Result<(Url, reqwest::blocking::Response), ImageError> {
    let origin = url.origin();
    let mut url = url;
    let mut hops = 0;
    loop {
        let addrs = checked_addrs(&url, &limits.addresses)?;
        let mut builder = reqwest::blocking::Client::builder()
            // An environment proxy would dial what we never checked.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            // Bounds each read of the body too, so a stalled server cannot hold a job.
            .timeout(Duration::from_secs(60));
        if let Some(Host::Domain(name)) = url.host() {
            builder = builder.resolve_to_addrs(name, &addrs);
        }
        let client = builder.build().map_err(|e| failed(&url, &e))?;
        let mut hop_headers = headers.clone();
        if url.origin() != origin {
            hop_headers.remove(http::header::AUTHORIZATION);
        }
        let resp = client
            .get(url.clone())
            .headers(hop_headers)
            .send()
            .map_err(|e| failed(&url, &e))?;
        let status = resp.status();
        if !status.is_redirection() {
            return Ok((url, resp));
        }
        let Some(location) = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
        else {
            return Err(ImageError::Fetch {
                url: url.to_string(),
                message: format!("HTTP {status} without a usable Location"),
            });
        };
        hops += 1;
        if hops > MAX_REDIRECTS {
            return Err(refused(
                &url,
                format!("more than {MAX_REDIRECTS} redirects; link the image directly"),
            ));
        }
        let next = url
            .join(location)
            .map_err(|e| refused(&url, format!("redirects to `{location}`, not a URL ({e})")))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(refused(
                &url,
                format!(
                    "redirects to a `{}` URL; only http and https are followed",
                    next.scheme()
                ),
            ));
        }
        url = next;
    }
}

/// Streams a successful answer's body into `sink`, at most `cap` bytes.
pub(crate) fn stream_body(
    url: &Url,
    mut resp: reqwest::blocking::Response,
    cap: Cap,
    sink: &mut dyn Write,
    progress: &mut dyn FnMut(Option<u64>, u64),
) -> Result<(), ImageError> {
    let too_large = || ImageError::TooLarge {
        url: url.to_string(),
        limit: cap.bytes,
        why: cap.why,
    };
    let length = resp.content_length();
    if length.is_some_and(|n| n > cap.bytes) {
        return Err(too_large());
    }
    progress(length, 0);
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(url, &e)),
        };
        total += n as u64;
        if total > cap.bytes {
            return Err(too_large());
        }
        sink.write_all(&buf[..n]).map_err(|e| {
            tracing::warn!(%url, error = %e, "storing a payload image failed");
            ImageError::Store(e.to_string())
        })?;
        progress(length, n as u64);
    }
    Ok(())
}

/// `reqwest` hides the cause (connection refused, DNS) in its source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// The test-support upstream on `ip`, answering with `respond(path)`'s raw bytes;
    /// its port and a count of its connections.
    fn server(
        ip: &str,
        respond: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
    ) -> (u16, Arc<AtomicUsize>) {
        let up = crate::testsupport::http_responder_on(ip.parse().unwrap(), respond);
        (up.port, up.connections)
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn redirect(to: &str) -> Vec<u8> {
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .into_bytes()
    }

    fn limits(allow: &[&str]) -> FetchLimits {
        FetchLimits {
            addresses: AddressPolicy::new(allow.iter().map(|c| c.parse().unwrap()).collect()),
            ..FetchLimits::default()
        }
    }

    fn get(url: &str, limits: &FetchLimits, cap: u64) -> Result<Vec<u8>, ImageError> {
        let url = requestor_url(url)?;
        let mut out = Vec::new();
        let cap = Cap {
            bytes: cap,
            why: "the test's cap",
        };
        fetch(url, limits, cap, &mut out, &mut |_, _| {})?;
        Ok(out)
    }

    #[test]
    fn only_http_and_https_are_fetched_for_requestors() {
        for url in [
            "file:///dev/zero",
            "file:///etc/hostname",
            "ftp://example.com/x",
            "/etc/passwd",
            "oci://r/x",
        ] {
            let e = requestor_url(url).unwrap_err();
            assert_eq!(crate::images::code(&e), "payload-url-refused", "{url}: {e}");
        }
        assert!(requestor_url("https://example.com/image.tar").is_ok());
    }

    #[test]
    fn loopback_is_refused_without_a_connection_unless_the_operator_opens_it() {
        let (port, hits) = server("127.0.0.1", |_| ok(b"image"));
        let url = format!("http://127.0.0.1:{port}/image.tar");
        for spelling in [
            url.clone(),
            format!("http://127.1:{port}/image.tar"),
            format!("http://0x7f.0.0.1:{port}/image.tar"),
            format!("http://[::ffff:127.0.0.1]:{port}/image.tar"),
            format!("http://localhost:{port}/image.tar"),
        ] {
            let e = get(&spelling, &limits(&[]), 1 << 20).unwrap_err();
            assert_eq!(
                crate::images::code(&e),
                "payload-url-refused",
                "{spelling}: {e}"
            );
            assert!(!e.to_string().contains("127.0.0.1 is"), "{e}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "a refused fetch connected");
        assert_eq!(
            get(&url, &limits(&["127.0.0.0/8"]), 1 << 20).unwrap(),
            b"image"
        );
    }

    #[test]
    fn redirects_are_checked_and_bounded() {
        // Only 127.0.0.1 is open; the redirect target listens on 127.0.0.2.
        let (hidden, hidden_hits) = server("127.0.0.2", |_| ok(b"secret"));
        let (port, _) = server("127.0.0.1", move |path| match path {
            "/to-hidden" => redirect(&format!("http://127.0.0.2:{hidden}/secret")),
            "/to-file" => redirect("file:///etc/hostname"),
            "/loop" => redirect("/loop"),
            p if p.starts_with("/hop/") => {
                let n: usize = p[5..].parse().unwrap();
                if n == 0 {
                    ok(b"image")
                } else {
                    redirect(&format!("/hop/{}", n - 1))
                }
            }
            _ => ok(b"image"),
        });
        let open = limits(&["127.0.0.1/32"]);
        let base = format!("http://127.0.0.1:{port}");
        let e = get(&format!("{base}/to-hidden"), &open, 1 << 20).unwrap_err();
        assert_eq!(crate::images::code(&e), "payload-url-refused", "{e}");
        assert_eq!(hidden_hits.load(Ordering::SeqCst), 0);
        let e = get(&format!("{base}/to-file"), &open, 1 << 20).unwrap_err();
        assert_eq!(crate::images::code(&e), "payload-url-refused", "{e}");
        let e = get(&format!("{base}/loop"), &open, 1 << 20).unwrap_err();
        assert_eq!(crate::images::code(&e), "payload-url-refused", "{e}");
        assert!(e.to_string().contains("redirects"), "{e}");
        assert_eq!(
            get(&format!("{base}/hop/{MAX_REDIRECTS}"), &open, 1 << 20).unwrap(),
            b"image"
        );
        let e = get(&format!("{base}/hop/{}", MAX_REDIRECTS + 1), &open, 1 << 20).unwrap_err();
        assert_eq!(crate::images::code(&e), "payload-url-refused", "{e}");
    }

    #[test]
    fn the_size_cap_holds_with_and_without_a_length() {
        let (port, _) = server("127.0.0.1", |path| match path {
            "/sized" => ok(&[7u8; 5000]),
            // No length: the body ends when the connection closes.
            _ => {
                let mut r = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                r.extend_from_slice(&[7u8; 5000]);
                r
            }
        });
        let open = limits(&["127.0.0.0/8"]);
        for path in ["sized", "streamed"] {
            let url = format!("http://127.0.0.1:{port}/{path}");
            let e = get(&url, &open, 1000).unwrap_err();
            assert_eq!(crate::images::code(&e), "payload-too-large", "{path}: {e}");
            assert_eq!(get(&url, &open, 5000).unwrap().len(), 5000);
        }
    }

    #[test]
    fn socket_errors_do_not_tell_refused_from_reset() {
        let open = limits(&["127.0.0.0/8"]);
        // A port with nothing listening, and a server that closes without answering.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (reset, _) = server("127.0.0.1", |_| Vec::new());
        let a = get(&format!("http://127.0.0.1:{closed}/x"), &open, 100).unwrap_err();
        let b = get(&format!("http://127.0.0.1:{reset}/x"), &open, 100).unwrap_err();
        assert_eq!(crate::images::code(&a), "payload-fetch-failed");
        assert_eq!(
            a.to_string().replace(&closed.to_string(), "P"),
            b.to_string().replace(&reset.to_string(), "P")
        );
    }

    #[test]
    fn the_cap_is_the_smaller_of_the_setting_and_the_free_disk() {
        let l = FetchLimits {
            addresses: AddressPolicy::default(),
            max_bytes: 100,
            disk_reserve: 50,
        };
        assert_eq!(l.cap(None).bytes, 100);
        assert_eq!(l.cap(Some(1000)).bytes, 100);
        assert_eq!(l.cap(Some(120)).bytes, 70);
        assert_eq!(l.cap(Some(10)).bytes, 0);
    }
}
