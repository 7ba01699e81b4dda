//! The Computation Payload Manifest (Golem's format) and its validation.
//!
//! Every object rejects unknown fields: a field we do not understand could carry a
//! constraint we would otherwise silently ignore. Parse errors name the field by its JSON
//! path (`compManifest.net.inet.out.urls[1]`).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use url::Url;

use exescript::Match;

/// How far in the future `createdAt` may be (clock skew between requestor and provider).
pub const CREATED_AT_SKEW: Duration = Duration::minutes(5);

/// Protocols a manifest may ask for, and the default when it names none (Golem's schema).
pub const KNOWN_PROTOCOLS: [&str; 4] = ["http", "https", "ws", "wss"];

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid base64: {0}")]
    Base64(String),
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest field `{field}`: {message}")]
    Field { field: String, message: String },
    #[error("manifest expired at {expires_at} (now {now}); ask the requestor for a fresh one")]
    Expired {
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error("manifest `createdAt` {created_at} is more than 5 minutes in the future (now {now}); check the requestor's clock")]
    NotYetValid {
        created_at: DateTime<Utc>,
        now: DateTime<Utc>,
    },
}

fn field(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    #[serde(deserialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(deserialize_with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    pub payload: Vec<Payload>,
    #[serde(default)]
    pub comp_manifest: Option<CompManifest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub version: String,
    #[serde(default)]
    pub authors: Option<Vec<String>>,
    #[serde(default)]
    pub homepage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Payload {
    #[serde(default)]
    pub platform: Option<Platform>,
    pub urls: Vec<String>,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Platform {
    pub arch: String,
    pub os: String,
    #[serde(default)]
    pub os_version: Option<String>,
}

impl Platform {
    /// Golem's default when a payload names no platform.
    pub fn golem_default() -> Self {
        Self {
            arch: "x86_64".into(),
            os: "linux".into(),
            os_version: None,
        }
    }

    /// The platform this provider runs payloads for.
    pub fn host() -> Self {
        Self {
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            os_version: None,
        }
    }

    /// Arch and OS compare case-insensitively; an OS version is informational.
    pub fn matches(&self, host: &Platform) -> bool {
        self.arch.eq_ignore_ascii_case(&host.arch) && self.os.eq_ignore_ascii_case(&host.os)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompManifest {
    pub version: String,
    #[serde(default)]
    pub script: Option<Script>,
    #[serde(default)]
    pub net: Option<Net>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// Strings, JSON objects, or JSON objects encoded as strings; the ExeScript gate
    /// interprets them.
    pub commands: Vec<serde_json::Value>,
    #[serde(default, rename = "match")]
    pub match_: Match,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    #[serde(default)]
    pub inet: Option<Inet>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inet {
    #[serde(default)]
    pub out: Option<InetOut>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InetOut {
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    #[serde(default)]
    pub unrestricted: Option<Unrestricted>,
}

/// yagna's `"unrestricted": {"urls": true}`: the payload wants to reach any URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unrestricted {
    pub urls: bool,
}

/// SHA-3 variant of a payload hash, picked by the hex length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sha3 {
    Sha3_224,
    Sha3_256,
    Sha3_384,
    Sha3_512,
}

/// A parsed `sha3:<hex>` payload hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PayloadHash {
    pub algorithm: Sha3,
    /// Lowercase hex.
    pub hex: String,
}

impl PayloadHash {
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s
            .strip_prefix("sha3:")
            .ok_or_else(|| format!("`{s}` must start with `sha3:`"))?;
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{s}`: the digest must be hexadecimal"));
        }
        let algorithm = match hex.len() {
            56 => Sha3::Sha3_224,
            64 => Sha3::Sha3_256,
            96 => Sha3::Sha3_384,
            128 => Sha3::Sha3_512,
            n => {
                return Err(format!(
                    "`sha3:` digest has {n} hex digits; SHA3-224/256/384/512 have 56/64/96/128"
                ))
            }
        };
        Ok(Self {
            algorithm,
            hex: hex.to_ascii_lowercase(),
        })
    }
}

/// What the manifest asks of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// No `net.inet.out`, or one with no URLs.
    None,
    /// These URLs (each scheme is in `protocols`).
    Urls {
        protocols: Vec<String>,
        urls: Vec<Url>,
    },
    /// Any URL with one of `protocols`.
    Unrestricted { protocols: Vec<String> },
}

impl Outbound {
    pub fn is_requested(&self) -> bool {
        !matches!(self, Outbound::None)
    }
}

/// A manifest as received: its base64 text (what the signature covers), the JSON bytes and
/// the parsed, structurally validated model.
#[derive(Debug, Clone)]
pub struct ReceivedManifest {
    pub base64: String,
    pub json: Vec<u8>,
    pub manifest: Manifest,
    pub outbound: Outbound,
}

impl ReceivedManifest {
    /// Decodes the demand property `golem.srv.comp.payload` (base64 of the manifest JSON).
    pub fn from_base64(text: &str) -> Result<Self, ManifestError> {
        use base64::Engine as _;
        let trimmed = text.trim();
        let json = base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|e| ManifestError::Base64(e.to_string()))?;
        let (manifest, outbound) = parse_and_validate(&json)?;
        Ok(Self {
            base64: trimmed.to_owned(),
            json,
            manifest,
            outbound,
        })
    }

    /// Takes the manifest JSON bytes and derives the base64 text a requestor would send
    /// (standard alphabet, padded, no line breaks: `base64 -w0`).
    pub fn from_json(json: &[u8]) -> Result<Self, ManifestError> {
        use base64::Engine as _;
        let (manifest, outbound) = parse_and_validate(json)?;
        Ok(Self {
            base64: base64::engine::general_purpose::STANDARD.encode(json),
            json: json.to_vec(),
            manifest,
            outbound,
        })
    }

    /// Accepts either form: JSON (starts with `{` after whitespace) or its base64.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') | None => Self::from_json(bytes),
            Some(_) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| ManifestError::Json("neither JSON nor base64 text".into()))?;
                Self::from_base64(text)
            }
        }
    }

    /// Time checks at `now`: `expiresAt` in the future, `createdAt` not beyond the skew.
    pub fn check_time(&self, now: DateTime<Utc>) -> Result<(), ManifestError> {
        let m = &self.manifest;
        if m.expires_at <= now {
            return Err(ManifestError::Expired {
                expires_at: m.expires_at,
                now,
            });
        }
        if m.created_at > now + CREATED_AT_SKEW {
            return Err(ManifestError::NotYetValid {
                created_at: m.created_at,
                now,
            });
        }
        Ok(())
    }

    /// The first payload whose platform matches `host` (a payload without one is Golem's
    /// default, x86_64 Linux).
    pub fn select_payload(&self, host: &Platform) -> Option<&Payload> {
        self.manifest.payload.iter().find(|p| {
            p.platform
                .clone()
                .unwrap_or_else(Platform::golem_default)
                .matches(host)
        })
    }

    /// The script section, if the manifest restricts commands at all.
    pub fn script(&self) -> Option<&Script> {
        self.manifest.comp_manifest.as_ref()?.script.as_ref()
    }
}

fn parse_and_validate(json: &[u8]) -> Result<(Manifest, Outbound), ManifestError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let manifest: Manifest = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ManifestError::Json(inner.to_string())
        } else {
            // serde_json's message ends with "at line L column C"; keep it, the path says
            // which field.
            field(
                if path == "." { "(root)".into() } else { path },
                inner.to_string(),
            )
        }
    })?;
    // One document and nothing after it: serde stops at the end of the object, and text
    // after it would be signed but read by no one (another parser may refuse it or read it).
    de.end()
        .map_err(|e| ManifestError::Json(format!("text after the manifest object: {e}")))?;
    let outbound = validate(&manifest)?;
    Ok((manifest, outbound))
}

/// An RFC 3339 date-time, exactly (the schema's `date-time` format). chrono's own
/// `FromStr` is lenient (found by fuzzing: it read `210 -01-01T00:00:00Z` as a year).
fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(d)?;
    let t = DateTime::parse_from_rfc3339(&text).map_err(|e| {
        serde::de::Error::custom(format!("`{text}` is not an RFC 3339 date-time: {e}"))
    })?;
    // chrono keeps a leap second (`:60`) as a nanosecond count past 10^9; RFC 3339 allows
    // one only where a leap second really was, which Golem's schema checks and no manifest
    // needs (found by fuzzing: `12:51:60` was accepted). Refused outright.
    if chrono::Timelike::nanosecond(&t) >= 1_000_000_000 {
        return Err(serde::de::Error::custom(format!(
            "`{text}`: a leap second (`:60`) is not accepted; write the next second"
        )));
    }
    Ok(t.with_timezone(&Utc))
}

/// Why `text` is not a URI as RFC 3986 writes one (the `uri` format of Golem's schema),
/// or `None`. The URL parser is more forgiving (WHATWG): it drops tabs and newlines,
/// trims spaces and control characters, percent-encodes what it must and keeps a `%` that
/// starts no escape, so the URL it returns can differ from the text that was signed. The
/// manifest must say exactly what it means.
fn uri_problem(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    // `[` and `]` belong only around an IPv6 host: `[` as the host's first byte (after
    // any userinfo), `]` closing it, followed by the end of the authority or a port.
    let (open, close) = ip_literal_brackets(text);
    if let Some(authority) = authority_range(text) {
        if let Some(second) = text[authority.clone()]
            .match_indices('@')
            .nth(1)
            .map(|(at, _)| authority.start + at)
        {
            return Some(format!(
                "a second `@` at byte {second} in the authority (the userinfo ends at the first); percent-encode it as `%40`"
            ));
        }
    }
    // The first `#` starts the fragment, which holds no `#` of its own.
    let fragment = text.find('#');
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'#' && fragment != Some(i) {
            return Some(format!(
                "a second `#` at byte {i} (the fragment starts at the first); percent-encode it as `%23`"
            ));
        }
        let allowed = b.is_ascii_alphanumeric()
            || b"-._~:/?#@!$&'()*+,;=".contains(&b)
            || (b == b'[' && open == Some(i))
            || (b == b']' && close == Some(i));
        if b == b'%' {
            let escape = bytes.get(i + 1..i + 3);
            if !escape.is_some_and(|e| e.iter().all(u8::is_ascii_hexdigit)) {
                return Some(format!(
                    "`%` at byte {i} does not start a percent-escape (`%` and two hex digits); write a literal `%` as `%25`"
                ));
            }
            i += 3;
            continue;
        }
        if !allowed {
            let c = text[i..].chars().next().unwrap_or('?');
            return Some(format!(
                "{c:?} at byte {i} is not allowed in a URI (RFC 3986); percent-encode it"
            ));
        }
        i += 1;
    }
    None
}

/// The byte range of `text`'s authority (after `://`, up to the path, query or fragment).
fn authority_range(text: &str) -> Option<std::ops::Range<usize>> {
    let start = text.find("://")? + 3;
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |e| start + e);
    Some(start..end)
}

/// Where `text`'s IP-literal host opens and closes (the byte offsets of its `[` and `]`),
/// if its authority has one where RFC 3986 puts it: the host starts after the userinfo's
/// `@` (userinfo holds no `@` of its own: a second one is refused in [`uri_problem`]).
fn ip_literal_brackets(text: &str) -> (Option<usize>, Option<usize>) {
    let Some(authority) = authority_range(text) else {
        return (None, None);
    };
    let (start, end) = (authority.start, authority.end);
    let host = text[start..end].find('@').map_or(start, |u| start + u + 1);
    if text.as_bytes().get(host) != Some(&b'[') {
        return (None, None);
    }
    let Some(close) = text[host..end].find(']').map(|c| host + c) else {
        return (Some(host), None);
    };
    let after = text.as_bytes().get(close + 1);
    if close + 1 == end || after == Some(&b':') {
        (Some(host), Some(close))
    } else {
        (Some(host), None)
    }
}

/// Structural checks serde cannot express.
fn validate(m: &Manifest) -> Result<Outbound, ManifestError> {
    if m.payload.is_empty() {
        return Err(field("payload", "at least one payload is required"));
    }
    for (i, p) in m.payload.iter().enumerate() {
        if p.urls.is_empty() {
            return Err(field(
                format!("payload[{i}].urls"),
                "at least one URL is required",
            ));
        }
        for (j, u) in p.urls.iter().enumerate() {
            if let Some(why) = uri_problem(u) {
                return Err(field(
                    format!("payload[{i}].urls[{j}]"),
                    format!("`{u}`: {why}"),
                ));
            }
            let url = Url::parse(u)
                .map_err(|e| field(format!("payload[{i}].urls[{j}]"), format!("`{u}`: {e}")))?;
            if !matches!(url.scheme(), "http" | "https" | "file" | "oci") {
                return Err(field(
                    format!("payload[{i}].urls[{j}]"),
                    format!(
                        "`{u}`: scheme `{}` is not supported (http, https, file, oci)",
                        url.scheme()
                    ),
                ));
            }
        }
        PayloadHash::parse(&p.hash).map_err(|msg| field(format!("payload[{i}].hash"), msg))?;
    }
    let out = m
        .comp_manifest
        .as_ref()
        .and_then(|c| c.net.as_ref())
        .and_then(|n| n.inet.as_ref())
        .and_then(|i| i.out.as_ref());
    let Some(out) = out else {
        return Ok(Outbound::None);
    };
    let base = "compManifest.net.inet.out";
    let protocols: Vec<String> = match &out.protocols {
        Some(p) => p.iter().map(|s| s.to_ascii_lowercase()).collect(),
        None => KNOWN_PROTOCOLS.iter().map(|s| s.to_string()).collect(),
    };
    for (i, p) in protocols.iter().enumerate() {
        if !KNOWN_PROTOCOLS.contains(&p.as_str()) {
            return Err(field(
                format!("{base}.protocols[{i}]"),
                format!("unknown protocol `{p}` (known: http, https, ws, wss)"),
            ));
        }
    }
    let unrestricted = out.unrestricted.as_ref().is_some_and(|u| u.urls);
    let urls = out.urls.as_deref().unwrap_or_default();
    if unrestricted && !urls.is_empty() {
        return Err(field(
            base,
            "`urls` and `unrestricted.urls: true` contradict each other; send one",
        ));
    }
    if unrestricted {
        return Ok(Outbound::Unrestricted { protocols });
    }
    let mut parsed = Vec::with_capacity(urls.len());
    for (i, u) in urls.iter().enumerate() {
        let at = format!("{base}.urls[{i}]");
        if let Some(why) = uri_problem(u) {
            return Err(field(&at, format!("`{u}`: {why}")));
        }
        let url = Url::parse(u).map_err(|e| field(&at, format!("`{u}`: {e}")))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(field(&at, format!("`{u}` has no host")));
        }
        if !protocols.iter().any(|p| p == url.scheme()) {
            return Err(field(
                &at,
                format!(
                    "`{u}`: scheme `{}` is not among the manifest's protocols [{}], so it could never be reached",
                    url.scheme(),
                    protocols.join(", ")
                ),
            ));
        }
        parsed.push(url);
    }
    if parsed.is_empty() {
        return Ok(Outbound::None);
    }
    Ok(Outbound::Urls {
        protocols,
        urls: parsed,
    })
}
