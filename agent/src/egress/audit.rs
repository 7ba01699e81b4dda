//! Audit lines for the proxy's decisions.
//!
//! Every allow and every deny becomes one JSON object on one line of the audit log
//! (`audit.jsonl` in the data dir). A refusal is written when it is decided; an allowed
//! request or tunnel is written when it closes, so the line can carry the bytes that moved.
//! Each line is handed to the kernel in one `write` on a file opened with `O_APPEND`, so
//! lines from the proxy and from other writers of the same log (the daemon's verdicts)
//! never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
}

#[derive(Debug)]
enum Sink {
    File {
        path: PathBuf,
        file: Mutex<File>,
    },
    Memory {
        records: Mutex<Vec<AuditRecord>>,
        /// Where every line goes as well (the daemon's `audit.jsonl`).
        parent: Option<Arc<AuditLog>>,
    },
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
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            sink: Sink::File {
                path: path.to_owned(),
                file: Mutex::new(file),
            },
        })
    }

    /// Keeps records in memory, for embedding and tests.
    pub fn memory() -> Self {
        Self {
            sink: Sink::Memory {
                records: Mutex::new(Vec::new()),
                parent: None,
            },
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
        }
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
            Sink::File { .. } => self.append(serde_json::to_vec(event).expect("JSON serializes")),
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
        if let Err(e) = f.write_all(&line) {
            tracing::error!(path = %path.display(), error = %e, "cannot write audit line");
        }
    }
}

/// The current time as the audit log writes it.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
