//! The decision engine: a demand (manifest, signature, certificate chain, requestor node id,
//! node descriptor) and the operator's rules in, a verdict with every applicable reason out.
//!
//! Checks that do not depend on each other all run, so a rejected requestor learns
//! everything it has to fix in one round trip rather than one problem at a time.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use certs::golem::{GolemError, NodeDescriptor, OutboundPermission, Permissions};
use certs::{ChainError, ChainVerifier, SignatureAlgorithm, SignatureError, VerifiedChain};
use url::Url;

use crate::manifest::{ManifestError, Outbound, Platform, ReceivedManifest};
use crate::rules::{Mode, Rules};
use crate::whitelist::WhitelistMatcher;

/// Parsed manifests are kept by their base64 text; past this many the cache starts over.
const MANIFEST_CACHE_CAPACITY: usize = 4096;

/// Stable reason codes (documented in `docs/verdicts.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    ManifestInvalid,
    ManifestExpired,
    ManifestNotYetValid,
    SignatureMissing,
    SignatureInvalid,
    UnsupportedAlgorithm,
    CertChainUntrusted,
    CertExpired,
    CertNotYetValid,
    CertUsageInvalid,
    OutboundDisabled,
    OutboundRuleNone,
    UrlNotWhitelisted,
    Blacklisted,
    NotAllowListed,
    ScriptInvalid,
    ConstraintsUnmet,
    PlatformUnsupported,
    NodeIdMismatch,
    PayloadUrlRefused,
}

impl Code {
    /// Every code, in the order of `docs/verdicts.md`'s table.
    pub const ALL: [Code; 20] = [
        Code::ManifestInvalid,
        Code::ManifestExpired,
        Code::ManifestNotYetValid,
        Code::SignatureMissing,
        Code::SignatureInvalid,
        Code::UnsupportedAlgorithm,
        Code::CertChainUntrusted,
        Code::CertExpired,
        Code::CertNotYetValid,
        Code::CertUsageInvalid,
        Code::OutboundDisabled,
        Code::OutboundRuleNone,
        Code::UrlNotWhitelisted,
        Code::NodeIdMismatch,
        Code::Blacklisted,
        Code::NotAllowListed,
        Code::ScriptInvalid,
        Code::ConstraintsUnmet,
        Code::PlatformUnsupported,
        Code::PayloadUrlRefused,
    ];

    /// The code whose text is `text`.
    pub fn from_text(text: &str) -> Option<Code> {
        Self::ALL.into_iter().find(|c| c.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::ManifestInvalid => "manifest-invalid",
            Code::ManifestExpired => "manifest-expired",
            Code::ManifestNotYetValid => "manifest-not-yet-valid",
            Code::SignatureMissing => "signature-missing",
            Code::SignatureInvalid => "signature-invalid",
            Code::UnsupportedAlgorithm => "unsupported-algorithm",
            Code::CertChainUntrusted => "cert-chain-untrusted",
            Code::CertExpired => "cert-expired",
            Code::CertNotYetValid => "cert-not-yet-valid",
            Code::CertUsageInvalid => "cert-usage-invalid",
            Code::OutboundDisabled => "outbound-disabled",
            Code::OutboundRuleNone => "outbound-rule-none",
            Code::UrlNotWhitelisted => "url-not-whitelisted",
            Code::Blacklisted => "blacklisted",
            Code::NotAllowListed => "not-allow-listed",
            Code::ScriptInvalid => "script-invalid",
            Code::ConstraintsUnmet => "constraints-unmet",
            Code::PlatformUnsupported => "platform-unsupported",
            Code::NodeIdMismatch => "node-id-mismatch",
            Code::PayloadUrlRefused => "payload-url-refused",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reason for a reject or a denial: a stable code and a message a person can act on.
///
/// The one reason type of the project: a verdict's reasons carry a [`Code`]; the agent's
/// wire messages use the same type over its wider set of codes (`net::codes::Code`),
/// which embeds these. The JSON is `{"code": "...", "message": "..."}` either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason<C = Code> {
    pub code: C,
    pub message: String,
}

impl<C> Reason<C> {
    pub fn new(code: impl Into<C>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The same reason with its code in a wider set of codes.
    pub fn widen<D: From<C>>(self) -> Reason<D> {
        Reason {
            code: self.code.into(),
            message: self.message,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Accept,
    Reject,
}

/// The outbound rule that granted the manifest's network access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "kebab-case")]
pub enum MatchedRule {
    Everyone {
        mode: Mode,
    },
    AuditedPayload {
        cert_id: String,
        subject: String,
        mode: Mode,
    },
    /// A partner rule on a Golem certificate of the node descriptor's chain; `subject` is
    /// that certificate's display name.
    Partner {
        cert_id: String,
        subject: String,
        mode: Mode,
    },
}

impl MatchedRule {
    pub fn mode(&self) -> Mode {
        match self {
            MatchedRule::Everyone { mode }
            | MatchedRule::AuditedPayload { mode, .. }
            | MatchedRule::Partner { mode, .. } => *mode,
        }
    }
}

/// DESIGN §5: `{"verdict", "reasons": [{"code","message"}], "matched_rule"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: Decision,
    pub reasons: Vec<Reason>,
    pub matched_rule: Option<MatchedRule>,
}

impl Verdict {
    pub fn is_accept(&self) -> bool {
        self.verdict == Decision::Accept
    }

    pub fn codes(&self) -> Vec<Code> {
        self.reasons.iter().map(|r| r.code).collect()
    }
}

/// What a requestor sent, as the demand properties carry it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Demand<'a> {
    /// `golem.srv.comp.payload`: base64 of the manifest JSON (the signed text).
    pub manifest_base64: Option<&'a str>,
    /// `golem.srv.comp.payload.sig`: base64 of the raw signature.
    pub signature_base64: Option<&'a str>,
    /// `golem.srv.comp.payload.sig.algorithm`.
    pub signature_algorithm: Option<&'a str>,
    /// `golem.srv.comp.payload.cert`, decoded: the PEM chain (leaf and intermediates).
    pub cert_chain_pem: Option<&'a [u8]>,
    /// The requestor's libp2p peer id.
    pub node_id: Option<&'a str>,
    /// The requestor's Golem node descriptor (JSON), for the `partner` rule.
    pub node_descriptor: Option<&'a [u8]>,
}

/// A manifest parsed once and kept for repeat demands.
#[derive(Debug)]
struct ParsedManifest {
    received: Result<ReceivedManifest, ManifestError>,
    script: Result<(), String>,
}

/// The operator's configuration compiled for judging; rebuilt when a file changes.
pub struct Judge {
    rules: Rules,
    whitelist: WhitelistMatcher,
    verifier: Arc<ChainVerifier>,
    host: Platform,
    manifests: Mutex<HashMap<String, Arc<ParsedManifest>>>,
}

impl Judge {
    pub fn new(rules: Rules, whitelist: WhitelistMatcher, verifier: Arc<ChainVerifier>) -> Self {
        Self {
            rules,
            whitelist,
            verifier,
            host: Platform::host(),
            manifests: Mutex::new(HashMap::new()),
        }
    }

    /// Judges as if the provider ran on `host` (tests, and offers for other platforms).
    pub fn with_host_platform(mut self, host: Platform) -> Self {
        self.host = host;
        self
    }

    /// Forgets parsed manifests and verified chains (benchmarks measure cold paths this way).
    pub fn clear_caches(&self) {
        self.manifests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.verifier.clear_cache();
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The domain whitelist this judge checks outbound URLs against (the egress proxy of an
    /// accepted job uses the same one).
    pub fn whitelist(&self) -> &WhitelistMatcher {
        &self.whitelist
    }

    pub fn judge(&self, demand: &Demand<'_>, now: DateTime<Utc>) -> Verdict {
        let mut reasons = Vec::new();
        let node_id = demand.node_id;

        if let Some(id) = node_id {
            if self.rules.blacklist.enabled && self.rules.blacklist.identity.contains(id) {
                reasons.push(Reason::new(
                    Code::Blacklisted,
                    format!("node {id} is on this provider's blacklist"),
                ));
            }
        }

        let manifest = demand.manifest_base64.map(|b64| self.parsed(b64));
        let mut usable = None;
        if let Some(parsed) = &manifest {
            match &parsed.received {
                Err(e) => reasons.push(Reason::new(Code::ManifestInvalid, e.to_string())),
                Ok(m) => {
                    match m.check_time(now) {
                        Ok(()) => {}
                        Err(e @ ManifestError::Expired { .. }) => {
                            reasons.push(Reason::new(Code::ManifestExpired, e.to_string()))
                        }
                        Err(e) => {
                            reasons.push(Reason::new(Code::ManifestNotYetValid, e.to_string()))
                        }
                    }
                    if m.select_payload(&self.host).is_none() {
                        let offered: Vec<String> = m
                            .manifest
                            .payload
                            .iter()
                            .map(|p| {
                                let p = p.platform.clone().unwrap_or_else(Platform::golem_default);
                                format!("{}/{}", p.arch, p.os)
                            })
                            .collect();
                        reasons.push(Reason::new(
                            Code::PlatformUnsupported,
                            format!(
                                "no payload for this provider's platform {}/{} (manifest offers {})",
                                self.host.arch,
                                self.host.os,
                                offered.join(", ")
                            ),
                        ));
                    }
                    // The host fetches payloads for the requestor: never its own files.
                    for (i, p) in m.manifest.payload.iter().enumerate() {
                        for (j, u) in p.urls.iter().enumerate() {
                            let scheme = u.split_once(':').map_or("", |(s, _)| s);
                            if !scheme.eq_ignore_ascii_case("http")
                                && !scheme.eq_ignore_ascii_case("https")
                            {
                                reasons.push(Reason::new(
                                    Code::PayloadUrlRefused,
                                    format!(
                                        "payload[{i}].urls[{j}] `{u}`: a payload is fetched only over http or https (`{scheme}:` is not fetched for requestors)"
                                    ),
                                ));
                            }
                        }
                    }
                    if let Err(e) = &parsed.script {
                        reasons.push(Reason::new(Code::ScriptInvalid, e.clone()));
                    }
                    usable = Some(m);
                }
            }
        }

        let signed = self.check_signature(demand, now, &mut reasons);

        if let Some(chain) = &signed {
            if self.rules.blacklist.enabled {
                if let Some(c) = chain
                    .certs
                    .iter()
                    .find(|c| self.rules.blacklist.certified.contains(&c.id))
                {
                    reasons.push(Reason::new(
                        Code::Blacklisted,
                        format!(
                            "certificate `{}` ({}) is on this provider's blacklist",
                            c.short_name(),
                            &c.id[..16]
                        ),
                    ));
                }
            }
        }
        if self.rules.allow_only.enabled {
            let by_identity = node_id.is_some_and(|id| self.rules.allow_only.identity.contains(id));
            let by_cert = signed.as_ref().is_some_and(|chain| {
                chain
                    .ids()
                    .any(|id| self.rules.allow_only.certified.contains(id))
            });
            if !by_identity && !by_cert {
                reasons.push(Reason::new(
                    Code::NotAllowListed,
                    "this provider only accepts requestors on its allow-only list (by node id or by a certificate in a verified signing chain)",
                ));
            }
        }

        let mut matched_rule = None;
        if let Some(m) = usable {
            if m.outbound.is_requested() {
                let sent = demand.signature_base64.is_some() || demand.cert_chain_pem.is_some();
                match self.judge_outbound(&m.outbound, signed.as_deref(), sent, demand, now) {
                    Ok(rule) => matched_rule = Some(rule),
                    Err(mut rs) => reasons.append(&mut rs),
                }
            }
        }

        if reasons.is_empty() {
            Verdict {
                verdict: Decision::Accept,
                reasons,
                matched_rule,
            }
        } else {
            Verdict {
                verdict: Decision::Reject,
                reasons,
                matched_rule: None,
            }
        }
    }

    /// `f` of the manifest whose base64 text is `base64_text`, from the same cache the
    /// verdicts use (so a demand just judged is not parsed again); `None` if it is invalid.
    pub fn with_manifest<R>(
        &self,
        base64_text: &str,
        f: impl FnOnce(&ReceivedManifest) -> R,
    ) -> Option<R> {
        self.parsed(base64_text).received.as_ref().ok().map(f)
    }

    fn parsed(&self, base64_text: &str) -> Arc<ParsedManifest> {
        let lock = || self.manifests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = lock().get(base64_text) {
            return hit.clone();
        }
        let received = ReceivedManifest::from_base64(base64_text);
        let script = match &received {
            Ok(m) => compile_script(m),
            Err(_) => Ok(()),
        };
        let parsed = Arc::new(ParsedManifest { received, script });
        let mut cache = lock();
        if cache.len() >= MANIFEST_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(base64_text.to_owned(), parsed.clone());
        parsed
    }

    /// A signature, if sent, must verify; a bad one rejects the demand whatever else it
    /// asks, because it means the manifest is not what its author signed.
    fn check_signature(
        &self,
        demand: &Demand<'_>,
        now: DateTime<Utc>,
        reasons: &mut Vec<Reason>,
    ) -> Option<Arc<VerifiedChain>> {
        let (sig, chain) = match (demand.signature_base64, demand.cert_chain_pem) {
            (None, None) => return None,
            (Some(_), None) => {
                reasons.push(Reason::new(
                    Code::SignatureMissing,
                    "a signature was sent without the author's certificate chain (golem.srv.comp.payload.cert)",
                ));
                return None;
            }
            (None, Some(_)) => {
                reasons.push(Reason::new(
                    Code::SignatureMissing,
                    "a certificate chain was sent without a signature (golem.srv.comp.payload.sig)",
                ));
                return None;
            }
            (Some(s), Some(c)) => (s, c),
        };
        let Some(manifest_b64) = demand.manifest_base64 else {
            reasons.push(Reason::new(
                Code::ManifestInvalid,
                "a signature was sent without a manifest (golem.srv.comp.payload)",
            ));
            return None;
        };
        let algorithm = match demand.signature_algorithm {
            None => {
                reasons.push(Reason::new(
                    Code::UnsupportedAlgorithm,
                    "no signature algorithm given; set golem.srv.comp.payload.sig.algorithm to sha256, sha384 or sha512",
                ));
                return None;
            }
            Some(name) => match SignatureAlgorithm::parse(name) {
                Ok(a) => a,
                Err(e) => {
                    reasons.push(Reason::new(Code::UnsupportedAlgorithm, e.to_string()));
                    return None;
                }
            },
        };
        let raw_sig = match base64::engine::general_purpose::STANDARD.decode(sig.trim()) {
            Ok(s) => s,
            Err(e) => {
                reasons.push(Reason::new(
                    Code::SignatureInvalid,
                    format!("the signature is not base64: {e}"),
                ));
                return None;
            }
        };
        let verified = match self.verifier.verify(chain, now) {
            Ok(v) => v,
            Err(e) => {
                let code = match e {
                    ChainError::Expired { .. } => Code::CertExpired,
                    ChainError::NotYetValid { .. } => Code::CertNotYetValid,
                    _ => Code::CertChainUntrusted,
                };
                reasons.push(Reason::new(code, e.to_string()));
                return None;
            }
        };
        // The signed text is the manifest's base64 as sent, byte for byte.
        match verified.verify_signature(algorithm, manifest_b64.trim().as_bytes(), &raw_sig) {
            Ok(()) => Some(verified),
            // Names the certificate already.
            Err(SignatureError::CertUsage(e)) => {
                reasons.push(Reason::new(Code::CertUsageInvalid, e.to_string()));
                None
            }
            Err(e) => {
                let code = match e {
                    SignatureError::Invalid => Code::SignatureInvalid,
                    _ => Code::UnsupportedAlgorithm,
                };
                reasons.push(Reason::new(
                    code,
                    format!("{e} (signer `{}`)", verified.certs[0].short_name()),
                ));
                None
            }
        }
    }

    /// Any rule that accepts grants outbound; otherwise every rule's reason is returned.
    fn judge_outbound(
        &self,
        outbound: &Outbound,
        signed: Option<&VerifiedChain>,
        signature_sent: bool,
        demand: &Demand<'_>,
        now: DateTime<Utc>,
    ) -> Result<MatchedRule, Vec<Reason>> {
        let rules = &self.rules.outbound;
        if !rules.enabled {
            return Err(vec![Reason::new(
                Code::OutboundDisabled,
                "this provider does not allow outbound network traffic (provider rule set outbound disable)",
            )]);
        }
        let mut reasons = Vec::new();

        if !rules.audited_payload.is_empty() {
            match signed {
                // A signature that was sent but failed has its own reason already.
                None if signature_sent => {}
                None => reasons.push(Reason::new(
                    Code::SignatureMissing,
                    "the audited-payload rule needs the manifest signed by an author certificate chained to a CA in the provider's keystore",
                )),
                Some(chain) => {
                    let ruled = chain
                        .certs
                        .iter()
                        .find_map(|c| rules.audited_payload.get(&c.id).map(|r| (c, r)));
                    match ruled {
                        None => reasons.push(Reason::new(
                            Code::OutboundRuleNone,
                            format!(
                                "no audited-payload rule names a certificate of the signing chain ({})",
                                chain.certs.iter().map(|c| c.short_name().to_owned()).collect::<Vec<_>>().join(" → ")
                            ),
                        )),
                        Some((cert, rule)) => {
                            match self.mode_allows(rule.mode, outbound, &format!("audited-payload rule for `{}`", cert.short_name())) {
                                Ok(()) => {
                                    return Ok(MatchedRule::AuditedPayload {
                                        cert_id: cert.id.clone(),
                                        subject: cert.subject.clone(),
                                        mode: rule.mode,
                                    })
                                }
                                Err(r) => reasons.push(r),
                            }
                        }
                    }
                }
            }
        }

        if !rules.partner.is_empty() {
            match self.judge_partner(outbound, demand, now) {
                Ok(rule) => return Ok(rule),
                Err(r) => reasons.push(r),
            }
        }

        match self.mode_allows(rules.everyone, outbound, "everyone rule") {
            Ok(()) => Ok(MatchedRule::Everyone {
                mode: rules.everyone,
            }),
            Err(r) => {
                reasons.push(r);
                Err(reasons)
            }
        }
    }

    /// The partner rule: the node descriptor must verify for the requestor at `now`; the
    /// first certificate of its signer chain (signer → root) with a partner rule decides by
    /// its mode, and the descriptor's own permissions must cover every URL wanted.
    fn judge_partner(
        &self,
        outbound: &Outbound,
        demand: &Demand<'_>,
        now: DateTime<Utc>,
    ) -> Result<MatchedRule, Reason> {
        let Some(bytes) = demand.node_descriptor else {
            return Err(Reason::new(
                Code::SignatureMissing,
                "the partner rule needs a node descriptor signed through a partner certificate; none was sent",
            ));
        };
        let descriptor = NodeDescriptor::from_json(bytes).map_err(partner_reason)?;
        let Some(node_id) = demand.node_id else {
            return Err(Reason::new(
                Code::NodeIdMismatch,
                format!(
                    "partner rule: the node descriptor is for node {}, and the requestor's node id is unknown",
                    descriptor.node_id
                ),
            ));
        };
        descriptor.verify(node_id, now).map_err(partner_reason)?;
        let partner = &self.rules.outbound.partner;
        let Some((cert, rule)) = descriptor
            .signer
            .chain()
            .find_map(|c| partner.get(&c.id).map(|r| (c, r)))
        else {
            return Err(Reason::new(
                Code::OutboundRuleNone,
                format!(
                    "no partner rule names a certificate of the node descriptor's chain ({})",
                    descriptor
                        .signer
                        .chain()
                        .map(|c| c.display_name.as_str())
                        .collect::<Vec<_>>()
                        .join(" → ")
                ),
            ));
        };
        self.mode_allows(
            rule.mode,
            outbound,
            &format!("partner rule for `{}`", cert.display_name),
        )?;
        descriptor_allows(&descriptor.permissions, outbound)?;
        Ok(MatchedRule::Partner {
            cert_id: cert.id.clone(),
            subject: cert.display_name.clone(),
            mode: rule.mode,
        })
    }

    fn mode_allows(&self, mode: Mode, outbound: &Outbound, rule: &str) -> Result<(), Reason> {
        match (mode, outbound) {
            (_, Outbound::None) | (Mode::All, _) => Ok(()),
            (Mode::None, _) => Err(Reason::new(
                Code::OutboundRuleNone,
                format!("the {rule} allows no outbound traffic (mode none)"),
            )),
            (Mode::Whitelist, Outbound::Unrestricted { .. }) => Err(Reason::new(
                Code::UrlNotWhitelisted,
                format!("the manifest asks for unrestricted outbound traffic; the {rule} only grants whitelisted domains (mode whitelist), list the URLs instead"),
            )),
            (Mode::Whitelist, Outbound::Urls { urls, .. }) => {
                let denied: Vec<&str> = urls
                    .iter()
                    .filter(|u| !u.host_str().is_some_and(|h| self.whitelist.matches(h)))
                    .map(|u| u.as_str())
                    .collect();
                if denied.is_empty() {
                    Ok(())
                } else {
                    Err(Reason::new(
                        Code::UrlNotWhitelisted,
                        format!(
                            "the {rule} (mode whitelist) does not cover {}",
                            denied.join(", ")
                        ),
                    ))
                }
            }
        }
    }
}

/// The reason a node descriptor (or its chain) was refused for.
fn partner_reason(e: GolemError) -> Reason {
    let code = match &e {
        GolemError::SignatureInvalid { .. } => Code::SignatureInvalid,
        GolemError::UnsupportedAlgorithm { .. } => Code::UnsupportedAlgorithm,
        GolemError::Expired { .. } => Code::CertExpired,
        GolemError::NotYetValid { .. } => Code::CertNotYetValid,
        GolemError::NodeMismatch { .. } => Code::NodeIdMismatch,
        // Like an unparseable or broken X.509 chain: the credential does not hold together.
        GolemError::Malformed { .. }
        | GolemError::ValidityNotNested { .. }
        | GolemError::PermissionsExceeded { .. }
        | GolemError::KeyUsage { .. } => Code::CertChainUntrusted,
    };
    Reason::new(code, format!("partner rule: {e}"))
}

/// The node descriptor's own permissions must cover the manifest's outbound request:
/// `all` or `unrestricted` cover anything; a URL list covers only listed URLs (see
/// [`url_covers`]) and never `unrestricted`.
fn descriptor_allows(permissions: &Permissions, outbound: &Outbound) -> Result<(), Reason> {
    match (permissions.outbound(), outbound) {
        (_, Outbound::None) | (Some(OutboundPermission::Unrestricted), _) => Ok(()),
        (None, _) => Err(Reason::new(
            Code::OutboundRuleNone,
            "partner rule: the node descriptor grants no outbound traffic",
        )),
        (Some(OutboundPermission::Urls(granted)), Outbound::Unrestricted { .. }) => {
            Err(Reason::new(
                Code::UrlNotWhitelisted,
                format!(
                    "partner rule: the manifest asks for unrestricted outbound traffic; the node descriptor only grants {}",
                    granted.iter().map(Url::as_str).collect::<Vec<_>>().join(", ")
                ),
            ))
        }
        (Some(OutboundPermission::Urls(granted)), Outbound::Urls { urls, .. }) => {
            let denied: Vec<&str> = urls
                .iter()
                .filter(|u| !granted.iter().any(|g| url_covers(g, u)))
                .map(Url::as_str)
                .collect();
            if denied.is_empty() {
                Ok(())
            } else {
                Err(Reason::new(
                    Code::UrlNotWhitelisted,
                    format!(
                        "partner rule: the node descriptor does not grant {} (it grants {})",
                        denied.join(", "),
                        granted.iter().map(Url::as_str).collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        }
    }
}

/// Whether a descriptor's granted URL covers a manifest URL: the same scheme, host, port
/// (explicit or the scheme's default) and user info, and the wanted path inside the granted
/// one on a segment boundary (`/api` covers `/api` and `/api/v1`, not `/apiv1`; `/` covers
/// every path). A granted URL with a query or fragment covers only itself. Both URLs are
/// parsed, so host case and default ports do not matter.
pub fn url_covers(granted: &Url, wanted: &Url) -> bool {
    if granted.scheme() != wanted.scheme()
        || granted.host_str() != wanted.host_str()
        || granted.port_or_known_default() != wanted.port_or_known_default()
        || granted.username() != wanted.username()
        || granted.password() != wanted.password()
    {
        return false;
    }
    if granted.query().is_some() || granted.fragment().is_some() {
        return granted == wanted;
    }
    let (g, w) = (granted.path(), wanted.path());
    w == g || (w.starts_with(g) && (g.ends_with('/') || w.as_bytes().get(g.len()) == Some(&b'/')))
}

/// Compiles the manifest's script constraints so a broken regex is refused at negotiation,
/// not when the first command arrives.
fn compile_script(m: &ReceivedManifest) -> Result<(), String> {
    match m.script() {
        None => Ok(()),
        Some(script) => exescript::compile(&script.commands, script.match_)
            .map(|_| ())
            .map_err(|e| format!("compManifest.script: {e}")),
    }
}
