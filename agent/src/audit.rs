//! The audit log (`audit.jsonl` in the data dir) and the daemon's own events on it.
//!
//! Every event the market, the activity service and the daemon write is an [`AuditEvent`];
//! the egress proxy's records ([`egress::AuditRecord`]) come in through the log's
//! [`egress::AuditSink`]. The lines are those of `docs/daemon.md`: one JSON object with
//! `time` and `event`, keys in sorted order. Each line is handed to the kernel in one
//! `write` on a file opened with `O_APPEND`, so lines from the proxy and from other
//! writers of the same log never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use egress::{AuditRecord, AuditSink};
use policies::MatchedRule;
use serde::Serialize;

use net::codes::{Code, Outcome, Reason};

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("open audit log {path}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Where audit lines go.
#[derive(Debug)]
pub struct AuditLog {
    sink: Sink,
    /// Sees every line the file log writes (the daemon's metrics count from it).
    observer: std::sync::OnceLock<Observer>,
}

/// A function shown each line a file log writes, as JSON.
pub type ObserverFn = dyn Fn(&serde_json::Value) + Send + Sync;

struct Observer(Arc<ObserverFn>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

#[derive(Debug)]
enum Sink {
    File {
        path: PathBuf,
        file: Mutex<AppendFile>,
    },
    Memory {
        records: Mutex<Vec<AuditRecord>>,
        /// Where every line goes as well (the daemon's `audit.jsonl`).
        parent: Option<Arc<AuditLog>>,
    },
}

/// The log file, and whether a write of ours failed part-way (a full disk), so the file
/// may end in a torn line.
#[derive(Debug)]
struct AppendFile {
    file: File,
    maybe_torn: bool,
}

/// A writer killed in the middle of a line leaves it without its newline; the next line
/// would be glued to it and both lost to a reader. End it, so the torn line alone is lost.
fn end_torn_line(file: &mut File) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

impl AuditLog {
    /// Appends to `path`, creating it (and its directory) if needed.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let err = |source| AuditError {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(err)?;
        end_torn_line(&mut file).map_err(err)?;
        Ok(Self {
            sink: Sink::File {
                path: path.to_owned(),
                file: Mutex::new(AppendFile {
                    file,
                    maybe_torn: false,
                }),
            },
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Keeps records in memory, for embedding and tests.
    pub fn memory() -> Self {
        Self {
            sink: Sink::Memory {
                records: Mutex::new(Vec::new()),
                parent: None,
            },
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Keeps one job's records in memory (for its receipt) and passes every line on to
    /// `parent` too.
    pub fn tee(parent: Arc<AuditLog>) -> Self {
        Self {
            sink: Sink::Memory {
                records: Mutex::new(Vec::new()),
                parent: Some(parent),
            },
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Shows `f` every line this log writes from now on (once; later calls are ignored).
    /// Lines of a job's tee reach it through the parent.
    pub fn observe(&self, f: Arc<ObserverFn>) {
        let _ = self.observer.set(Observer(f));
    }

    /// The records kept by [`AuditLog::memory`] (empty for a file log).
    pub fn records(&self) -> Vec<AuditRecord> {
        match &self.sink {
            Sink::Memory { records, .. } => {
                records.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }
            Sink::File { .. } => Vec::new(),
        }
    }

    /// Writes one line. A failing audit write must not take the proxy down with it, but
    /// it must not go unnoticed either: it is logged as an error.
    pub fn write(&self, record: AuditRecord) {
        match &self.sink {
            Sink::Memory { records, parent } => {
                if let Some(p) = parent {
                    p.write(record.clone());
                }
                records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(record);
            }
            Sink::File { .. } => {
                if let Some(o) = self.observer.get() {
                    (o.0)(&serde_json::to_value(&record).expect("audit record serializes"));
                }
                let line = serde_json::to_vec(&record).expect("audit record serializes");
                self.append(line);
            }
        }
    }

    /// Writes any other event (a verdict, a command decision) as one line. Memory logs
    /// without a parent drop it: they keep egress records only.
    pub fn write_event(&self, event: &serde_json::Value) {
        match &self.sink {
            Sink::Memory { parent, .. } => {
                if let Some(p) = parent {
                    p.write_event(event);
                }
            }
            Sink::File { .. } => {
                if let Some(o) = self.observer.get() {
                    (o.0)(event);
                }
                self.append(serde_json::to_vec(event).expect("JSON serializes"))
            }
        }
    }

    fn append(&self, mut line: Vec<u8>) {
        let Sink::File { path, file } = &self.sink else {
            return;
        };
        line.push(b'\n');
        // One write_all of the whole line on an O_APPEND file: lines from concurrent
        // writers never interleave.
        let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
        // After a failed write (disk full) the file may end mid-line: end that line first,
        // or this one would be glued to it and both lost to a reader.
        if f.maybe_torn {
            if let Err(e) = end_torn_line(&mut f.file) {
                tracing::error!(path = %path.display(), error = %e, "cannot write audit line");
                return;
            }
            f.maybe_torn = false;
        }
        if let Err(e) = f.file.write_all(&line) {
            f.maybe_torn = true;
            tracing::error!(path = %path.display(), error = %e, "cannot write audit line");
        }
    }
}

impl AuditSink for AuditLog {
    fn record(&self, record: AuditRecord) {
        self.write(record);
    }
}

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
        /// From the `create` request to the guest agent ready (image, initramfs, boot).
        start_ms: u64,
        /// The runtime profile it runs under.
        runtime_profile: &'a str,
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
        /// How the VM started (`warm start: …` or `cold boot: WHY`).
        start: &'a str,
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
        self.line_at(egress::audit::now())
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
