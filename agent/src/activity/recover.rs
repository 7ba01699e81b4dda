//! What a daemon that was killed (`kill -9`, a crash, a power cut) left behind, put right
//! when the next one starts, before it serves anyone.
//!
//! A job that was running, or still starting, has a directory in `<data>/jobs/` and
//! neither a receipt nor an end in the audit log. Its VM is gone already: QEMU dies with
//! the thread that spawned it (`PR_SET_PDEATHSIG`), the own VMM ran inside the daemon.
//! Such a job is marked ended — a `job` `ended` audit line whose `termination` says it was
//! interrupted — and its left-over initramfs is removed. The temp files of an atomic
//! receipt write that was cut short are removed too (`store::remove_stale_temps`). No
//! receipt is made up for it: a receipt is what the job did, signed, and nobody saw the
//! end of what it did.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead as _;
use std::path::Path;

use crate::audit::{self, AuditEvent, AuditLog, JobEvent};
use crate::store::DataDir;

/// The `termination` of a job found interrupted.
pub const INTERRUPTED: &str =
    "interrupted: the daemon stopped (killed or crashed) while the job ran; found when it restarted";

/// Marks every interrupted job ended (see the module doc) and returns their activity ids.
/// Best effort: what cannot be read or removed is logged, and the daemon starts anyway.
pub fn recover_interrupted(data: &DataDir, log: &AuditLog) -> Vec<String> {
    crate::store::remove_stale_temps(&data.root().join("receipts"));
    let jobs_dir = data.root().join("jobs");
    let Ok(entries) = std::fs::read_dir(&jobs_dir) else {
        return Vec::new();
    };
    let mut dirs: BTreeSet<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    if dirs.is_empty() {
        return Vec::new();
    }
    let (ended, commands) = audit_history(&data.audit_path());
    let receipts = data.root().join("receipts");
    dirs.retain(|id| !ended.contains(id) && !receipts.join(format!("{id}.json")).exists());
    for id in &dirs {
        let initramfs = jobs_dir.join(id).join("initramfs.cpio");
        if let Err(e) = std::fs::remove_file(&initramfs) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %initramfs.display(), error = %e, "cannot remove an interrupted job's initramfs");
            }
        }
        tracing::warn!(activity_id = %id, "a job was interrupted by the previous daemon's end; marked ended");
        audit::record(
            log,
            AuditEvent::Job(JobEvent::Ended {
                activity_id: id,
                termination: INTERRUPTED,
                commands: commands.get(id).copied().unwrap_or(0),
                egress_decisions: 0,
                wall_ms: 0,
            }),
        );
    }
    dirs.into_iter().collect()
}

/// From the audit log: the activities that ended (a `job` end, a failed start, a
/// termination) and how many commands each ran. A line that is not JSON (a write cut
/// short by the kill) is skipped.
fn audit_history(path: &Path) -> (BTreeSet<String>, BTreeMap<String, usize>) {
    let mut ended = BTreeSet::new();
    let mut commands: BTreeMap<String, usize> = BTreeMap::new();
    let Ok(file) = std::fs::File::open(path) else {
        return (ended, commands);
    };
    for line in std::io::BufReader::new(file)
        .split(b'\n')
        .map_while(Result::ok)
    {
        // Most lines are verdicts and egress decisions: skip them before parsing.
        let interesting = [&b"\"job\""[..], b"activity-", b"\"command\""]
            .iter()
            .any(|needle| line.windows(needle.len()).any(|w| w == *needle));
        if !interesting {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(id) = v["activity_id"].as_str() else {
            continue;
        };
        match (v["event"].as_str(), v["phase"].as_str()) {
            (Some("job"), Some("ended"))
            | (Some("activity-failed"), _)
            | (Some("activity-terminated"), _) => {
                ended.insert(id.to_owned());
            }
            (Some("command"), _) => *commands.entry(id.to_owned()).or_default() += 1,
            _ => {}
        }
    }
    (ended, commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: serde_json::Value) -> String {
        format!("{v}\n")
    }

    /// A data dir as `kill -9` leaves it: one job mid-batch (started, two commands, no
    /// end), one still booting (a directory with its initramfs, nothing in the log), one
    /// that ended, one whose start failed, a receipt write cut short, and a last audit line
    /// cut in half.
    #[test]
    fn interrupted_jobs_are_marked_ended_once_and_their_litter_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path().to_owned());
        let jobs = tmp.path().join("jobs");
        for id in ["running", "booting", "done", "failed"] {
            std::fs::create_dir_all(jobs.join(id)).unwrap();
        }
        std::fs::write(jobs.join("booting/initramfs.cpio"), b"070701").unwrap();
        let receipts = tmp.path().join("receipts");
        std::fs::create_dir_all(&receipts).unwrap();
        std::fs::write(receipts.join("done.json"), b"{}").unwrap();
        // A temp of a writer that is gone (pid far above pid_max).
        let temp = receipts.join(".running.json.tmp.4294967");
        std::fs::write(&temp, b"{\"receipt\":").unwrap();
        let log_text = [
            line(serde_json::json!({"event": "job", "phase": "started", "activity_id": "running"})),
            line(serde_json::json!({"event": "command", "activity_id": "running", "index": 0})),
            line(serde_json::json!({"event": "command", "activity_id": "running", "index": 1})),
            line(serde_json::json!({"event": "job", "phase": "started", "activity_id": "done"})),
            line(serde_json::json!({"event": "job", "phase": "ended", "activity_id": "done"})),
            line(serde_json::json!({"event": "activity-failed", "activity_id": "failed"})),
            "{\"event\":\"command\",\"activity_id\":\"runn".to_owned(),
        ]
        .concat();
        std::fs::write(data.audit_path(), log_text).unwrap();
        let log = AuditLog::open(&data.audit_path()).unwrap();

        let found = recover_interrupted(&data, &log);
        assert_eq!(found, ["booting", "running"]);
        assert!(!jobs.join("booting/initramfs.cpio").exists());
        assert!(!temp.exists(), "the cut-short receipt temp is removed");
        assert!(receipts.join("done.json").exists());

        let text = std::fs::read_to_string(data.audit_path()).unwrap();
        let ends: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["phase"] == "ended" && v["termination"] == INTERRUPTED)
            .collect();
        assert_eq!(ends.len(), 2, "{text}");
        let running = ends.iter().find(|v| v["activity_id"] == "running").unwrap();
        assert_eq!(running["commands"], 2);

        // The next start finds nothing more to do.
        assert!(recover_interrupted(&data, &log).is_empty());
    }
}
