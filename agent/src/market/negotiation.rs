//! The provider's side of negotiation: demand → verdict → proposal or reject → agreement.
//!
//! A demand is judged on four counts, and every count that fails is reported, so a
//! requestor can fix everything in one round: the demand's constraints over this
//! provider's offer, the provider's constraints over the demand's properties, and the
//! trust core's verdict (manifest, signature, chain, rules, whitelist, script), which sees
//! the requestor's peer id from the connection for the blacklist and allow-only rules —
//! never an id the demand claims for itself.
//!
//! The operator's files are re-read when they change (checked on every demand by their
//! size and modification time), so `provider rule …`, `whitelist …` and `keystore …` take
//! effect on the next demand without a restart. If they cannot be read, demands are
//! rejected (`provider-misconfigured`) rather than judged by stale or partial rules.
//!
//! Capacity: an accepted demand's [`Grant`] (what its constraints ask of CPU, memory and
//! disk, at least the per-job size) must fit the hardware profile at all
//! (`constraints-unmet` if not) and beside the grants already agreed (`busy` if not).
//! `agree` reserves it in the [`Ledger`] for `proposal_ttl`; creating the activity holds
//! it until the agreement ends. Checks and reservations take one lock, so concurrent
//! demands never sell the same share twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use policies::{Judge, MatchedRule, WhitelistMatcher};
use serde_json::Value;

use super::constraints::{Filter, Properties};
use super::pricing::Preset;
use super::profile::{Grant, HardwareProfile, Ledger};
use super::runtime::RuntimeProfile;
use crate::audit::AuditLog;
use crate::audit::{self, AuditEvent};
use crate::store::DataDir;
use net::wire::{props, Code, MarketRequest, MarketResponse, Offer, Reason};

/// Negotiation settings (from the daemon's config).
#[derive(Debug, Clone)]
pub struct MarketConfig {
    /// How long a proposal waits for the requestor's `agree`.
    pub proposal_ttl: Duration,
    /// An agreement's longest life; the manifest's `expiresAt` shortens it.
    pub agreement_ttl: Duration,
    /// Open proposals kept at most; beyond it demands get `busy` until some expire.
    pub max_proposals: usize,
    /// Open proposals one peer may hold, so one peer cannot take all of them.
    pub max_proposals_per_peer: usize,
    /// Agreements kept at most (live ones; ended ones are forgotten).
    pub max_agreements: usize,
    /// The provider's constraints over a demand's properties.
    pub demand_filter: Option<Filter>,
    /// What the provider sells in all (the offer advertises it).
    pub profile: HardwareProfile,
    /// The smallest job: what a demand that asks for nothing gets.
    pub job_floor: Grant,
    /// The price list the offer publishes and jobs are charged by.
    pub preset: Preset,
    /// The confinement the preset's jobs run under.
    pub runtime: RuntimeProfile,
}

impl Default for MarketConfig {
    fn default() -> Self {
        Self {
            proposal_ttl: Duration::from_secs(60),
            agreement_ttl: Duration::from_secs(3600),
            max_proposals: 10_000,
            max_proposals_per_peer: 100,
            max_agreements: 1_000,
            demand_filter: None,
            profile: HardwareProfile {
                cpu_threads: 64,
                mem_gib: 1024.0,
                storage_gib: 10240.0,
                max_jobs: 1_000,
            },
            job_floor: Grant {
                cpu_threads: 1,
                mem_gib: 0.5,
                storage_gib: 1.0,
            },
            preset: Preset::builtin(),
            runtime: RuntimeProfile::builtin("default").expect("built in"),
        }
    }
}

/// An accepted deal: what an activity may run, for whom, until when.
#[derive(Debug, Clone)]
pub struct Agreement {
    pub id: String,
    /// The requestor's peer id: only it may start activities on this agreement.
    pub peer: String,
    pub manifest_base64: String,
    /// The rule that granted outbound access; none when the manifest asks for none.
    pub matched_rule: Option<MatchedRule>,
    /// The operator's domain whitelist when the demand was judged.
    pub whitelist: WhitelistMatcher,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The job's share of the hardware profile: its VM's vCPUs, memory and disk.
    pub grant: Grant,
    /// The price list the job is charged by.
    pub preset: Preset,
}

struct Pending {
    peer: String,
    agreement: Agreement,
    proposal_expires: DateTime<Utc>,
}

/// The files the judge is built from, as (path, size, mtime) — a change in any means
/// rebuild.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

struct Loaded {
    fingerprint: Fingerprint,
    judge: Result<Arc<Judge>, String>,
}

/// The provider's market: offer, open proposals and agreements.
pub struct Market {
    data: DataDir,
    offer: Offer,
    offer_props: Properties,
    cfg: MarketConfig,
    loaded: Mutex<Option<Loaded>>,
    proposals: Mutex<HashMap<String, Pending>>,
    agreements: Mutex<HashMap<String, Arc<Agreement>>>,
    ledger: Ledger,
    audit: Arc<AuditLog>,
}

/// A fresh random id (128 bits, hex).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    openssl::rand::rand_bytes(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fingerprint(data: &DataDir) -> Fingerprint {
    let mut paths = vec![data.rules_path(), data.whitelist_path(), data.cert_dir()];
    if let Ok(dir) = std::fs::read_dir(data.cert_dir()) {
        let mut entries: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        paths.extend(entries);
    }
    paths
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let size = meta.as_ref().map_or(u64::MAX, |m| m.len());
            let mtime = meta.and_then(|m| m.modified().ok());
            (p, size, mtime)
        })
        .collect()
}

impl Market {
    pub fn new(data: DataDir, offer: Offer, cfg: MarketConfig, audit: Arc<AuditLog>) -> Self {
        let offer_props = offer.properties.clone().into_iter().collect();
        Self {
            data,
            offer,
            offer_props,
            ledger: Ledger::new(cfg.profile.clone()),
            cfg,
            loaded: Mutex::new(None),
            proposals: Mutex::new(HashMap::new()),
            agreements: Mutex::new(HashMap::new()),
            audit,
        }
    }

    pub fn offer(&self) -> &Offer {
        &self.offer
    }

    /// The runtime profile the offered preset's jobs run under.
    pub fn runtime(&self) -> &RuntimeProfile {
        &self.cfg.runtime
    }

    /// The grants of live agreements, against the profile.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The activity of agreement `id` starts: its reservation is held until the agreement
    /// expires. A reservation that lapsed (the activity came late) is taken anew, and
    /// refused (`busy`) when the share went to another agreement meanwhile.
    pub fn hold_capacity(&self, agreement: &Agreement, now: DateTime<Utc>) -> Result<(), Reason> {
        if self.ledger.extend(&agreement.id, agreement.expires_at, now) {
            return Ok(());
        }
        self.ledger
            .reserve(&agreement.id, agreement.grant, agreement.expires_at, now)
            .map_err(|why| {
                Reason::new(
                    Code::Busy,
                    format!("this agreement's reservation lapsed and its share is taken: {why}; try again later"),
                )
            })
    }

    /// The activity of agreement `id` could not start: its share is free for others.
    pub fn release_capacity(&self, id: &str) {
        self.ledger.release(id);
    }

    /// The judge over the operator's current files, rebuilt when they changed.
    pub fn judge(&self) -> Result<Arc<Judge>, String> {
        let now = fingerprint(&self.data);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = loaded.as_ref().filter(|l| l.fingerprint == now) {
            return l.judge.clone();
        }
        let judge = self.data.load_judge().map(Arc::new).map_err(|e| {
            tracing::error!(error = %e, "cannot load the operator's rules; rejecting demands until fixed");
            e.to_string()
        });
        if loaded.is_some() {
            tracing::info!("operator files changed: rules, whitelist and keystore reloaded");
        }
        *loaded = Some(Loaded {
            fingerprint: now,
            judge: judge.clone(),
        });
        judge
    }

    /// Answers one market request from `peer`.
    pub fn handle(&self, peer: &str, request: MarketRequest, now: DateTime<Utc>) -> MarketResponse {
        match request {
            MarketRequest::GetOffer => MarketResponse::Offer {
                offer: self.offer.clone(),
            },
            MarketRequest::Demand {
                properties,
                constraints,
            } => self.demand(peer, &properties.into_iter().collect(), &constraints, now),
            MarketRequest::Agree { proposal_id } => self.agree(peer, &proposal_id, now),
        }
    }

    fn demand(
        &self,
        peer: &str,
        properties: &Properties,
        constraints: &str,
        now: DateTime<Utc>,
    ) -> MarketResponse {
        let mut reasons = Vec::new();
        let mut wanted: Option<Filter> = None;
        // The requestor's constraints over our offer.
        if !constraints.trim().is_empty() {
            match Filter::parse(constraints) {
                Ok(f) => {
                    let f = wanted.insert(f);
                    let unmet = f.unmet(&self.offer_props);
                    if !unmet.is_empty() {
                        reasons.push(Reason::new(
                            policies::Code::ConstraintsUnmet,
                            format!(
                                "this provider's offer does not meet the demand's constraints: {}",
                                unmet.join("; ")
                            ),
                        ));
                    }
                }
                Err(e) => reasons.push(Reason::new(
                    policies::Code::ConstraintsUnmet,
                    format!("the demand's constraints do not parse: {e}"),
                )),
            }
        }
        // Ours over the demand.
        if let Some(f) = &self.cfg.demand_filter {
            let unmet = f.unmet(properties);
            if !unmet.is_empty() {
                reasons.push(Reason::new(
                    policies::Code::ConstraintsUnmet,
                    format!(
                        "the demand does not meet this provider's constraints: {}",
                        unmet.join("; ")
                    ),
                ));
            }
        }
        let text = |key: &str| -> Result<Option<&str>, Reason> {
            match properties.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.as_str())),
                Some(other) => Err(Reason::new(
                    policies::Code::ManifestInvalid,
                    format!("demand property {key} must be a string, got {other}"),
                )),
            }
        };
        let mut field = |key: &str| match text(key) {
            Ok(v) => v,
            Err(r) => {
                reasons.push(r);
                None
            }
        };
        let manifest = field(props::PAYLOAD);
        let signature = field(props::PAYLOAD_SIG);
        let algorithm = field(props::PAYLOAD_SIG_ALG);
        let cert_b64 = field(props::PAYLOAD_CERT);
        let cert =
            match cert_b64.map(|c| base64::engine::general_purpose::STANDARD.decode(c.trim())) {
                Some(Ok(pem)) => Some(pem),
                Some(Err(e)) => {
                    reasons.push(Reason::new(
                        policies::Code::CertChainUntrusted,
                        format!(
                            "demand property {} is not base64 of a PEM chain: {e}",
                            props::PAYLOAD_CERT
                        ),
                    ));
                    None
                }
                None => None,
            };
        let descriptor = properties
            .get(props::NODE_DESCRIPTOR)
            .filter(|v| !v.is_null())
            .map(|v| match v {
                // A descriptor may come as a JSON object or as its text.
                Value::String(s) => s.clone().into_bytes(),
                other => serde_json::to_vec(other).expect("JSON serializes"),
            });

        let mut matched = None;
        match self.judge() {
            Err(e) => reasons.push(Reason::new(
                Code::ProviderMisconfigured,
                format!("this provider cannot read its own rules right now ({e}); try again later"),
            )),
            Ok(judge) => {
                let verdict = judge.judge(
                    &policies::Demand {
                        manifest_base64: manifest,
                        signature_base64: signature,
                        signature_algorithm: algorithm,
                        cert_chain_pem: cert.as_deref(),
                        node_id: Some(peer),
                        node_descriptor: descriptor.as_deref(),
                    },
                    now,
                );
                for r in &verdict.reasons {
                    reasons.push(r.clone().widen());
                }
                if verdict.is_accept() {
                    // Judged valid above, so it parses; its expiry bounds the agreement's.
                    let expiry = manifest
                        .and_then(|m| judge.with_manifest(m, |m| m.manifest.expires_at))
                        .unwrap_or(now);
                    matched = Some((
                        verdict.matched_rule.clone(),
                        judge.whitelist().clone(),
                        expiry,
                    ));
                }
            }
        }

        let response = match (reasons.is_empty(), matched, manifest) {
            (true, Some((rule, whitelist, expiry)), Some(manifest)) => {
                let grant = Grant::for_demand(wanted.as_ref(), self.cfg.job_floor);
                if !self.cfg.profile.holds(&grant) {
                    MarketResponse::Rejected {
                        reasons: vec![Reason::new(
                            policies::Code::ConstraintsUnmet,
                            format!(
                                "the demand asks for {} CPU threads, {} GiB memory and {} GiB storage; this provider sells {} threads, {} GiB and {} GiB in all",
                                grant.cpu_threads, grant.mem_gib, grant.storage_gib,
                                self.cfg.profile.cpu_threads, self.cfg.profile.mem_gib, self.cfg.profile.storage_gib
                            ),
                        )],
                    }
                } else if let Some(why) = runtime_cap(&self.cfg.runtime, &grant) {
                    MarketResponse::Rejected {
                        reasons: vec![Reason::new(policies::Code::ConstraintsUnmet, why)],
                    }
                } else if let Some(why) = self.ledger.check(&grant, now) {
                    MarketResponse::Rejected {
                        reasons: vec![Reason::new(
                            Code::Busy,
                            format!(
                                "this provider cannot take the job now: {why}; try again later"
                            ),
                        )],
                    }
                } else {
                    self.propose(peer, manifest, (rule, whitelist, expiry), grant, now)
                }
            }
            (true, _, _) => MarketResponse::Rejected {
                reasons: vec![Reason::new(
                    policies::Code::ManifestInvalid,
                    "the demand carries no manifest (golem.srv.comp.payload)",
                )],
            },
            (false, _, _) => MarketResponse::Rejected { reasons },
        };
        self.audit_verdict(peer, manifest, &response);
        response
    }

    fn propose(
        &self,
        peer: &str,
        manifest: &str,
        (rule, whitelist, manifest_expiry): (Option<MatchedRule>, WhitelistMatcher, DateTime<Utc>),
        grant: Grant,
        now: DateTime<Utc>,
    ) -> MarketResponse {
        let ttl = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let expires_at = (now + ttl(self.cfg.agreement_ttl)).min(manifest_expiry);
        let proposal_expires = (now + ttl(self.cfg.proposal_ttl)).min(expires_at);
        let id = new_id();
        let mut proposals = self.proposals.lock().unwrap_or_else(|p| p.into_inner());
        // Unanswered proposals are dropped as they expire (checked every 256 inserts, so a
        // burst of demands does not pay a full scan each), not only when the map is full.
        if proposals.len() % 256 == 255 {
            proposals.retain(|_, p| p.proposal_expires > now);
        }
        // Counting only matters once there are that many proposals at all.
        if proposals.len() >= self.cfg.max_proposals_per_peer {
            let mine = proposals
                .values()
                .filter(|p| p.peer == peer && p.proposal_expires > now)
                .count();
            if mine >= self.cfg.max_proposals_per_peer {
                return MarketResponse::Rejected {
                    reasons: vec![Reason::new(
                        Code::Busy,
                        format!(
                            "this peer already holds {mine} open proposals, the most one peer may; agree to one or wait {} s",
                            self.cfg.proposal_ttl.as_secs()
                        ),
                    )],
                };
            }
        }
        if proposals.len() >= self.cfg.max_proposals {
            proposals.retain(|_, p| p.proposal_expires > now);
            if proposals.len() >= self.cfg.max_proposals {
                return MarketResponse::Rejected {
                    reasons: vec![Reason::new(
                        Code::Busy,
                        format!(
                            "this provider has {} open proposals; try again in {} s",
                            proposals.len(),
                            self.cfg.proposal_ttl.as_secs()
                        ),
                    )],
                };
            }
        }
        proposals.insert(
            id.clone(),
            Pending {
                peer: peer.to_owned(),
                agreement: Agreement {
                    id: String::new(),
                    peer: peer.to_owned(),
                    manifest_base64: manifest.to_owned(),
                    matched_rule: rule.clone(),
                    whitelist,
                    created_at: now,
                    expires_at,
                    grant,
                    preset: self.cfg.preset.clone(),
                },
                proposal_expires,
            },
        );
        MarketResponse::Proposal {
            proposal_id: id,
            offer: self.offer.clone(),
            expires_at: proposal_expires,
            matched_rule: rule,
        }
    }

    fn agree(&self, peer: &str, proposal_id: &str, now: DateTime<Utc>) -> MarketResponse {
        let error = |code: Code, message: String| MarketResponse::Error {
            reason: Reason::new(code, message),
        };
        let pending = {
            let mut proposals = self.proposals.lock().unwrap_or_else(|p| p.into_inner());
            match proposals.get(proposal_id) {
                None => {
                    return error(
                        Code::UnknownProposal,
                        format!("no open proposal {proposal_id}: it never existed, was already agreed, or expired"),
                    )
                }
                // Another peer cannot take over a proposal it was not made; the answer does
                // not say whether the id exists.
                Some(p) if p.peer != peer => {
                    return error(
                        Code::UnknownProposal,
                        format!("no open proposal {proposal_id} for peer {peer}"),
                    )
                }
                Some(_) => proposals.remove(proposal_id).expect("present"),
            }
        };
        if pending.proposal_expires <= now {
            return error(
                Code::ProposalExpired,
                format!(
                    "proposal {proposal_id} expired at {}; send the demand again",
                    pending.proposal_expires.to_rfc3339()
                ),
            );
        }
        let mut agreement = pending.agreement;
        agreement.id = new_id();
        agreement.created_at = now;
        let mut agreements = self.agreements.lock().unwrap_or_else(|p| p.into_inner());
        agreements.retain(|_, a| a.expires_at > now);
        if agreements.len() >= self.cfg.max_agreements {
            return error(
                Code::Busy,
                format!(
                    "this provider holds {} agreements, its limit; try again later",
                    agreements.len()
                ),
            );
        }
        // The share is the agreement's for `proposal_ttl`, time to create its activity.
        let hold = (now
            + chrono::Duration::from_std(self.cfg.proposal_ttl).unwrap_or(chrono::Duration::MAX))
        .min(agreement.expires_at);
        if let Err(why) = self
            .ledger
            .reserve(&agreement.id, agreement.grant, hold, now)
        {
            return error(
                Code::Busy,
                format!("this provider cannot take the job now: {why}; try again later"),
            );
        }
        let response = MarketResponse::Agreement {
            agreement_id: agreement.id.clone(),
            expires_at: agreement.expires_at,
        };
        audit::record(
            &self.audit,
            AuditEvent::Agreement {
                peer,
                agreement_id: &agreement.id,
                proposal_id,
                expires_at: agreement.expires_at.to_rfc3339(),
            },
        );
        agreements.insert(agreement.id.clone(), Arc::new(agreement));
        response
    }

    /// The agreement `id` if `peer` holds it and it has not expired.
    pub fn agreement(
        &self,
        id: &str,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<Arc<Agreement>, Reason> {
        let agreements = self.agreements.lock().unwrap_or_else(|p| p.into_inner());
        match agreements.get(id) {
            Some(a) if a.peer == peer && a.expires_at > now => Ok(a.clone()),
            Some(a) if a.peer == peer => Err(Reason::new(
                Code::AgreementExpired,
                format!(
                    "agreement {id} expired at {}; negotiate again",
                    a.expires_at.to_rfc3339()
                ),
            )),
            _ => Err(Reason::new(
                Code::UnknownAgreement,
                format!("no agreement {id} for peer {peer}"),
            )),
        }
    }

    /// Forgets an agreement (its activity ended).
    pub fn end_agreement(&self, id: &str) {
        self.ledger.release(id);
        self.agreements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Open proposals and live agreements (for the daemon's status and tests).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.proposals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
            self.agreements
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len(),
        )
    }

    fn audit_verdict(&self, peer: &str, manifest: Option<&str>, response: &MarketResponse) {
        let manifest_sha256 = manifest
            .and_then(|m| {
                base64::engine::general_purpose::STANDARD
                    .decode(m.trim())
                    .ok()
            })
            .map(|json| hex(&openssl::sha::sha256(&json)));
        let (verdict, reasons, matched_rule, proposal_id) = match response {
            MarketResponse::Proposal {
                proposal_id,
                matched_rule,
                ..
            } => (
                "accept",
                &[][..],
                matched_rule.as_ref(),
                Some(proposal_id.as_str()),
            ),
            MarketResponse::Rejected { reasons } => ("reject", &reasons[..], None, None),
            _ => ("error", &[][..], None, None),
        };
        audit::record(
            &self.audit,
            AuditEvent::Verdict {
                peer,
                verdict,
                reasons,
                matched_rule,
                proposal_id,
                manifest_sha256,
            },
        );
    }
}

/// Why `grant` is more than the runtime profile lets one job have, or `None`.
pub fn runtime_cap(rp: &RuntimeProfile, grant: &Grant) -> Option<String> {
    let gib = |b: crate::units::ByteSize| b.bytes() as f64 / (1u64 << 30) as f64;
    let mut over = Vec::new();
    if let Some(m) = rp.memory.filter(|m| grant.mem_gib > gib(*m) + 1e-9) {
        over.push(format!("{} GiB memory (at most {})", grant.mem_gib, gib(m)));
    }
    if let Some(d) = rp.disk.filter(|d| grant.storage_gib > gib(*d) + 1e-9) {
        over.push(format!(
            "{} GiB storage (at most {})",
            grant.storage_gib,
            gib(d)
        ));
    }
    (!over.is_empty()).then(|| {
        format!(
            "the demand asks for {} per job; this provider's jobs run under runtime profile `{}`",
            over.join(" and "),
            rp.name
        )
    })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use certs::testpki::{self, KeyKind, Validity};
    use openssl::hash::MessageDigest;
    use policies::Rules;
    use serde_json::json;

    const PEER: &str = "12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo";
    const OTHER: &str = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE";

    struct Fixture {
        _dir: tempfile::TempDir,
        data: DataDir,
        market: Market,
        props: Properties,
        audit: std::path::PathBuf,
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A data dir whose keystore trusts a fresh root, the default rules (everyone may run
    /// manifests without outbound URLs), and a demand signed under that root.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
        let leaf = testpki::issue(&root, "Author", KeyKind::EcP256, false, Validity::current());
        let lock = data.lock().unwrap();
        data.save_cert_file(&lock, "root.pem", &root.cert.to_pem().unwrap())
            .unwrap();
        drop(lock);
        let manifest = json!({
            "version": "0.1.0",
            "createdAt": "2024-01-01T00:00:00Z",
            "expiresAt": "2100-01-01T00:00:00Z",
            "metadata": {"name": "t", "version": "1"},
            "payload": [{"platform": {"arch": std::env::consts::ARCH, "os": "linux"},
                         "urls": ["https://images.example.com/a.tar.gz"],
                         "hash": format!("sha3:{}", "ab".repeat(32))}],
            "compManifest": {"version": "0.1.0"}
        });
        let m64 = b64(manifest.to_string().as_bytes());
        let sig = testpki::sign(&leaf.key, MessageDigest::sha256(), m64.as_bytes());
        let props: Properties = [
            (props::PAYLOAD, json!(m64)),
            (props::PAYLOAD_SIG, json!(b64(&sig))),
            (props::PAYLOAD_SIG_ALG, json!("sha256")),
            (
                props::PAYLOAD_CERT,
                json!(b64(&testpki::pem(&[&leaf.cert]))),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let audit = dir.path().join("audit.jsonl");
        let offer = Offer {
            provider_id: "provider".into(),
            properties: [("golem.inf.mem.gib".to_owned(), json!(2.0))].into(),
            constraints: String::new(),
        };
        let market = Market::new(
            data.clone(),
            offer,
            MarketConfig::default(),
            Arc::new(AuditLog::open(&audit).unwrap()),
        );
        Fixture {
            _dir: dir,
            data,
            market,
            props,
            audit,
        }
    }

    fn demand(f: &Fixture, peer: &str, props: &Properties, constraints: &str) -> MarketResponse {
        f.market.handle(
            peer,
            MarketRequest::Demand {
                properties: props.clone().into_iter().collect(),
                constraints: constraints.into(),
            },
            Utc::now(),
        )
    }

    fn codes(r: &MarketResponse) -> Vec<String> {
        match r {
            MarketResponse::Rejected { reasons } => {
                reasons.iter().map(|r| r.code.to_string()).collect()
            }
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[test]
    fn accepted_demand_becomes_an_agreement_only_for_its_peer() {
        let f = fixture();
        let r = demand(&f, PEER, &f.props, "(golem.inf.mem.gib>=1)");
        let MarketResponse::Proposal { proposal_id, .. } = r else {
            panic!("expected a proposal, got {r:?}");
        };
        let agree = |peer: &str| {
            f.market.handle(
                peer,
                MarketRequest::Agree {
                    proposal_id: proposal_id.clone(),
                },
                Utc::now(),
            )
        };
        let stolen = agree(OTHER);
        assert!(
            matches!(&stolen, MarketResponse::Error { reason } if reason.code == "unknown-proposal"),
            "{stolen:?}"
        );
        let MarketResponse::Agreement { agreement_id, .. } = agree(PEER) else {
            panic!("the proposal's own peer could not agree");
        };
        assert!(
            matches!(agree(PEER), MarketResponse::Error { .. }),
            "agreed twice"
        );
        assert!(f.market.agreement(&agreement_id, PEER, Utc::now()).is_ok());
        let e = f
            .market
            .agreement(&agreement_id, OTHER, Utc::now())
            .unwrap_err();
        assert_eq!(e.code, "unknown-agreement");
        let later = Utc::now() + chrono::Duration::days(1);
        let e = f.market.agreement(&agreement_id, PEER, later).unwrap_err();
        assert_eq!(e.code, "agreement-expired");

        let log = std::fs::read_to_string(&f.audit).unwrap();
        assert!(
            log.contains(r#""event":"verdict""#) && log.contains(r#""event":"agreement""#),
            "{log}"
        );
    }

    #[test]
    fn one_peer_cannot_hold_every_open_proposal() {
        let mut f = fixture();
        f.market.cfg.max_proposals_per_peer = 3;
        for _ in 0..3 {
            assert!(matches!(
                demand(&f, PEER, &f.props, ""),
                MarketResponse::Proposal { .. }
            ));
        }
        let r = demand(&f, PEER, &f.props, "");
        assert_eq!(codes(&r), ["busy"]);
        // Others are still served.
        assert!(matches!(
            demand(&f, OTHER, &f.props, ""),
            MarketResponse::Proposal { .. }
        ));
    }

    #[test]
    fn every_failing_count_is_reported_together() {
        let f = fixture();
        let mut props = f.props.clone();
        props.insert(props::PAYLOAD_SIG.into(), json!(b64(b"not the signature")));
        let r = demand(&f, PEER, &props, "(golem.inf.mem.gib>=64)");
        let c = codes(&r);
        assert!(c.contains(&"constraints-unmet".to_string()), "{c:?}");
        assert!(c.contains(&"signature-invalid".to_string()), "{c:?}");
        let r = demand(&f, PEER, &f.props, "(golem.inf.mem.gib>=");
        assert_eq!(codes(&r), ["constraints-unmet"]);
    }

    #[test]
    fn rule_changes_apply_to_the_next_demand_without_a_restart() {
        let f = fixture();
        assert!(matches!(
            demand(&f, PEER, &f.props, ""),
            MarketResponse::Proposal { .. }
        ));
        let mut rules = Rules::default();
        rules.blacklist.enabled = true;
        rules.blacklist.identity.insert(PEER.into());
        let lock = f.data.lock().unwrap();
        f.data.save_rules(&lock, &rules).unwrap();
        drop(lock);
        assert_eq!(codes(&demand(&f, PEER, &f.props, "")), ["blacklisted"]);
        // Only the connection's peer id counts: another peer is not blacklisted.
        assert!(matches!(
            demand(&f, OTHER, &f.props, ""),
            MarketResponse::Proposal { .. }
        ));
        // A broken rules file fails closed.
        std::fs::write(f.data.rules_path(), b"{ not json").unwrap();
        assert_eq!(
            codes(&demand(&f, OTHER, &f.props, "")),
            ["provider-misconfigured"]
        );
    }
}
