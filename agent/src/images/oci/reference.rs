//! `oci://REGISTRY/REPO[:TAG][@sha256:HEX]`: which registry, which repository, and which
//! content. A requestor's reference must carry a digest (the manifest's `hash` pins the
//! content, so a tag alone, which its owner can move, is not enough); the operator's own
//! `provider vm run` may name a tag only.

use std::fmt;
use std::net::IpAddr;

use url::Host;

/// A parsed `oci://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// `host` or `host:port`, as written (lower-cased), the key of the credential store.
    pub registry: String,
    host: Host,
    port: Option<u16>,
    /// `library/busybox`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// A content digest `ALG:HEX` of the algorithms the OCI image spec registers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    pub algorithm: DigestAlg,
    pub hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestAlg {
    Sha256,
    Sha512,
}

impl DigestAlg {
    fn hex_len(self) -> usize {
        match self {
            DigestAlg::Sha256 => 64,
            DigestAlg::Sha512 => 128,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DigestAlg::Sha256 => "sha256",
            DigestAlg::Sha512 => "sha512",
        }
    }
    pub fn message_digest(self) -> openssl::hash::MessageDigest {
        match self {
            DigestAlg::Sha256 => openssl::hash::MessageDigest::sha256(),
            DigestAlg::Sha512 => openssl::hash::MessageDigest::sha512(),
        }
    }
}

impl Digest {
    /// `sha256:` + 64 lower-case hex digits, or `sha512:` + 128.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| format!("digest `{s}` is not ALGORITHM:HEX"))?;
        let algorithm = match alg {
            "sha256" => DigestAlg::Sha256,
            "sha512" => DigestAlg::Sha512,
            other => {
                return Err(format!(
                    "digest algorithm `{other}` is not one the OCI spec registers (sha256, sha512)"
                ))
            }
        };
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest `{s}`: {alg} takes {} lower-case hex digits",
                algorithm.hex_len()
            ));
        }
        Ok(Self {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes` under this digest's algorithm.
    pub fn of(algorithm: DigestAlg, bytes: &[u8]) -> Self {
        let d = openssl::hash::hash(algorithm.message_digest(), bytes)
            .map(|d| d.to_vec())
            .unwrap_or_default();
        Self {
            algorithm,
            hex: d.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether `c` may be part of a repository path component (`[a-z0-9]` runs joined by `.`,
/// `_`, `__` or dashes, as the distribution spec's grammar has it).
fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__`, or one or more `-`.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

fn tag_ok(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

impl OciRef {
    /// Parses `oci://REGISTRY/REPO[:TAG][@DIGEST]`; at least a tag or a digest. The
    /// registry is always explicit (no implied Docker Hub: a requestor names where the
    /// provider is to connect).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("oci://")
            .ok_or_else(|| format!("`{s}` does not start with oci://"))?;
        let bad = |why: String| format!("`{s}` is not an OCI reference: {why}");
        let (registry, path) = rest.split_once('/').ok_or_else(|| {
            bad("no repository after the registry (oci://REGISTRY/REPO:TAG@sha256:DIGEST)".into())
        })?;
        if registry.contains('@') {
            return Err(bad(
                "credentials in the reference are not accepted; use `provider registry login`"
                    .into(),
            ));
        }
        let registry = registry.to_ascii_lowercase();
        let (host_part, port) = match registry.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && !p.contains(']') => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| bad(format!("registry port `{p}` is not a number")))?;
                (h.to_owned(), Some(port))
            }
            _ => (registry.clone(), None),
        };
        let host = Host::parse(&host_part)
            .map_err(|e| bad(format!("registry host `{host_part}`: {e}")))?;
        if let Host::Domain(d) = &host {
            if d.is_empty()
                || d.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            {
                return Err(bad(format!("registry host `{d}` is not a host name")));
            }
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => (p, Some(Digest::parse(d).map_err(bad)?)),
            None => (path, None),
        };
        // A tag follows the last `:` of the last path component.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_owned())),
            _ => (path, None),
        };
        if repository.len() > 255 {
            return Err(bad("the repository name is longer than 255 bytes".into()));
        }
        for c in repository.split('/') {
            if !component_ok(c) {
                return Err(bad(format!(
                    "repository component `{c}` is not lower-case letters and digits joined by `.`, `_`, `__` or `-`"
                )));
            }
        }
        if let Some(t) = &tag {
            if !tag_ok(t) {
                return Err(bad(format!(
                    "tag `{t}` is not 1 to 128 of [A-Za-z0-9_.-] starting with a letter, digit or `_`"
                )));
            }
        }
        if tag.is_none() && digest.is_none() {
            return Err(bad("it names neither a tag nor a digest".into()));
        }
        Ok(Self {
            registry,
            host,
            port,
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// What the manifest request names: the digest if there is one (it pins the content),
    /// else the tag.
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// Whether the registry is this machine (`localhost`, `127.0.0.0/8`, `::1`): spoken to
    /// over plain HTTP, as Docker does.
    pub fn is_loopback(&self) -> bool {
        match &self.host {
            Host::Domain(d) => d == "localhost",
            Host::Ipv4(a) => IpAddr::V4(*a).is_loopback(),
            Host::Ipv6(a) => IpAddr::V6(*a).is_loopback(),
        }
    }

    /// `http://REGISTRY` or `https://REGISTRY`: plain HTTP for a loopback registry or one
    /// the operator lists in `plain_http`, TLS for every other.
    pub fn base_url(&self, plain_http: &[String]) -> url::Url {
        let plain = self.is_loopback()
            || plain_http
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&self.registry));
        let scheme = if plain { "http" } else { "https" };
        let host = match &self.host {
            Host::Ipv6(a) => format!("[{a}]"),
            other => other.to_string(),
        };
        let authority = match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        };
        // Checked above: a host and a port make a valid URL.
        url::Url::parse(&format!("{scheme}://{authority}/")).expect("a registry URL")
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_with_tag_digest_port_and_ipv6() {
        let r = OciRef::parse(&format!("oci://127.0.0.1:5000/library/busybox:1.36@{D}")).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        assert_eq!(r.reference(), D);
        assert!(r.is_loopback());
        assert_eq!(r.base_url(&[]).as_str(), "http://127.0.0.1:5000/");
        assert_eq!(
            r.to_string(),
            format!("oci://127.0.0.1:5000/library/busybox:1.36@{D}")
        );

        let r = OciRef::parse("oci://[::1]:5000/a/b:t").unwrap();
        assert!(r.is_loopback());
        assert_eq!(r.base_url(&[]).as_str(), "http://[::1]:5000/");

        let r = OciRef::parse("oci://registry.example.com/app:v1").unwrap();
        assert!(!r.is_loopback());
        assert_eq!(r.base_url(&[]).as_str(), "https://registry.example.com/");
        assert_eq!(
            r.base_url(&["REGISTRY.example.com".into()]).as_str(),
            "http://registry.example.com/"
        );
        assert_eq!(r.reference(), "v1");
        assert!(r.digest.is_none());
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (s, needle) in [
            ("http://r/x:t", "oci://"),
            ("oci://registry", "no repository"),
            ("oci://user:pw@r/x:t", "credentials"),
            ("oci://r/Upper:t", "component"),
            ("oci://r/a//b:t", "component"),
            ("oci://r/a-:t", "component"),
            ("oci://r/x", "neither a tag nor a digest"),
            ("oci://r/x:-bad", "tag"),
            ("oci://r:99999/x:t", "port"),
            ("oci://r/x@sha256:abc", "64"),
            ("oci://r/x@md5:abc", "sha256, sha512"),
            ("oci://r_x/x:t", "host"),
        ] {
            let e = OciRef::parse(s).unwrap_err();
            assert!(e.contains(needle), "{s}: {e}");
        }
        assert!(component_ok("a__b.c-d--e"));
        assert!(!component_ok("a___b"));
        assert!(!component_ok("a..b"));
    }

    #[test]
    fn a_digest_is_computed_and_printed() {
        let d = Digest::of(DigestAlg::Sha256, b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }
}
