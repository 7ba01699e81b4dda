//! What a running daemon is doing, for `provider status` and `provider jobs`: the daemon
//! rewrites `<data-dir>/status.json` (atomically) every [`INTERVAL`] and removes it when
//! it stops, so the CLI reads a running daemon's state without talking to it or stopping
//! it. A file whose `pid` is not running (a daemon killed with `kill -9`) is stale.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::activity::RunningJob;
use crate::market::profile::{HardwareProfile, InUse};
use crate::store::{atomic_write, DataDir};
use net::wire::Offer;

/// How often the status file is rewritten.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Resources in use, as the status file has them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Used {
    pub jobs: usize,
    pub cpu_threads: u32,
    pub mem_gib: f64,
    pub storage_gib: f64,
}

impl From<InUse> for Used {
    fn from(u: InUse) -> Self {
        Self {
            jobs: u.jobs,
            cpu_threads: u.cpu_threads,
            mem_gib: u.mem_gib,
            storage_gib: u.storage_gib,
        }
    }
}

/// `status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub pid: u32,
    pub peer_id: String,
    pub listen: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub profile: HardwareProfile,
    /// Agreed and running grants (an agreement holds its share from `agree` on).
    pub in_use: Used,
    pub offer: Offer,
    pub jobs: Vec<RunningJob>,
    /// The Prometheus endpoint, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

pub fn path(data: &DataDir) -> PathBuf {
    data.root().join("status.json")
}

impl Status {
    pub fn write(&self, data: &DataDir) {
        let bytes = serde_json::to_vec_pretty(self).expect("the status serializes");
        if let Err(e) = atomic_write(&path(data), &bytes) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
    }

    /// The running daemon's status, `Ok(None)` when no daemon runs on `data` (no file, or
    /// its process is gone).
    pub fn read(data: &DataDir) -> Result<Option<Self>, String> {
        let p = path(data);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("read {}: {e}", p.display())),
        };
        let s: Self = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a status file: {e}", p.display()))?;
        Ok(process_runs(s.pid).then_some(s))
    }
}

/// Whether a process `pid` exists (one we may not signal does).
fn process_runs(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}
