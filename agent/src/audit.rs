//! The daemon's own audit lines, typed: every event the market, the activity service and
//! the daemon write to `audit.jsonl` is an [`AuditEvent`] (the egress proxy's records are
//! [`crate::egress::AuditRecord`]). The lines are those of `docs/daemon.md`: one JSON
//! object with `time` and `event`, keys in sorted order.
//!
//! For now the lines go through [`AuditLog::write_event`]; the log itself still lives in
//! `egress` (it moves into its own module with a sink trait for the proxy later).

use std::path::Path;

use policies::MatchedRule;
use serde::Serialize;

use crate::codes::{Code, Outcome, Reason};
use crate::egress::AuditLog;

/// One event of the daemon's audit log.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AuditEvent<'a> {
    /// The daemon listens.
    DaemonStart { provider_id: &'a str, pid: u32 },
    /// The daemon stopped, after terminating this many jobs.
    DaemonStop { jobs_terminated: usize },
    /// A demand was judged.
    Verdict {
        peer: &'a str,
        /// `accept`, `reject`, or `error` (the request itself was wrong).
        verdict: &'static str,
        reasons: &'a [Reason],
        matched_rule: Option<&'a MatchedRule>,
        proposal_id: Option<&'a str>,
        /// Lowercase hex SHA-256 of the manifest JSON, when it decoded.
        manifest_sha256: Option<String>,
    },
    /// A proposal became an agreement.
    Agreement {
        peer: &'a str,
        agreement_id: &'a str,
        proposal_id: &'a str,
        /// RFC 3339.
        expires_at: String,
    },
    /// A job's VM is up.
    ActivityCreated {
        activity_id: &'a str,
        agreement_id: &'a str,
    },
    /// A job could not start: the code the requestor was told and the whole error.
    ActivityFailed {
        activity_id: &'a str,
        agreement_id: &'a str,
        code: &'a Code,
        error: String,
    },
    /// A job ended and its receipt was stored.
    ActivityTerminated {
        activity_id: &'a str,
        agreement_id: &'a str,
        why: &'a str,
        receipt: &'a Path,
    },
    /// A job's VM started or ended.
    Job(JobEvent<'a>),
    /// One command of a batch, with its outcome.
    Command {
        activity_id: &'a str,
        batch_id: &'a str,
        index: usize,
        command: &'a str,
        outcome: Outcome,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<&'a Code>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
}

/// The two `job` lines of a job's life.
#[derive(Debug, Serialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum JobEvent<'a> {
    Started {
        activity_id: &'a str,
        agreement_id: &'a str,
        requestor_id: &'a str,
        manifest_sha256: &'a str,
        image_hash: &'a str,
        backend: &'a str,
        boot_ms: u64,
        /// What the job's egress proxy allows, one line per rule.
        egress: Vec<String>,
    },
    Ended {
        activity_id: &'a str,
        termination: &'a str,
        commands: usize,
        egress_decisions: usize,
        wall_ms: u64,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent<'a>,
}

impl AuditEvent<'_> {
    /// The line as it is written, `time` now.
    pub fn to_line(&self) -> serde_json::Value {
        self.line_at(crate::egress::audit::now())
    }

    fn line_at(&self, time: String) -> serde_json::Value {
        // Through a value, whose keys are sorted: the lines read as they always have.
        serde_json::to_value(Line { time, event: self }).expect("audit events serialize")
    }
}

/// Appends `event` to `log`.
pub fn record(log: &AuditLog, event: AuditEvent<'_>) {
    log.write_event(&event.to_line());
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line(e: AuditEvent<'_>) -> String {
        e.line_at("T".into()).to_string()
    }

    /// The lines are exactly those `docs/daemon.md` describes (and the daemon wrote before
    /// they were typed).
    #[test]
    fn lines_keep_their_shape() {
        assert_eq!(
            line(AuditEvent::DaemonStart {
                provider_id: "p",
                pid: 7
            }),
            json!({"time": "T", "event": "daemon-start", "provider_id": "p", "pid": 7}).to_string()
        );
        assert_eq!(
            line(AuditEvent::DaemonStop { jobs_terminated: 2 }),
            r#"{"event":"daemon-stop","jobs_terminated":2,"time":"T"}"#
        );
        let reasons = [Reason::new(Code::Busy, "later")];
        assert_eq!(
            line(AuditEvent::Verdict {
                peer: "x",
                verdict: "reject",
                reasons: &reasons,
                matched_rule: None,
                proposal_id: None,
                manifest_sha256: None,
            }),
            json!({"time": "T", "event": "verdict", "peer": "x", "verdict": "reject",
                   "reasons": [{"code": "busy", "message": "later"}], "matched_rule": null,
                   "proposal_id": null, "manifest_sha256": null})
            .to_string()
        );
        assert_eq!(
            line(AuditEvent::Job(JobEvent::Ended {
                activity_id: "a",
                termination: "done",
                commands: 3,
                egress_decisions: 1,
                wall_ms: 9,
            })),
            json!({"time": "T", "event": "job", "phase": "ended", "activity_id": "a",
                   "termination": "done", "commands": 3, "egress_decisions": 1, "wall_ms": 9})
            .to_string()
        );
        let denied = Code::from(exescript::DenialCode::ScriptNoMatch);
        let command = |code, exit_code| {
            line(AuditEvent::Command {
                activity_id: "a",
                batch_id: "b",
                index: 1,
                command: "run /bin/date",
                outcome: Outcome::Denied,
                code,
                exit_code,
            })
        };
        assert_eq!(
            command(Some(&denied), None),
            json!({"time": "T", "event": "command", "activity_id": "a", "batch_id": "b",
                   "index": 1, "command": "run /bin/date", "outcome": "denied",
                   "code": "script-no-match"})
            .to_string()
        );
        assert!(!command(None, Some(0)).contains(r#""code":"#));
        assert!(command(None, Some(0)).contains(r#""exit_code":0"#));
        assert_eq!(
            line(AuditEvent::ActivityTerminated {
                activity_id: "a",
                agreement_id: "g",
                why: "w",
                receipt: Path::new("/d/receipts/a.json"),
            }),
            json!({"time": "T", "event": "activity-terminated", "activity_id": "a",
                   "agreement_id": "g", "why": "w", "receipt": "/d/receipts/a.json"})
            .to_string()
        );
    }
}
