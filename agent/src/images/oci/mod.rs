//! `oci://` payloads: images pulled from an OCI distribution registry (Docker Hub, GHCR, a
//! `docker-registry` on the operator's LAN), their layers applied in order into the
//! read-only squashfs disk a job boots from.
//!
//! The pull speaks the distribution API itself over [`super::fetch::send`] rather than
//! through an OCI client crate: every connection (registry, token realm, a blob's redirect
//! to storage) must go only to addresses the egress address policy checked, pinned so a
//! second DNS answer cannot move it, and no client crate offers that hook (`oci-client`
//! resolves and follows redirects inside its own `reqwest` client). The formats are
//! `oci-spec`'s types.
//!
//! What is checked, in order, before a byte of a layer is fetched: the reference (a
//! requestor's pins a digest), the top manifest's digest and the payload's `sha3:` hash over
//! the same bytes, the platform (an index's entry for this host), the image's NFD
//! compatibility artifact if it has one ([`compat`]), the config's os/arch and its
//! `Env`/`WorkingDir`/`Volumes`, the layers' media types and their total size against the
//! fetch limits. Each layer is then streamed to a file with its digest and size verified,
//! and the layers go through the same entry guards and whiteout rules as a tarball
//! (`vm::rootfs::layers_to_squashfs`). The stored image is a squashfs with a GVMI trailer
//! holding the image's config, so the rest of the provider treats it as a GVMI.

pub mod auth;
pub mod compat;
pub mod reference;

use std::fs::{self, File};
use std::io::{self, Write};

use std::path::{Path, PathBuf};

use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use openssl::hash::Hasher;
use url::Url;
use vm::image::{io_err, ImageError};

use self::auth::{Challenge, Credential};
use self::reference::{Digest, OciRef};
use super::fetch::{self, Cap, FetchLimits};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Layer media types applied (the tar reader detects the compression by its magic, the
/// media type only has to be one of these).
const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Layers of one image.
const MAX_LAYERS: usize = 256;

/// This host as an image index names platforms.
#[derive(Debug, Clone)]
pub struct HostPlatform {
    pub os: String,
    pub architecture: String,
    /// Variants this host runs, best first (`v3`, `v2`, `v1` on an x86-64-v3 machine).
    pub variants: Vec<String>,
}

impl HostPlatform {
    pub fn detect() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(std::env::consts::ARCH, &cpuinfo)
    }

    /// `arch` as Rust names it; the x86-64 micro-architecture levels from the cpu flags.
    pub fn from_cpuinfo(arch: &str, cpuinfo: &str) -> Self {
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("flags").and_then(|r| r.split_once(':')))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        let has = |all: &[&str]| all.iter().all(|f| flags.contains(f));
        let (architecture, variants) = match arch {
            "x86_64" => {
                let mut v = Vec::new();
                let v2 = has(&["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"]);
                let v3 = v2
                    && has(&[
                        "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave",
                    ]);
                let v4 = v3 && has(&["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]);
                for (ok, name) in [(v4, "v4"), (v3, "v3"), (v2, "v2"), (true, "v1")] {
                    if ok {
                        v.push(name.to_owned());
                    }
                }
                ("amd64", v)
            }
            "aarch64" => ("arm64", vec!["v8".to_owned()]),
            other => (other, Vec::new()),
        };
        Self {
            os: "linux".into(),
            architecture: architecture.into(),
            variants,
        }
    }

    /// How well an index entry's platform fits: `None` if this host cannot run it, else a
    /// rank (lower is better: an exact variant before a plain entry).
    fn fit(&self, os: &str, arch: &str, variant: Option<&str>) -> Option<usize> {
        if os != self.os || arch != self.architecture {
            return None;
        }
        match variant {
            None | Some("") => Some(self.variants.len()),
            Some(v) => self.variants.iter().position(|h| h == v),
        }
    }
}

/// What one pull needs besides the reference.
pub struct Pull<'a> {
    pub limits: &'a FetchLimits,
    pub platform: HostPlatform,
    pub features: compat::HostFeatures,
    /// Where layers are downloaded to and converted (the store's `tmp/`).
    pub work: &'a Path,
    /// Bounds what the layers may expand to.
    pub max_unpacked: u64,
    pub progress: Option<indicatif::ProgressBar>,
}

/// The resolved top manifest: its bytes (which the payload hash covers) and digest.
pub struct Resolved {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
}

/// A registry session for one repository: its base URL, the credential, and the
/// `Authorization` the last challenge earned.
pub struct Registry<'a> {
    pub reference: &'a OciRef,
    base: Url,
    limits: &'a FetchLimits,
    plain_http: Vec<String>,
    credential: Option<Credential>,
    authorization: Option<HeaderValue>,
    /// Why the login was not sent to the token service (another origin, not listed).
    withheld: Option<String>,
    login_only: bool,
}

fn fetch_err(url: &Url, message: impl Into<String>) -> ImageError {
    ImageError::Fetch {
        url: url.to_string(),
        message: message.into(),
    }
}

fn invalid(r: &OciRef, message: impl Into<String>) -> ImageError {
    ImageError::Format {
        path: PathBuf::from(r.to_string()),
        message: message.into(),
    }
}

impl<'a> Registry<'a> {
    pub fn new(
        reference: &'a OciRef,
        limits: &'a FetchLimits,
        plain_http: &[String],
        credential: Option<Credential>,
    ) -> Self {
        Self {
            base: reference.base_url(plain_http),
            reference,
            limits,
            plain_http: plain_http.to_vec(),
            credential,
            authorization: None,
            withheld: None,
            login_only: false,
        }
    }

    /// Checks that `credential` opens the registry's API root (`GET /v2/`), as
    /// `provider registry login` does before it stores anything.
    pub fn check_login(
        registry: &str,
        limits: &FetchLimits,
        plain_http: &[String],
        credential: Credential,
    ) -> Result<(), ImageError> {
        let r = OciRef::parse(&format!("oci://{registry}/login:check")).map_err(|e| {
            ImageError::UrlRefused {
                url: registry.to_owned(),
                why: e.replace("oci://", "").replace("/login:check", ""),
            }
        })?;
        let mut reg = Registry::new(&r, limits, plain_http, Some(credential));
        reg.login_only = true;
        let (url, resp) = reg.get("v2/", None)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(fetch_err(&url, format!("HTTP {}", resp.status())))
        }
    }

    fn url(&self, path: &str) -> Result<Url, ImageError> {
        self.base
            .join(path)
            .map_err(|e| fetch_err(&self.base, format!("bad request path `{path}`: {e}")))
    }

    /// A GET of `path` under the registry, answering one `401` challenge (bearer token or
    /// basic) and retrying once.
    pub fn get(
        &mut self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(Url, reqwest::blocking::Response), ImageError> {
        let url = self.url(path)?;
        let mut tried_auth = false;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(a) = accept {
                headers.insert(
                    ACCEPT,
                    HeaderValue::from_str(a).map_err(|e| fetch_err(&url, e.to_string()))?,
                );
            }
            if let Some(a) = &self.authorization {
                headers.insert(AUTHORIZATION, a.clone());
            }
            let (last, resp) = fetch::send(url.clone(), self.limits, &headers)?;
            if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
                return Ok((last, resp));
            }
            if tried_auth {
                return Err(self.refused_after_auth(&resp));
            }
            tried_auth = true;
            let challenge = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .and_then(auth::parse_challenge)
                .ok_or_else(|| {
                    self.auth_error("HTTP 401 without a Bearer or Basic WWW-Authenticate challenge")
                })?;
            self.answer(&challenge)?;
        }
    }

    fn auth_error(&self, why: &str) -> ImageError {
        let hint = if self.credential.is_none() {
            format!(
                "; an operator logs in with `provider registry login {}` (add --for-requestors for requestors' pulls)",
                self.reference.registry
            )
        } else {
            String::new()
        };
        ImageError::RegistryAuth {
            registry: self.reference.registry.clone(),
            why: format!("{why}{hint}"),
        }
    }

    /// Sets the `Authorization` `challenge` asks for.
    fn answer(&mut self, challenge: &Challenge) -> Result<(), ImageError> {
        match challenge {
            Challenge::Basic => {
                let c = self
                    .credential
                    .as_ref()
                    .ok_or_else(|| self.auth_error("the registry wants a login (basic auth)"))?;
                self.authorization = Some(
                    HeaderValue::from_str(&auth::basic_header(c))
                        .map_err(|_| self.auth_error("the login has bytes no header can carry"))?,
                );
                Ok(())
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
                ..
            } => {
                let mut url = Url::parse(realm).map_err(|e| {
                    self.auth_error(&format!("its token realm `{realm}` is not a URL ({e})"))
                })?;
                self.check_realm(&url)?;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    // A login check asks for no repository (as `docker login` does).
                    let scope = scope.clone().or_else(|| {
                        (!self.login_only)
                            .then(|| format!("repository:{}:pull", self.reference.repository))
                    });
                    if let Some(scope) = scope {
                        q.append_pair("scope", &scope);
                    }
                }
                let mut headers = HeaderMap::new();
                if let Some(c) = &self.credential {
                    if let Some(why) = self.withhold_from(&url, c) {
                        tracing::warn!(%url, "{why}");
                        self.withheld = Some(why);
                    } else {
                        headers.insert(
                            AUTHORIZATION,
                            HeaderValue::from_str(&auth::basic_header(c)).map_err(|_| {
                                self.auth_error("the login has bytes no header can carry")
                            })?,
                        );
                    }
                }
                let (last, resp) = fetch::send(url, self.limits, &headers)?;
                // A realm that redirects to plain HTTP elsewhere sends its token in clear
                // (the login itself never follows a hop to another origin): not used.
                if last.scheme() == "http" && !plain_http_ok(&last, &self.plain_http) {
                    return Err(self.auth_error(&format!(
                        "its token realm redirected to plain HTTP at {}, neither loopback nor listed as plain-HTTP; a token sent in clear is not used",
                        origin_of(&last)
                    )));
                }
                if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                    || resp.status() == reqwest::StatusCode::FORBIDDEN
                {
                    let what = match (&self.credential, &self.withheld) {
                        (Some(_), None) => "the login".to_owned(),
                        (Some(_), Some(why)) => format!("an anonymous token ({why})"),
                        (None, _) => "an anonymous token".to_owned(),
                    };
                    return Err(self.auth_error(&format!(
                        "its token service {} refused {what} (HTTP {})",
                        origin_of(&last),
                        resp.status()
                    )));
                }
                if !resp.status().is_success() {
                    return Err(fetch_err(&last, format!("token: HTTP {}", resp.status())));
                }
                let body = read_small(&last, resp, 64 * 1024, "the token answer")?;
                let token = serde_json::from_slice::<auth::TokenAnswer>(&body)
                    .ok()
                    .and_then(auth::TokenAnswer::into_token)
                    .ok_or_else(|| self.auth_error("its token service answered without a token"))?;
                self.authorization = Some(
                    HeaderValue::from_str(&format!("Bearer {token}"))
                        .map_err(|_| self.auth_error("its token has bytes no header can carry"))?,
                );
                Ok(())
            }
        }
    }

    /// A token realm is spoken to over TLS, or over plain HTTP only where a registry would
    /// be: loopback, or a host the operator lists in `plain_http`. A bearer token fetched
    /// in clear could be read and replayed, so an unlisted plain-HTTP realm is refused,
    /// with or without a login.
    fn check_realm(&self, url: &Url) -> Result<(), ImageError> {
        match url.scheme() {
            "http" if !plain_http_ok(url, &self.plain_http) => Err(self.auth_error(&format!(
                "its token realm {} is plain HTTP on a host that is neither loopback nor listed as plain-HTTP; a token fetched in clear is not asked for",
                origin_of(url)
            ))),
            "http" | "https" => Ok(()),
            other => Err(self.auth_error(&format!(
                "its token realm `{url}` is `{other}`, not http(s)"
            ))),
        }
    }

    /// Why `c` must not go to the token service at `url`, if it must not: the login goes to
    /// the registry's own origin (scheme, host, port), or to a realm the operator named at
    /// login (`--token-realm`), nowhere else.
    fn withhold_from(&self, url: &Url, c: &Credential) -> Option<String> {
        if url.origin() == self.base.origin() {
            return None;
        }
        let at = authority(url);
        if c.token_realms.iter().any(|r| r.eq_ignore_ascii_case(&at)) {
            return None;
        }
        Some(format!(
            "the login for {} was not sent to the token service at {}, another origin than the registry's; `provider registry login {} --token-realm {at}` trusts it",
            self.reference.registry,
            origin_of(url),
            self.reference.registry,
        ))
    }

    /// The error for a `401` that answered the `Authorization` a challenge earned.
    fn refused_after_auth(&self, resp: &reqwest::blocking::Response) -> ImageError {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(auth::parse_challenge);
        let bearer_error = match &challenge {
            Some(Challenge::Bearer { error, scope, .. }) => Some((error.clone(), scope.clone())),
            _ => None,
        };
        match bearer_error {
            Some((Some(e), scope)) if e == "insufficient_scope" => {
                let wanted = scope.unwrap_or_else(|| format!("repository:{}:pull", self.reference.repository));
                let who = match &self.credential {
                    Some(c) if self.withheld.is_none() => format!("the login `{}`", c.username),
                    _ => "an anonymous pull".to_owned(),
                };
                self.auth_error(&format!(
                    "the token its token service issued does not grant `{wanted}` (the registry answered insufficient_scope): {who} may not pull {}",
                    self.reference.repository
                ))
            }
            Some((Some(e), _)) if e == "invalid_token" => self.auth_error(
                "the registry did not accept the token its token service issued (invalid_token: a signature, issuer, audience or expiry it does not trust)",
            ),
            _ => self.auth_error(if self.credential.is_some() && self.withheld.is_none() {
                "the registry refused the login (run `provider registry login` again)"
            } else {
                "the registry wants a login"
            }),
        }
    }

    /// A manifest or index by tag or digest; with a digest, the bytes must hash to it.
    pub fn manifest(&mut self, reference: &str) -> Result<Resolved, ImageError> {
        let path = format!("v2/{}/manifests/{reference}", self.reference.repository);
        let accept = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].join(", ");
        let (url, resp) = self.get(&path, Some(&accept))?;
        if !resp.status().is_success() {
            return Err(fetch_err(&url, format!("HTTP {}", resp.status())));
        }
        let header_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_owned());
        let bytes = read_small(&url, resp, MAX_MANIFEST_BYTES, "a manifest")?;
        let digest = match Digest::parse(reference) {
            Ok(want) => {
                let got = Digest::of(want.algorithm, &bytes);
                if got != want {
                    return Err(invalid(
                        self.reference,
                        format!("the registry's manifest for {want} hashes to {got}"),
                    ));
                }
                want
            }
            Err(_) => Digest::of(reference::DigestAlg::Sha256, &bytes),
        };
        // The body's own mediaType wins over the header (a registry may say
        // `application/json`).
        let body_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            });
        let media_type = body_type.or(header_type).unwrap_or_default();
        Ok(Resolved {
            bytes,
            digest,
            media_type,
        })
    }

    /// Streams blob `digest` of `size` bytes into `sink`, verifying both.
    pub fn blob(
        &mut self,
        digest: &Digest,
        size: u64,
        sink: &mut dyn Write,
        progress: &mut dyn FnMut(Option<u64>, u64),
    ) -> Result<(), ImageError> {
        let path = format!("v2/{}/blobs/{digest}", self.reference.repository);
        let (url, resp) = self.get(&path, None)?;
        if !resp.status().is_success() {
            return Err(fetch_err(&url, format!("HTTP {}", resp.status())));
        }
        let mut w = super::HashingWriter {
            inner: sink,
            hasher: Hasher::new(digest.algorithm.message_digest())
                .map_err(|e| fetch_err(&url, e.to_string()))?,
            bytes: 0,
        };
        let cap = Cap {
            bytes: size,
            why: "the size its manifest gives",
        };
        fetch::stream_body(&url, resp, cap, &mut w, progress)?;
        let got_hex: String = w
            .hasher
            .finish()
            .map_err(|e| fetch_err(&url, e.to_string()))?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if w.bytes != size || got_hex != digest.hex {
            return Err(invalid(
                self.reference,
                format!(
                    "blob {digest}: the registry sent {} bytes hashing to {}:{got_hex}, the manifest says {size} bytes",
                    w.bytes,
                    digest.algorithm.name()
                ),
            ));
        }
        Ok(())
    }

    /// A small blob (a config, a compatibility spec) in memory.
    fn small_blob(&mut self, d: &Descriptor, max: u64, what: &str) -> Result<Vec<u8>, ImageError> {
        let digest = descriptor_digest(self.reference, d)?;
        if d.size() > max {
            return Err(invalid(
                self.reference,
                format!("{what} is {} bytes, at most {max}", d.size()),
            ));
        }
        let mut out = Vec::new();
        self.blob(&digest, d.size(), &mut out, &mut |_, _| {})?;
        Ok(out)
    }

    /// Artifacts that refer to `subject` with `artifact_type`: the referrers API, else the
    /// referrers tag schema (`sha256-HEX`) registries without the API use.
    fn referrers(
        &mut self,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Vec<Descriptor>, ImageError> {
        let repo = self.reference.repository.clone();
        let path = format!("v2/{repo}/referrers/{subject}?artifactType={artifact_type}");
        let (url, resp) = self.get(&path, Some(OCI_INDEX))?;
        let bytes = if resp.status().is_success() {
            Some(read_small(
                &url,
                resp,
                MAX_MANIFEST_BYTES,
                "a referrers index",
            )?)
        } else {
            let tag = format!("{}-{}", subject.algorithm.name(), subject.hex);
            let path = format!("v2/{repo}/manifests/{tag}");
            let (url, resp) = self.get(&path, Some(OCI_INDEX))?;
            match resp.status() {
                s if s.is_success() => Some(read_small(
                    &url,
                    resp,
                    MAX_MANIFEST_BYTES,
                    "a referrers index",
                )?),
                reqwest::StatusCode::NOT_FOUND => None,
                s => return Err(fetch_err(&url, format!("referrers tag: HTTP {s}"))),
            }
        };
        let Some(bytes) = bytes else {
            return Ok(Vec::new());
        };
        let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| {
            invalid(
                self.reference,
                format!("its referrers index for {subject}: {e}"),
            )
        })?;
        Ok(index
            .manifests()
            .iter()
            .filter(|d| {
                d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(artifact_type)
            })
            .cloned()
            .collect())
    }
}

/// `host[:port]` of `url`, as registries and realms are named in settings.
fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

/// `scheme://host[:port]`, for messages (never a query, which may carry a scope or more).
fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// Whether `url` may be spoken to over plain HTTP: loopback (as registries are), or a
/// `host[:port]` the operator listed.
fn plain_http_ok(url: &Url, plain_http: &[String]) -> bool {
    host_is_loopback(url)
        || plain_http
            .iter()
            .any(|p| p.eq_ignore_ascii_case(&authority(url)))
}

fn host_is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

fn read_small(
    url: &Url,
    resp: reqwest::blocking::Response,
    max: u64,
    what: &'static str,
) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let cap = Cap {
        bytes: max,
        why: what,
    };
    fetch::stream_body(url, resp, cap, &mut out, &mut |_, _| {})?;
    Ok(out)
}

fn descriptor_digest(r: &OciRef, d: &Descriptor) -> Result<Digest, ImageError> {
    Digest::parse(d.digest().as_ref()).map_err(|e| invalid(r, e))
}

fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

/// The entry of `index` this host runs, or `platform-unsupported` naming what it offers.
pub fn select_platform(
    r: &OciRef,
    index: &ImageIndex,
    host: &HostPlatform,
) -> Result<Descriptor, ImageError> {
    let mut best: Option<(usize, &Descriptor)> = None;
    let mut offered = Vec::new();
    for d in index.manifests() {
        let Some(p) = d.platform() else { continue };
        let (os, arch) = (p.os().to_string(), p.architecture().to_string());
        // Attestations and signatures ride in indexes as `unknown/unknown`.
        if os == "unknown" {
            continue;
        }
        let variant = p.variant().as_deref();
        offered.push(match variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
        if let Some(rank) = host.fit(&os, &arch, variant) {
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, d));
            }
        }
    }
    match best {
        Some((_, d)) => Ok(d.clone()),
        None => Err(ImageError::PlatformUnsupported {
            arch: host.architecture.clone(),
            os: host.os.clone(),
            offered: if offered.is_empty() {
                format!("{r}: an index with no platform entries")
            } else {
                format!("{r}: {}", offered.join(", "))
            },
        }),
    }
}

/// Checks every NFD compatibility artifact referring to `subjects` against this host.
fn check_compatibility(
    reg: &mut Registry<'_>,
    subjects: &[&Digest],
    host: &compat::HostFeatures,
) -> Result<usize, ImageError> {
    let r = reg.reference;
    let incompatible = |why: String| ImageError::PlatformIncompatible {
        image: r.to_string(),
        why,
    };
    let mut checked = 0;
    for subject in subjects {
        for d in reg.referrers(subject, compat::ARTIFACT_TYPE)? {
            let digest = descriptor_digest(r, &d)?;
            let m = reg.manifest(&digest.to_string())?;
            let manifest = ImageManifest::from_reader(&m.bytes[..]).map_err(|e| {
                incompatible(format!(
                    "its compatibility artifact {digest} is not a manifest: {e}"
                ))
            })?;
            let layers = manifest.layers();
            let [layer] = layers.as_slice() else {
                return Err(incompatible(format!(
                    "its compatibility artifact {digest} has {} layers, the format has one",
                    layers.len()
                )));
            };
            if layer.media_type().to_string() != compat::SPEC_MEDIA_TYPE {
                return Err(incompatible(format!(
                    "its compatibility artifact {digest}'s layer is `{}`, not `{}`",
                    layer.media_type(),
                    compat::SPEC_MEDIA_TYPE
                )));
            }
            let yaml = reg.small_blob(layer, compat::MAX_SPEC_BYTES, "the compatibility spec")?;
            let spec = compat::Spec::parse(&yaml)
                .map_err(|e| incompatible(format!("artifact {digest}: {e}")))?;
            let outcomes = compat::evaluate(&spec, host);
            for o in &outcomes {
                tracing::info!(image = %r, set = %o.description, required = o.required, result = ?o.result, "compatibility set");
            }
            if let Some(why) = compat::refusal(&outcomes) {
                return Err(incompatible(why));
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// The parts of an image config the pull checks: its platform and its container config.
fn read_config(r: &OciRef, bytes: &[u8], host: &HostPlatform) -> Result<Vec<u8>, ImageError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(r, format!("its image config is not JSON: {e}")))?;
    let os = v.get("os").and_then(|x| x.as_str()).unwrap_or_default();
    let arch = v
        .get("architecture")
        .and_then(|x| x.as_str())
        .unwrap_or_default();
    let variant = v.get("variant").and_then(|x| x.as_str());
    if host.fit(os, arch, variant).is_none() {
        return Err(ImageError::PlatformUnsupported {
            arch: host.architecture.clone(),
            os: host.os.clone(),
            offered: format!(
                "{r}: {os}/{arch}{}",
                variant.map(|v| format!("/{v}")).unwrap_or_default()
            ),
        });
    }
    let config = v
        .get("config")
        .cloned()
        .unwrap_or(serde_json::Value::Object(Default::default()));
    let json = serde_json::to_vec(&config).map_err(|e| invalid(r, e.to_string()))?;
    // Checked now, so a bad Env or WorkingDir refuses the image before its layers come.
    vm::rootfs::ImageConfig::from_json("the image config", &json).map_err(|m| invalid(r, m))?;
    Ok(json)
}

/// Resolves `r`'s top manifest (what the payload hash covers).
pub fn resolve(reg: &mut Registry<'_>) -> Result<Resolved, ImageError> {
    let reference = reg.reference.reference();
    reg.manifest(&reference)
}

/// Pulls the image `top` resolved to and writes it to `out` as a squashfs with a GVMI
/// trailer (temp file beside it, fsync, rename).
pub fn pull(
    reg: &mut Registry<'_>,
    top: &Resolved,
    p: &Pull<'_>,
    out: &Path,
) -> Result<(), ImageError> {
    let r = reg.reference;
    let started = std::time::Instant::now();
    let (manifest_bytes, manifest_digest) = if is_index(&top.media_type) {
        let index = ImageIndex::from_reader(&top.bytes[..])
            .map_err(|e| invalid(r, format!("its index: {e}")))?;
        let d = select_platform(r, &index, &p.platform)?;
        let digest = descriptor_digest(r, &d)?;
        let m = reg.manifest(&digest.to_string())?;
        if is_index(&m.media_type) {
            return Err(invalid(r, "an index inside an index is not followed"));
        }
        (m.bytes, digest)
    } else if top.media_type == OCI_MANIFEST || top.media_type == DOCKER_MANIFEST {
        (top.bytes.clone(), top.digest.clone())
    } else {
        return Err(invalid(
            r,
            format!(
                "its manifest's media type `{}` is not an OCI or Docker v2 image (schema 1 images are not pulled)",
                top.media_type
            ),
        ));
    };
    let manifest = ImageManifest::from_reader(&manifest_bytes[..])
        .map_err(|e| invalid(r, format!("its manifest {manifest_digest}: {e}")))?;

    // Before any layer: the compatibility artifact of the index and of the manifest.
    let mut subjects = vec![&manifest_digest];
    if top.digest != manifest_digest {
        subjects.push(&top.digest);
    }
    let artifacts = check_compatibility(reg, &subjects, &p.features)?;

    let config_bytes = reg.small_blob(manifest.config(), MAX_CONFIG_BYTES, "its image config")?;
    let config_json = read_config(r, &config_bytes, &p.platform)?;

    let layers = manifest.layers();
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(invalid(
            r,
            format!(
                "it has {} layers (1 to {MAX_LAYERS} are pulled)",
                layers.len()
            ),
        ));
    }
    let mut total = 0u64;
    let mut digests = Vec::new();
    for l in layers {
        let t = l.media_type().to_string();
        if !LAYER_TYPES.contains(&t.as_str()) {
            let why = if t.contains("nondistributable") || t.contains("foreign") {
                "a non-distributable layer would be fetched from elsewhere than the registry"
                    .to_owned()
            } else {
                format!("layer media type `{t}` is not a tar, tar+gzip or tar+zstd layer")
            };
            return Err(invalid(r, why));
        }
        total = total.saturating_add(l.size());
        digests.push(descriptor_digest(r, l)?);
    }
    fs::create_dir_all(p.work).map_err(io_err("create", p.work))?;
    let cap = p.limits.cap(fs4::available_space(p.work).ok());
    if total > cap.bytes {
        return Err(ImageError::TooLarge {
            url: r.to_string(),
            limit: cap.bytes,
            why: cap.why,
        });
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging-oci-")
        .tempdir_in(p.work)
        .map_err(io_err("create a staging dir in", p.work))?;
    if let Some(b) = &p.progress {
        b.set_length(total);
        b.set_style(super::bar_style());
        // The rate counts from here, not from the manifest requests.
        b.reset_elapsed();
    }
    let mut files = Vec::new();
    for (i, (l, digest)) in layers.iter().zip(&digests).enumerate() {
        let path = staging.path().join(format!("layer-{i:03}"));
        let mut f = File::create(&path).map_err(io_err("create", &path))?;
        let mut w = io::BufWriter::new(&mut f);
        let bar = p.progress.clone();
        reg.blob(digest, l.size(), &mut w, &mut |_, n| {
            if let Some(b) = &bar {
                b.inc(n);
            }
        })?;
        w.flush().map_err(io_err("write", &path))?;
        drop(w);
        files.push(path);
    }
    // Unpacking and `mksquashfs` take seconds for a large image: a spinner says so rather
    // than a full bar that seems stuck.
    if let Some(b) = &p.progress {
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            b.set_style(style);
        }
        b.set_message(format!(
            "converting {} layer{} of {} into a squashfs",
            layers.len(),
            if layers.len() == 1 { "" } else { "s" },
            r.repository
        ));
        b.enable_steady_tick(std::time::Duration::from_millis(120));
    }
    let fetched = started.elapsed();
    let out_dir = out.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(out_dir).map_err(io_err("create", out_dir))?;
    let sqfs = staging.path().join("image.sqfs");
    vm::rootfs::layers_to_squashfs(
        &files,
        &sqfs,
        staging.path(),
        vm::rootfs::ConvertLimits {
            max_bytes: p.max_unpacked,
            max_entries: 1_000_000,
        },
    )?;
    for f in &files {
        let _ = fs::remove_file(f);
    }
    if let Some(b) = &p.progress {
        b.finish_and_clear();
    }
    append_gvmi_trailer(&sqfs, &config_json)?;
    // The staging dir is in the store, so this is a rename; a store split over two file
    // systems gets a copy (temp file beside `out`, fsync, rename) instead.
    if fs::rename(&sqfs, out).is_err() {
        let tmp = tempfile::Builder::new()
            .prefix(".sqfs-oci-")
            .tempfile_in(out_dir)
            .map_err(io_err("create a temp file in", out_dir))?;
        fs::copy(&sqfs, tmp.path()).map_err(io_err("copy", tmp.path()))?;
        tmp.as_file()
            .sync_all()
            .map_err(io_err("fsync", tmp.path()))?;
        tmp.persist(out).map_err(|e| ImageError::Io {
            action: "store",
            path: out.to_owned(),
            source: e.error,
        })?;
    }
    let _ = File::open(out_dir).and_then(|d| d.sync_all());
    tracing::info!(
        image = %r,
        manifest = %manifest_digest,
        layers = layers.len(),
        bytes = total,
        compatibility_artifacts = artifacts,
        fetch_ms = fetched.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "pulled an OCI image into a squashfs"
    );
    Ok(())
}

/// `[crc32 LE][json][len as 8 ASCII digits]` after the squashfs, as a GVMI carries its
/// config (`vm::rootfs::read_gvmi_trailer` reads it back).
fn append_gvmi_trailer(path: &Path, json: &[u8]) -> Result<(), ImageError> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let mut crc = flate2::Crc::new();
    crc.update(json);
    let mut trailer = crc.sum().to_le_bytes().to_vec();
    trailer.extend_from_slice(json);
    trailer.extend_from_slice(format!("{:08}", json.len()).as_bytes());
    f.write_all(&trailer).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_V3: &str = "flags\t: fpu cx16 lahf_lm popcnt sse4_1 sse4_2 ssse3 avx avx2 bmi1 bmi2 f16c fma movbe xsave\n";

    #[test]
    fn plain_http_is_for_loopback_and_listed_hosts_only() {
        let ok = |u: &str, list: &[&str]| {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            plain_http_ok(&Url::parse(u).unwrap(), &list)
        };
        assert!(ok("http://127.0.0.2:5001/token", &[]));
        assert!(ok("http://localhost/token", &[]));
        assert!(ok("http://[::1]:80/token", &[]));
        assert!(!ok("http://auth.example.com/token", &[]));
        assert!(
            !ok("http://10.0.0.5:5001/token", &["10.0.0.5"]),
            "the port is part of it"
        );
        assert!(ok("http://10.0.0.5:5001/token", &["10.0.0.5:5001"]));
        assert!(ok("http://Mirror.LAN/token", &["mirror.lan"]));
    }

    #[test]
    fn x86_64_levels_come_from_the_flags() {
        let h = HostPlatform::from_cpuinfo("x86_64", CPU_V3);
        assert_eq!(h.architecture, "amd64");
        assert_eq!(h.variants, ["v3", "v2", "v1"]);
        let old = HostPlatform::from_cpuinfo("x86_64", "flags\t: fpu sse2\n");
        assert_eq!(old.variants, ["v1"]);
        assert_eq!(
            HostPlatform::from_cpuinfo("aarch64", "").architecture,
            "arm64"
        );
    }

    fn index(entries: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{}", format!("{i:x}").repeat(64).get(..64).unwrap()),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        let v =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        ImageIndex::from_reader(serde_json::to_vec(&v).unwrap().as_slice()).unwrap()
    }

    #[test]
    fn the_index_entry_for_this_host_is_chosen_and_none_names_the_offer() {
        let r = OciRef::parse("oci://127.0.0.1:5000/app:v1").unwrap();
        let host = HostPlatform::from_cpuinfo("x86_64", CPU_V3);
        let ix = index(&[
            ("linux", "arm64", Some("v8")),
            ("unknown", "unknown", None),
            ("linux", "amd64", None),
            ("linux", "amd64", Some("v3")),
            ("linux", "amd64", Some("v4")),
        ]);
        let d = select_platform(&r, &ix, &host).unwrap();
        assert_eq!(d.digest().to_string(), format!("sha256:{}", "3".repeat(64)));

        let ix = index(&[("linux", "arm64", Some("v8")), ("linux", "s390x", None)]);
        let e = select_platform(&r, &ix, &host).unwrap_err();
        assert_eq!(crate::images::code(&e), "platform-unsupported");
        let msg = e.to_string();
        assert!(msg.contains("linux/arm64/v8, linux/s390x"), "{msg}");
    }
}
