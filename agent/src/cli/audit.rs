//! `provider audit`: the audit log (`<data-dir>/audit.jsonl`) filtered by time, event and
//! job, as a table or JSON. It reads the file a running daemon appends to; lines are
//! whole (one `write` each), and a last line still being written is skipped.

use std::io::BufRead as _;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::units::HumanDuration;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only lines at or after this: an RFC 3339 time (`2026-12-03T10:00:00Z`) or a
    /// duration ago (`90s`, `15m`, `2h`).
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only these events (repeatable): `verdict`, `agreement`, `activity-created`,
    /// `activity-failed`, `activity-terminated`, `command`, `egress`, `job`,
    /// `daemon-start`, `daemon-stop`.
    #[arg(long, value_name = "EVENT")]
    event: Vec<String>,
    /// Only lines about this job: a prefix of its activity id (or agreement id).
    #[arg(long, value_name = "ID")]
    job: Option<String>,
    /// At most the last N matching lines.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

const EVENTS: &[&str] = &[
    "daemon-start",
    "daemon-stop",
    "verdict",
    "agreement",
    "activity-created",
    "activity-failed",
    "activity-terminated",
    "command",
    "egress",
    "job",
];

fn since(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let d: HumanDuration = text.parse().map_err(|e: String| {
        anyhow::anyhow!("--since {text}: neither an RFC 3339 time nor a duration ({e})")
    })?;
    Ok(Utc::now() - chrono::Duration::from_std(d.get()).unwrap_or(chrono::Duration::MAX))
}

/// The job a line is about: `activity_id`, the egress proxy's `job`, else `agreement_id`.
fn job_of(line: &Value) -> Option<&str> {
    ["activity_id", "job", "agreement_id"]
        .iter()
        .find_map(|k| line.get(*k).and_then(Value::as_str))
}

fn line_matches(line: &Value, job: &str) -> bool {
    ["activity_id", "job", "agreement_id"]
        .iter()
        .filter_map(|k| line.get(*k).and_then(Value::as_str))
        .any(|v| v.starts_with(job))
}

/// A one-line summary of what a line says.
fn summary(line: &Value) -> String {
    let s = |k: &str| line.get(k).and_then(Value::as_str).unwrap_or("");
    match s("event") {
        "verdict" => {
            let codes: Vec<&str> = line["reasons"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x["code"].as_str()).collect())
                .unwrap_or_default();
            if codes.is_empty() {
                format!("{} from {}", s("verdict"), s("peer"))
            } else {
                format!("{} from {}: {}", s("verdict"), s("peer"), codes.join(", "))
            }
        }
        "agreement" => format!("with {} until {}", s("peer"), s("expires_at")),
        "command" => format!(
            "#{} {} {}{}",
            line["index"],
            s("outcome"),
            s("command"),
            line.get("code")
                .and_then(Value::as_str)
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ),
        "egress" => format!(
            "{} {} {} {}",
            s("decision"),
            s("method"),
            s("destination"),
            s("reason")
        ),
        "activity-failed" => format!("{}: {}", s("code"), s("error")),
        "activity-terminated" => s("why").to_string(),
        "job" => format!("{} ({})", s("phase"), s("backend")),
        "daemon-start" => format!("{} pid {}", s("provider_id"), line["pid"]),
        "daemon-stop" => format!("{} jobs terminated", line["jobs_terminated"]),
        _ => String::new(),
    }
    .trim()
    .to_string()
}

pub fn run(ctx: &Ctx, args: AuditArgs) -> anyhow::Result<Outcome> {
    if let Some(e) = args.event.iter().find(|e| !EVENTS.contains(&e.as_str())) {
        anyhow::bail!(
            "--event {e}: not an audit event; one of {}",
            EVENTS.join(", ")
        );
    }
    let since = args.since.as_deref().map(since).transpose()?;
    let path = ctx.data.audit_path();
    let mut lines: Vec<Value> = Vec::new();
    match std::fs::File::open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("open {}", path.display())),
        Ok(f) => {
            for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("read {}", path.display()))?;
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    // The daemon's last line, half written this instant; or damage.
                    tracing::warn!("{}:{}: not a JSON line; skipped", path.display(), n + 1);
                    continue;
                };
                if let Some(t0) = since {
                    let t = v["time"]
                        .as_str()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
                    if t.is_none_or(|t| t.with_timezone(&Utc) < t0) {
                        continue;
                    }
                }
                if !args.event.is_empty()
                    && !args.event.iter().any(|e| v["event"].as_str() == Some(e))
                {
                    continue;
                }
                if let Some(j) = &args.job {
                    if !line_matches(&v, j) {
                        continue;
                    }
                }
                lines.push(v);
            }
        }
    }
    if let Some(n) = args.limit {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    if ctx.json {
        output::json(&lines)?;
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&["TIME", "EVENT", "JOB", "WHAT"]);
    for v in &lines {
        t.row(vec![
            v["time"].as_str().unwrap_or("").to_string(),
            v["event"].as_str().unwrap_or("").to_string(),
            job_of(v)
                .map(|j| j.chars().take(16).collect())
                .unwrap_or_else(|| "-".into()),
            summary(v),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}
