//! Audit records for the proxy's decisions, and the sink they are written to.
//!
//! Every allow and every deny becomes one [`AuditRecord`], handed to the proxy's
//! [`AuditSink`]; the daemon's sink writes it as one JSON line of the audit log
//! (`audit.jsonl` in the data dir). A refusal is recorded when it is decided; an allowed
//! request or tunnel is recorded when it closes, so the record can carry the bytes that
//! moved.

use serde::{Deserialize, Serialize};

/// One decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC, milliseconds: when the line was written.
    pub time: String,
    /// Always `egress`, to tell these lines from other components' in the shared log.
    pub event: String,
    pub job: String,
    /// `CONNECT`, or the plain request's method.
    pub method: String,
    /// What the client asked for: `host:port` for CONNECT, the absolute URI otherwise.
    pub destination: String,
    /// The address dialed (or the one refused), when resolution got that far.
    pub resolved: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// For an allow, the manifest URL that allowed it (or `unrestricted`); for a deny, the
    /// refusal code (`not-listed`, `address-denied`, `sni-mismatch`, …).
    pub rule: String,
    /// Why, in words (empty for an allow that closed normally).
    pub reason: String,
    /// The HTTP status the client got (200 for an established tunnel).
    pub status: u16,
    /// Body or tunnel bytes from the client to the destination.
    pub bytes_up: u64,
    /// Body or tunnel bytes from the destination to the client.
    pub bytes_down: u64,
    pub duration_ms: u64,
}

/// Where the proxy's records go: the daemon's audit log, a job's receipt, a test's memory.
///
/// A failing write must not take the proxy down with it, but it must not go unnoticed
/// either: a sink logs it as an error.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Takes one record.
    fn record(&self, record: AuditRecord);
}

/// The current time as the audit log writes it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
