//! The per-job allowlist: the manifest's `net.inet.out` intersected with the operator's mode.
//!
//! A listed URL allows its scheme, its host (a name only by that name, an IP literal only by
//! that literal), its port (the scheme's default when the URL has none) and, for plain HTTP
//! and WebSocket requests, its path as a segment prefix. `CONNECT host:port` is a TLS
//! tunnel, so it is allowed by an `https` or `wss` URL for that host and port; the path of
//! such a URL cannot be enforced inside TLS. How requests reach this check (and which
//! addresses may be dialed afterwards) is the proxy's business, see [`super::proxy`].

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use policies::{Mode, Outbound, WhitelistMatcher};
use url::Url;

use super::addr::AddressPolicy;

/// A scheme the proxy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
    Ws,
    Wss,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            "ws" => Some(Scheme::Ws),
            "wss" => Some(Scheme::Wss),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http | Scheme::Ws => 80,
            Scheme::Https | Scheme::Wss => 443,
        }
    }
}

/// A destination host, normalized for comparison: names are lowercase without the root's
/// trailing dot (punycode for international names), IP literals are parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

/// Why a host string from a request is not a host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid host")]
pub struct BadHost(pub String);

impl Host {
    /// Parses a host as it appears in a URL or a request target (IPv6 in brackets). Uses the
    /// URL standard's host parser, so `0x7f.1` and `2130706433` are the IPv4 address they
    /// would become anyway, not names that slip past the IP-literal rule.
    pub fn parse(text: &str) -> Result<Self, BadHost> {
        match url::Host::parse(text) {
            Ok(url::Host::Domain(d)) => {
                let d = d.trim_end_matches('.');
                if d.is_empty() {
                    Err(BadHost(text.to_owned()))
                } else {
                    Ok(Host::Name(d.to_ascii_lowercase()))
                }
            }
            Ok(url::Host::Ipv4(a)) => Ok(Host::Ip(IpAddr::V4(a))),
            Ok(url::Host::Ipv6(a)) => Ok(Host::Ip(IpAddr::V6(a))),
            Err(_) => Err(BadHost(text.to_owned())),
        }
    }

    fn from_url(url: &Url) -> Option<Self> {
        match url.host()? {
            url::Host::Domain(d) => {
                let d = d.trim_end_matches('.');
                (!d.is_empty()).then(|| Host::Name(d.to_ascii_lowercase()))
            }
            url::Host::Ipv4(a) => Some(Host::Ip(IpAddr::V4(a))),
            url::Host::Ipv6(a) => Some(Host::Ip(IpAddr::V6(a))),
        }
    }

    /// The form the domain whitelist expects (no brackets).
    fn whitelist_form(&self) -> String {
        match self {
            Host::Name(n) => n.clone(),
            Host::Ip(a) => a.to_string(),
        }
    }
}

impl fmt::Display for Host {
    /// The authority form: IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// How the client wants to reach a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// An absolute-form plain HTTP request for this path.
    Http { path: String },
    /// A plain HTTP request asking to upgrade to WebSocket on this path.
    WebSocket { path: String },
    /// `CONNECT`: a TLS tunnel.
    Tunnel,
}

impl Access {
    fn name(&self) -> &'static str {
        match self {
            Access::Http { .. } => "plain HTTP",
            Access::WebSocket { .. } => "WebSocket",
            Access::Tunnel => "CONNECT (TLS)",
        }
    }

    fn accepts(&self, scheme: Scheme) -> bool {
        match self {
            Access::Http { .. } => scheme == Scheme::Http,
            Access::WebSocket { .. } => scheme == Scheme::Ws,
            Access::Tunnel => matches!(scheme, Scheme::Https | Scheme::Wss),
        }
    }

    fn path(&self) -> Option<&str> {
        match self {
            Access::Http { path } | Access::WebSocket { path } => Some(path),
            Access::Tunnel => None,
        }
    }
}

/// A destination as the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: Host,
    pub port: u16,
    pub access: Access,
}

/// One manifest URL, ready to compare.
#[derive(Debug, Clone)]
struct UrlRule {
    scheme: Scheme,
    host: Host,
    port: u16,
    path: String,
    /// The URL as the manifest wrote it (after parsing), for the audit log.
    text: String,
}

#[derive(Debug, Clone)]
enum Allowlist {
    /// Nothing is allowed; `code` and `why` explain it.
    Nothing { code: DenyCode, why: String },
    Urls {
        rules: Vec<UrlRule>,
        /// URLs the manifest lists that the operator's whitelist does not cover: kept to
        /// tell the requestor why their listed host is refused.
        unwhitelisted: Vec<UrlRule>,
    },
    Unrestricted {
        protocols: Vec<Scheme>,
        /// Mode `whitelist`: only hosts on the domain whitelist.
        whitelist: Option<WhitelistMatcher>,
    },
}

/// Stable codes for refusals; they appear as `rule` in the audit log and in the proxy's
/// responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyCode {
    /// The operator's mode is `none`.
    OutboundNone,
    /// The manifest lists no outbound URLs.
    NoOutbound,
    /// The host is not listed.
    NotListed,
    /// An IP literal that no IP-literal URL lists.
    IpLiteral,
    /// The host is listed, but not for this scheme (or not for CONNECT/plain HTTP).
    WrongScheme,
    /// The host is listed, but not on this port.
    WrongPort,
    /// The host and port are listed, but not this path.
    PathNotAllowed,
    /// The manifest lists the host, the operator's domain whitelist does not.
    NotWhitelisted,
    /// A resolved address is in a denied range.
    AddressDenied,
    /// The destination is this proxy.
    SelfTarget,
    /// The request already passed through this proxy.
    Loop,
    /// The `Host` header names another host than the request URI.
    HostMismatch,
    /// The TLS ClientHello names another host than CONNECT.
    SniMismatch,
    /// The tunnel did not start with a usable TLS ClientHello.
    NotTls,
    /// The request is not something this proxy serves.
    BadRequest,
    /// The request line and headers are longer than the limit.
    HeadTooLarge,
    /// The request asks to switch protocols, and no `ws` URL (or protocol) allows a
    /// WebSocket upgrade to the destination, or it asks for another protocol.
    UpgradeNotAllowed,
    /// The upstream answered `101 Switching Protocols` to a request that did not ask for
    /// it, or switched to another protocol than the one asked for.
    UnrequestedUpgrade,
    /// The job already has its maximum of concurrent tunnels.
    TooManyTunnels,
    /// The job has used its byte budget.
    ByteBudget,
    /// The proxy serves its maximum of connections.
    TooManyConnections,
    /// The name did not resolve.
    DnsFailed,
    /// No resolved address accepted a connection, or the upstream failed.
    UpstreamFailed,
}

impl DenyCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::OutboundNone => "outbound-none",
            DenyCode::NoOutbound => "no-outbound",
            DenyCode::NotListed => "not-listed",
            DenyCode::IpLiteral => "ip-literal",
            DenyCode::WrongScheme => "wrong-scheme",
            DenyCode::WrongPort => "wrong-port",
            DenyCode::PathNotAllowed => "path-not-allowed",
            DenyCode::NotWhitelisted => "not-whitelisted",
            DenyCode::AddressDenied => "address-denied",
            DenyCode::SelfTarget => "self",
            DenyCode::Loop => "loop",
            DenyCode::HostMismatch => "host-mismatch",
            DenyCode::SniMismatch => "sni-mismatch",
            DenyCode::NotTls => "not-tls",
            DenyCode::BadRequest => "bad-request",
            DenyCode::HeadTooLarge => "head-too-large",
            DenyCode::UpgradeNotAllowed => "upgrade-not-allowed",
            DenyCode::UnrequestedUpgrade => "unrequested-upgrade",
            DenyCode::TooManyTunnels => "too-many-tunnels",
            DenyCode::ByteBudget => "byte-budget",
            DenyCode::TooManyConnections => "too-many-connections",
            DenyCode::DnsFailed => "dns-failed",
            DenyCode::UpstreamFailed => "upstream-failed",
        }
    }

    /// The HTTP status a client gets: 403 policy, 400 bad input, 431/429/503 limits, 502
    /// upstream trouble.
    pub fn status(self) -> u16 {
        match self {
            DenyCode::BadRequest => 400,
            DenyCode::HeadTooLarge => 431,
            DenyCode::TooManyTunnels => 429,
            DenyCode::ByteBudget | DenyCode::TooManyConnections => 503,
            DenyCode::DnsFailed | DenyCode::UpstreamFailed | DenyCode::UnrequestedUpgrade => 502,
            _ => 403,
        }
    }
}

impl fmt::Display for DenyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a stable code and a sentence for the client and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: DenyCode,
    pub message: String,
}

impl Denial {
    pub fn new(code: DenyCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Bounds on what one job may do through the proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent CONNECT tunnels and WebSocket upgrades (429 beyond).
    pub max_tunnels: usize,
    /// Body and tunnel bytes, both directions together, over the job's life (503 once
    /// spent; a transfer that crosses it is cut).
    pub max_bytes: u64,
    /// A connection with no byte moving in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// The request line and headers together, up to and including the empty line that
    /// ends them: a longer request head gets 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// Time to establish the TCP connection to an upstream address.
    pub connect_timeout: Duration,
    /// Concurrent client connections a listener serves (503 beyond).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_tunnels: 64,
            max_bytes: 64 << 30,
            idle_timeout: Duration::from_secs(120),
            max_header_bytes: 64 << 10,
            connect_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Everything the proxy needs to know about one job's outbound traffic.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    job: String,
    allowlist: Allowlist,
    addresses: AddressPolicy,
    limits: Limits,
}

impl EgressPolicy {
    /// The job's policy: the manifest's outbound request, the operator's mode (the verdict's
    /// matched rule) and domain whitelist, the CIDRs the operator opens, and the limits.
    ///
    /// Mode `all` grants what the manifest asks (its URLs, or any URL with its protocols
    /// when it is `unrestricted`); `whitelist` grants the same but only for hosts on the
    /// domain whitelist; `none` grants nothing.
    pub fn new(
        job: impl Into<String>,
        outbound: &Outbound,
        mode: Mode,
        whitelist: &WhitelistMatcher,
        addresses: AddressPolicy,
        limits: Limits,
    ) -> Self {
        let allowlist = match (mode, outbound) {
            (Mode::None, _) => Allowlist::Nothing {
                code: DenyCode::OutboundNone,
                why: "the operator allows this job no outbound traffic (mode none)".into(),
            },
            (_, Outbound::None) => Allowlist::Nothing {
                code: DenyCode::NoOutbound,
                why:
                    "the manifest asks for no outbound traffic (no compManifest.net.inet.out URLs)"
                        .into(),
            },
            (_, Outbound::Unrestricted { protocols }) => Allowlist::Unrestricted {
                protocols: protocols.iter().filter_map(|p| Scheme::parse(p)).collect(),
                whitelist: (mode == Mode::Whitelist).then(|| whitelist.clone()),
            },
            (_, Outbound::Urls { urls, .. }) => {
                let all: Vec<UrlRule> = urls.iter().filter_map(url_rule).collect();
                let (rules, unwhitelisted) = if mode == Mode::Whitelist {
                    all.into_iter()
                        .partition(|r| whitelist.matches(&r.host.whitelist_form()))
                } else {
                    (all, Vec::new())
                };
                Allowlist::Urls {
                    rules,
                    unwhitelisted,
                }
            }
        };
        Self {
            job: job.into(),
            allowlist,
            addresses,
            limits,
        }
    }

    pub fn job(&self) -> &str {
        &self.job
    }

    pub fn addresses(&self) -> &AddressPolicy {
        &self.addresses
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// What the policy allows and refuses, one line each, for an operator to read.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.allowlist {
            Allowlist::Nothing { code, why } => {
                lines.push(format!("allow nothing ({code}: {why})"))
            }
            Allowlist::Urls {
                rules,
                unwhitelisted,
            } => {
                for r in rules {
                    let what = match r.scheme {
                        Scheme::Http => {
                            format!("plain HTTP to {}:{} under {}", r.host, r.port, r.path)
                        }
                        Scheme::Ws => {
                            format!("WebSocket to {}:{} under {}", r.host, r.port, r.path)
                        }
                        Scheme::Https | Scheme::Wss => {
                            format!("CONNECT {}:{} (TLS, SNI {})", r.host, r.port, r.host)
                        }
                    };
                    lines.push(format!("allow {what} (from {})", r.text));
                }
                for r in unwhitelisted {
                    lines.push(format!("refuse {} (not on the domain whitelist)", r.text));
                }
                if rules.is_empty() {
                    lines.push("allow nothing (no listed URL is on the domain whitelist)".into());
                }
            }
            Allowlist::Unrestricted {
                protocols,
                whitelist,
            } => {
                let names: Vec<&str> = protocols.iter().map(|s| s.as_str()).collect();
                let hosts = if whitelist.is_some() {
                    "hosts on the domain whitelist"
                } else {
                    "any host"
                };
                lines.push(format!(
                    "allow {} to {hosts}, any port (unrestricted)",
                    names.join(", ")
                ));
            }
        }
        let cidrs: Vec<String> = self
            .addresses
            .allowed_cidrs()
            .iter()
            .map(|c| c.to_string())
            .collect();
        if cidrs.is_empty() {
            lines.push("addresses: public unicast only".into());
        } else {
            lines.push(format!(
                "addresses: public unicast and {}",
                cidrs.join(", ")
            ));
        }
        lines
    }

    /// Which rule allows the destination (its text, for the audit log), or why none does.
    ///
    /// A WebSocket upgrade to a destination that is listed, but not by a `ws` URL (or, when
    /// unrestricted, without the `ws` protocol), is `upgrade-not-allowed`: after the `101`
    /// the connection carries whatever the two ends speak, so only a manifest that asked
    /// for WebSocket gets one.
    pub fn check(&self, dest: &Destination) -> Result<String, Denial> {
        self.check_access(dest).map_err(|d| match (&dest.access, d.code) {
            (Access::WebSocket { .. }, DenyCode::WrongScheme) => Denial::new(
                DenyCode::UpgradeNotAllowed,
                format!(
                    "a WebSocket upgrade to {}:{} needs a ws:// URL for it (or the ws protocol) in the manifest; {}",
                    dest.host, dest.port, d.message
                ),
            ),
            _ => d,
        })
    }

    fn check_access(&self, dest: &Destination) -> Result<String, Denial> {
        match &self.allowlist {
            Allowlist::Nothing { code, why } => Err(Denial::new(*code, why.clone())),
            Allowlist::Unrestricted {
                protocols,
                whitelist,
            } => {
                if !protocols.iter().any(|s| dest.access.accepts(*s)) {
                    let names: Vec<&str> = protocols.iter().map(|s| s.as_str()).collect();
                    return Err(Denial::new(
                        DenyCode::WrongScheme,
                        format!(
                            "{} is not among the manifest's protocols [{}]",
                            dest.access.name(),
                            names.join(", ")
                        ),
                    ));
                }
                if let Some(w) = whitelist {
                    if !w.matches(&dest.host.whitelist_form()) {
                        return Err(Denial::new(
                            DenyCode::NotWhitelisted,
                            format!("{} is not on the operator's domain whitelist", dest.host),
                        ));
                    }
                }
                Ok("unrestricted".into())
            }
            Allowlist::Urls {
                rules,
                unwhitelisted,
            } => match best_match(rules, dest) {
                Ok(rule) => Ok(rule.text.clone()),
                Err(denial) => {
                    if denial.code == DenyCode::NotListed || denial.code == DenyCode::IpLiteral {
                        if let Ok(r) = best_match(unwhitelisted, dest) {
                            return Err(Denial::new(
                                DenyCode::NotWhitelisted,
                                format!(
                                    "the manifest lists {} but the operator's domain whitelist does not cover {}",
                                    r.text, dest.host
                                ),
                            ));
                        }
                    }
                    Err(denial)
                }
            },
        }
    }
}

fn url_rule(url: &Url) -> Option<UrlRule> {
    let scheme = Scheme::parse(url.scheme())?;
    Some(UrlRule {
        scheme,
        host: Host::from_url(url)?,
        port: url.port().unwrap_or(scheme.default_port()),
        path: url.path().to_owned(),
        text: url.as_str().to_owned(),
    })
}

/// The first rule that allows `dest`, or the most specific reason none does: a listed host
/// on the wrong path beats the wrong port, which beats the wrong scheme.
fn best_match<'r>(rules: &'r [UrlRule], dest: &Destination) -> Result<&'r UrlRule, Denial> {
    let mut same_host = rules.iter().filter(|r| r.host == dest.host).peekable();
    if same_host.peek().is_none() {
        return Err(match dest.host {
            Host::Ip(ip) => Denial::new(
                DenyCode::IpLiteral,
                format!("the IP literal {ip} is not listed; an IP literal is only allowed by a URL with that literal"),
            ),
            Host::Name(ref n) => Denial::new(
                DenyCode::NotListed,
                format!("{n} is not listed in the manifest's outbound URLs"),
            ),
        });
    }
    // The closest miss explains best: the right scheme and port but not the path, then
    // the right port but not the scheme, then the right scheme but not the port.
    let mut closest = (0, DenyCode::WrongScheme);
    for r in same_host {
        let scheme_ok = dest.access.accepts(r.scheme);
        let port_ok = r.port == dest.port;
        let miss = match (scheme_ok, port_ok) {
            (true, true) => match dest.access.path() {
                Some(path) if !path_allowed(&r.path, path) => (3, DenyCode::PathNotAllowed),
                _ => return Ok(r),
            },
            (false, true) => (2, DenyCode::WrongScheme),
            (true, false) => (1, DenyCode::WrongPort),
            (false, false) => (0, DenyCode::WrongScheme),
        };
        if miss.0 > closest.0 {
            closest = miss;
        }
    }
    let reason = closest.1;
    let message = match reason {
        DenyCode::PathNotAllowed => {
            let path = dest.access.path().unwrap_or("");
            match path_trick(path) {
                Some(why) => format!(
                    "{}:{} is listed under a path prefix, and the path {path} has {why}: an upstream may read it as a path outside the prefix",
                    dest.host, dest.port
                ),
                None => format!(
                    "{}:{} is listed, but not for the path {path}",
                    dest.host, dest.port
                ),
            }
        }
        DenyCode::WrongPort => format!("{} is listed, but not on port {}", dest.host, dest.port),
        _ => format!(
            "{} is listed, but not for {} on port {}",
            dest.host,
            dest.access.name(),
            dest.port
        ),
    };
    Err(Denial::new(reason, message))
}

/// `prefix` (a URL path) allows `path` when `path` is `prefix` or continues it at a segment
/// boundary: `/v1` allows `/v1`, `/v1/x`, not `/v1x`. Below a prefix other than `/`, a path
/// that an upstream could read as another path ([`path_trick`]) is refused rather than
/// interpreted.
pub fn path_allowed(prefix: &str, path: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    if path_trick(path).is_some() {
        return false;
    }
    // Compared in RFC 3986's normal form, so every spelling of one path gets one answer.
    let (prefix, path) = (normal_escapes(prefix), normal_escapes(path));
    match path.strip_prefix(prefix.as_str()) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why an upstream might read `path` as another path than its text says (and so possibly
/// one outside the prefix that was checked), or `None` for a plain path.
///
/// The rule: take the path as sent, then percent-decode it (every valid `%XX` once), then
/// decode that again, and so on while escapes are left; each of these forms must be plain.
/// A form is plain when
///
/// - it is valid UTF-8 (so no overlong encodings such as `%c0%ae` for `.` or `%c0%af` for
///   `/`, no surrogates, no stray bytes);
/// - it has no backslash and no control character (U+0000 to U+001F, U+007F);
/// - none of its escapes decodes to `.`, `/` or `\` (so `%2e`, and on the next form the
///   `%2e` that `%252e` becomes);
/// - no segment (between `/`s), with any `;` parameters cut off as Tomcat, Jetty and Spring
///   do, is made only of dots and spaces with at least one dot (`.`, `..`, `..;x`, `.;`,
///   `...`, `.. ` that Windows file systems turn into `..`);
///
/// and in the form as sent every `%` starts an escape of two hex digits (a literal `%` is
/// `%25`). Decoding always ends: each round removes two bytes per escape.
pub fn path_trick(path: &str) -> Option<&'static str> {
    let mut form = path.as_bytes().to_vec();
    let mut first = true;
    loop {
        if std::str::from_utf8(&form).is_err() {
            return Some(
                "bytes that are not valid UTF-8 once percent-decoded (as overlong encodings of `.` and `/` are)",
            );
        }
        if form.contains(&b'\\') {
            return Some("a backslash, which some servers read as `/`");
        }
        if form.iter().any(|b| b.is_ascii_control()) {
            return Some("a control character");
        }
        if form.split(|b| *b == b'/').any(dot_segment) {
            return Some(
                "a dot segment (`.` or `..`, also with `;` parameters or trailing spaces)",
            );
        }
        let mut decoded = Vec::with_capacity(form.len());
        let mut escapes = false;
        let mut i = 0;
        while i < form.len() {
            let escape = (form[i] == b'%')
                .then(|| Some((hex(*form.get(i + 1)?)? << 4) | hex(*form.get(i + 2)?)?))
                .flatten();
            match escape {
                Some(b'.' | b'/' | b'\\') => {
                    return Some("an encoded `.`, `/` or `\\` (at any depth of percent-encoding)")
                }
                Some(b) => {
                    decoded.push(b);
                    escapes = true;
                    i += 3;
                }
                None if first && form[i] == b'%' => {
                    return Some("a `%` that starts no escape of two hex digits")
                }
                None => {
                    decoded.push(form[i]);
                    i += 1;
                }
            }
        }
        if !escapes {
            return None;
        }
        form = decoded;
        first = false;
    }
}

/// A segment that some upstream reads as `.` or `..`: only dots and spaces, at least one
/// dot, once `;` parameters are cut off.
fn dot_segment(segment: &[u8]) -> bool {
    let name = segment.split(|b| *b == b';').next().unwrap_or_default();
    name.contains(&b'.') && name.iter().all(|b| matches!(b, b'.' | b' '))
}

/// `text` with RFC 3986's percent-encoding normalisation (§6.2.2.1-2): an escape of an
/// unreserved character other than `.` becomes the character (`%61` is `a`, `%7E` is `~`),
/// and the hex digits of the other escapes are upper case (`%2f` is `%2F`). A `.` stays
/// encoded: [`path_trick`] refuses `%2E` under a prefix before this is used.
fn normal_escapes(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let escape = (b[i] == b'%')
            .then(|| Some((hex(*b.get(i + 1)?)? << 4) | hex(*b.get(i + 2)?)?))
            .flatten();
        match escape {
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'~') => {
                out.push(c as char);
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push_str(&text[i + 1..i + 3].to_ascii_uppercase());
                i += 3;
            }
            None => {
                // Whole characters: `text` is a `&str`, and only ASCII was consumed above.
                let c = text[i..].chars().next().expect("within the text");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::{DomainPattern, PatternMatch};

    fn outbound(urls: &[&str]) -> Outbound {
        Outbound::Urls {
            protocols: vec!["http".into(), "https".into(), "ws".into(), "wss".into()],
            urls: urls.iter().map(|u| Url::parse(u).unwrap()).collect(),
        }
    }

    fn whitelist(hosts: &[&str]) -> WhitelistMatcher {
        let p: Vec<DomainPattern> = hosts
            .iter()
            .map(|h| DomainPattern {
                domain: (*h).into(),
                match_: PatternMatch::Strict,
            })
            .collect();
        WhitelistMatcher::new(&p).unwrap()
    }

    fn policy(urls: &[&str], mode: Mode) -> EgressPolicy {
        EgressPolicy::new(
            "job",
            &outbound(urls),
            mode,
            &whitelist(&[]),
            AddressPolicy::default(),
            Limits::default(),
        )
    }

    fn http(host: &str, port: u16, path: &str) -> Destination {
        Destination {
            host: Host::parse(host).unwrap(),
            port,
            access: Access::Http { path: path.into() },
        }
    }

    fn tunnel(host: &str, port: u16) -> Destination {
        Destination {
            host: Host::parse(host).unwrap(),
            port,
            access: Access::Tunnel,
        }
    }

    fn code(r: Result<String, Denial>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    #[test]
    fn https_url_allows_connect_to_its_host_and_port_only() {
        let p = policy(
            &["https://api.example.com", "wss://ws.example.com:8443/x"],
            Mode::All,
        );
        assert_eq!(
            p.check(&tunnel("api.example.com", 443)).unwrap(),
            "https://api.example.com/"
        );
        assert_eq!(
            p.check(&tunnel("API.Example.com.", 443)).unwrap(),
            "https://api.example.com/"
        );
        assert!(p.check(&tunnel("ws.example.com", 8443)).is_ok());
        assert_eq!(
            code(p.check(&tunnel("api.example.com", 8443))),
            "wrong-port"
        );
        assert_eq!(
            code(p.check(&tunnel("evil.example.com", 443))),
            "not-listed"
        );
        assert_eq!(
            code(p.check(&tunnel("api.example.com.evil.net", 443))),
            "not-listed"
        );
        assert_eq!(
            code(p.check(&http("api.example.com", 443, "/"))),
            "wrong-scheme"
        );
    }

    #[test]
    fn http_url_allows_its_path_prefix_on_segment_boundaries() {
        let p = policy(
            &["http://h.example/v1", "http://h.example:8080/"],
            Mode::All,
        );
        assert!(p.check(&http("h.example", 80, "/v1")).is_ok());
        assert!(p.check(&http("h.example", 80, "/v1/items")).is_ok());
        assert_eq!(
            code(p.check(&http("h.example", 80, "/v1x"))),
            "path-not-allowed"
        );
        assert_eq!(
            code(p.check(&http("h.example", 80, "/v1/../admin"))),
            "path-not-allowed"
        );
        assert_eq!(
            code(p.check(&http("h.example", 80, "/v1/%2e%2e/admin"))),
            "path-not-allowed"
        );
        assert_eq!(
            code(p.check(&http("h.example", 80, "/v1%2F..%2Fadmin"))),
            "path-not-allowed"
        );
        assert!(p
            .check(&http("h.example", 8080, "/anything/../at/all"))
            .is_ok());
        assert_eq!(code(p.check(&http("h.example", 81, "/v1"))), "wrong-port");
        assert_eq!(code(p.check(&tunnel("h.example", 80))), "wrong-scheme");
    }

    /// Paths an upstream may decode or normalize out of the prefix: refused with the same
    /// code as plain dot segments, whatever layer of encoding hides them.
    #[test]
    fn path_tricks_below_a_prefix_are_refused() {
        let p = policy(
            &["http://h.example/allowed/", "http://h.example/v1"],
            Mode::All,
        );
        for path in [
            // dot segments and encoded dots, slashes, backslashes (the rule before)
            "/allowed/../admin",
            "/allowed/./x",
            "/allowed/%2e%2e/admin",
            "/allowed/%2E./admin",
            "/allowed/..%2fadmin",
            "/allowed/..%5cadmin",
            "/allowed/..\\admin",
            // double and triple percent-encoding
            "/allowed/%252e%252e/admin",
            "/allowed/%252E%252E/admin",
            "/allowed/%25252e%25252e/admin",
            "/allowed/..%252fadmin",
            "/allowed/..%255cadmin",
            "/allowed/%25%32%65%25%32%65/admin",
            // path parameters that Tomcat, Jetty and Spring strip before normalizing
            "/allowed/..;/admin",
            "/allowed/..;foo/admin",
            "/allowed/.;x/admin",
            "/allowed/..%3b/admin",
            "/allowed/..%253b/admin",
            "/v1/..;/admin",
            // overlong UTF-8 for `.`, `/` and `\`, and other invalid UTF-8
            "/allowed/%c0%ae%c0%ae/admin",
            "/allowed/%C0%AE%C0%AE/admin",
            "/allowed/..%c0%afadmin",
            "/allowed/..%c1%9cadmin",
            "/allowed/%e0%80%ae%e0%80%ae/admin",
            "/allowed/%f0%80%80%ae%f0%80%80%ae/admin",
            "/allowed/%25c0%25ae%25c0%25ae/admin",
            "/allowed/%ed%a0%80",
            "/allowed/%ff",
            // escapes that are not escapes, control characters
            "/allowed/%zz",
            "/allowed/100%",
            "/allowed/%2",
            "/allowed/.%00./admin",
            "/allowed/x%0a",
            // segments that Windows filesystems reduce to `..`
            "/allowed/..%20/admin",
            "/allowed/.../admin",
            "/allowed/. ./admin",
        ] {
            assert_eq!(
                code(p.check(&http("h.example", 80, path))),
                "path-not-allowed",
                "{path}"
            );
        }
    }

    #[test]
    fn ordinary_paths_below_a_prefix_pass() {
        let p = policy(&["http://h.example/allowed/"], Mode::All);
        for path in [
            "/allowed/",
            "/allowed/a%20b.txt",
            "/allowed/file.tar.gz",
            "/allowed/v1.2/x",
            "/allowed/.hidden",
            "/allowed/..foo",
            "/allowed/a..b/c.",
            "/allowed/caf%C3%A9.txt",
            "/allowed/%e2%82%ac/%F0%9F%98%80.png",
            "/allowed/caf\u{e9}.txt",
            "/allowed/100%25.txt",
            "/allowed/100%25%20off",
            "/allowed/%2541",
            "/allowed/x;jsessionid=1/y",
            "/allowed/a//b",
            "/allowed/%20",
        ] {
            assert!(p.check(&http("h.example", 80, path)).is_ok(), "{path}");
        }
        // Below `/` nothing can leave the prefix, so nothing is refused for its form.
        let root = policy(&["http://h.example/"], Mode::All);
        assert!(root
            .check(&http("h.example", 80, "/%252e%252e/..;/x"))
            .is_ok());
    }

    #[test]
    fn upgrades_need_a_ws_url_or_the_ws_protocol() {
        let ws = |host: &str, path: &str| Destination {
            host: Host::parse(host).unwrap(),
            port: 80,
            access: Access::WebSocket { path: path.into() },
        };
        let p = policy(
            &["http://h.example/", "https://h.example", "ws://w.example/s"],
            Mode::All,
        );
        assert_eq!(code(p.check(&ws("h.example", "/"))), "upgrade-not-allowed");
        assert!(p.check(&ws("w.example", "/s")).is_ok());
        assert_eq!(code(p.check(&ws("w.example", "/t"))), "path-not-allowed");
        assert_eq!(code(p.check(&ws("x.example", "/"))), "not-listed");
        let unrestricted = |protocols: &[&str]| {
            EgressPolicy::new(
                "job",
                &Outbound::Unrestricted {
                    protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
                },
                Mode::All,
                &whitelist(&[]),
                AddressPolicy::default(),
                Limits::default(),
            )
        };
        assert_eq!(
            code(unrestricted(&["http", "https", "wss"]).check(&ws("any.example", "/"))),
            "upgrade-not-allowed"
        );
        assert!(unrestricted(&["ws"]).check(&ws("any.example", "/")).is_ok());
    }

    #[test]
    fn ws_urls_allow_only_websocket_upgrades() {
        let p = policy(&["ws://w.example/socket"], Mode::All);
        let ws = Destination {
            host: Host::parse("w.example").unwrap(),
            port: 80,
            access: Access::WebSocket {
                path: "/socket".into(),
            },
        };
        assert!(p.check(&ws).is_ok());
        assert_eq!(
            code(p.check(&http("w.example", 80, "/socket"))),
            "wrong-scheme"
        );
    }

    #[test]
    fn ip_literals_match_only_ip_literal_urls() {
        let p = policy(
            &["https://api.example.com", "http://[2606:4700::1]:8080/"],
            Mode::All,
        );
        assert_eq!(code(p.check(&tunnel("93.184.216.34", 443))), "ip-literal");
        assert!(p.check(&http("[2606:4700::1]", 8080, "/")).is_ok());
        assert!(p.check(&http("[2606:4700:0::1]", 8080, "/")).is_ok());
        // Numeric host spellings are parsed as the addresses they are.
        let p = policy(&["http://127.0.0.1:8080/"], Mode::All);
        assert!(p.check(&http("2130706433", 8080, "/")).is_ok());
        assert!(p.check(&http("0x7f.1", 8080, "/")).is_ok());
        assert_eq!(
            code(p.check(&http("[::ffff:127.0.0.1]", 8080, "/"))),
            "ip-literal"
        );
    }

    #[test]
    fn operator_mode_intersects_the_manifest() {
        let urls = ["https://a.example", "https://b.example"];
        let p = EgressPolicy::new(
            "job",
            &outbound(&urls),
            Mode::Whitelist,
            &whitelist(&["a.example"]),
            AddressPolicy::default(),
            Limits::default(),
        );
        assert!(p.check(&tunnel("a.example", 443)).is_ok());
        assert_eq!(code(p.check(&tunnel("b.example", 443))), "not-whitelisted");
        assert_eq!(code(p.check(&tunnel("c.example", 443))), "not-listed");
        assert_eq!(
            code(policy(&urls, Mode::None).check(&tunnel("a.example", 443))),
            "outbound-none"
        );
        let none = EgressPolicy::new(
            "job",
            &Outbound::None,
            Mode::All,
            &whitelist(&[]),
            AddressPolicy::default(),
            Limits::default(),
        );
        assert_eq!(code(none.check(&tunnel("a.example", 443))), "no-outbound");
    }

    #[test]
    fn unrestricted_allows_its_protocols_and_honours_the_whitelist() {
        let out = Outbound::Unrestricted {
            protocols: vec!["https".into()],
        };
        let all = EgressPolicy::new(
            "job",
            &out,
            Mode::All,
            &whitelist(&[]),
            AddressPolicy::default(),
            Limits::default(),
        );
        assert_eq!(
            all.check(&tunnel("any.example", 8443)).unwrap(),
            "unrestricted"
        );
        assert!(all.check(&tunnel("8.8.8.8", 443)).is_ok());
        assert_eq!(
            code(all.check(&http("any.example", 80, "/"))),
            "wrong-scheme"
        );
        let wl = EgressPolicy::new(
            "job",
            &out,
            Mode::Whitelist,
            &whitelist(&["ok.example"]),
            AddressPolicy::default(),
            Limits::default(),
        );
        assert!(wl.check(&tunnel("ok.example", 443)).is_ok());
        assert_eq!(
            code(wl.check(&tunnel("any.example", 443))),
            "not-whitelisted"
        );
    }

    #[test]
    fn host_parsing() {
        assert_eq!(
            Host::parse("Example.COM.").unwrap(),
            Host::Name("example.com".into())
        );
        assert_eq!(
            Host::parse("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(Host::parse("[::1]").unwrap().to_string(), "[::1]");
        assert!(Host::parse("a b").is_err());
        assert!(Host::parse(".").is_err());
        assert!(Host::parse("").is_err());
    }
}
