//! `provider status` and `provider jobs list|show`: what the daemon is doing and did, read
//! from the data dir of a running daemon (its `status.json`, `receipts/`, `jobs/`)
//! without stopping it or talking to it.

use std::path::Path;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;
use serde_json::json;

use super::output::{self, short_id, Table};
use super::{Ctx, Outcome};
use crate::daemon::status::Status;
use net::receipt::SignedReceipt;

/// Exit code of `status` when no daemon runs on the data dir (as `systemctl status`).
pub const NOT_RUNNING: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// Running and finished jobs, newest first.
    List,
    /// One job: a unique prefix of its activity id.
    Show { id: String },
}

fn age(since: DateTime<Utc>) -> String {
    let s = (Utc::now() - since).num_seconds().max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..=9999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

pub fn status(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let Some(s) = Status::read(&ctx.data).map_err(anyhow::Error::msg)? else {
        if ctx.json {
            output::json(&json!({"running": false}))?;
        } else {
            println!("no daemon is running on {}", ctx.data.root().display());
        }
        return Ok(Outcome::Code(NOT_RUNNING));
    };
    if ctx.json {
        let mut v = serde_json::to_value(&s)?;
        v["running"] = true.into();
        output::json(&v)?;
        return Ok(Outcome::Done);
    }
    let p = &s.profile;
    let o = &s.offer.properties;
    let price = |k: &str| {
        o.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "provider   {} (pid {}, up {})",
        s.peer_id,
        s.pid,
        age(s.started_at)
    );
    for a in &s.listen {
        println!("listening  {a}");
    }
    println!(
        "offer      {} CPU threads, {} GiB memory, {} GiB storage, {} jobs at once",
        p.cpu_threads, p.mem_gib, p.storage_gib, p.max_jobs
    );
    println!(
        "pricing    preset {}: coeffs {} over {}",
        o.get("golem.com.pricing.preset")
            .and_then(|v| v.as_str())
            .unwrap_or("-"),
        price("golem.com.pricing.model.linear.coeffs"),
        price("golem.com.usage.vector"),
    );
    println!(
        "in use     {} jobs, {} CPU threads, {} GiB memory, {} GiB storage (agreed or running)",
        s.in_use.jobs, s.in_use.cpu_threads, s.in_use.mem_gib, s.in_use.storage_gib
    );
    if let Some(m) = &s.metrics {
        println!("metrics    http://{m}/metrics");
    }
    println!();
    if s.jobs.is_empty() {
        println!("no jobs running");
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&[
        "ACTIVITY",
        "REQUESTOR",
        "AGE",
        "CPUS",
        "MEM",
        "CPU SEC",
        "EGRESS",
        "AMOUNT",
        "STATE",
    ]);
    for j in &s.jobs {
        t.row(vec![
            short_id(&j.activity_id).into(),
            short_peer(&j.requestor_id),
            age(j.started_at),
            j.grant.cpu_threads.to_string(),
            format!("{} MiB", j.grant.mem_mib()),
            format!("{:.1}", j.usage.cpu_sec),
            bytes(j.usage.egress_bytes),
            j.amount.clone(),
            if j.busy { "batch running" } else { "idle" }.into(),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}

/// `12D3KooW…` ids share their first 8 characters: the tail tells them apart.
fn short_peer(id: &str) -> String {
    if id.len() > 14 {
        format!("…{}", &id[id.len() - 12..])
    } else {
        id.to_owned()
    }
}

/// One job as the listing shows it.
#[derive(Debug, Clone, Serialize)]
struct JobRow {
    activity_id: String,
    /// `running`, `ended` (a receipt is stored), or `no-receipt` (the job never started,
    /// or its daemon was killed).
    state: &'static str,
    agreement_id: Option<String>,
    requestor_id: Option<String>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    termination: Option<String>,
    commands: Option<usize>,
    duration_sec: Option<f64>,
    cpu_sec: Option<f64>,
    egress_bytes: Option<u64>,
    amount: Option<String>,
    preset: Option<String>,
}

fn read_receipt(path: &Path) -> anyhow::Result<SignedReceipt> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    SignedReceipt::from_json(&bytes).with_context(|| format!("{}", path.display()))
}

fn collect(ctx: &Ctx) -> anyhow::Result<Vec<JobRow>> {
    let mut rows: Vec<JobRow> = Vec::new();
    let receipts = ctx.data.root().join("receipts");
    if let Ok(dir) = std::fs::read_dir(&receipts) {
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let r = read_receipt(&path)?.receipt;
            let usage = |i: usize| {
                r.charge
                    .as_ref()
                    .and_then(|c| c.usage.get(i))
                    .and_then(|u| u.parse::<f64>().ok())
            };
            rows.push(JobRow {
                state: "ended",
                agreement_id: Some(r.agreement_id.clone()),
                requestor_id: Some(r.requestor_id.clone()),
                started_at: Some(r.started_at),
                ended_at: Some(r.ended_at),
                termination: Some(r.termination.clone()),
                commands: Some(r.commands.len()),
                duration_sec: usage(0).or(Some(r.usage.wall_ms as f64 / 1000.0)),
                cpu_sec: usage(1),
                egress_bytes: Some(r.usage.egress_bytes),
                amount: r.charge.as_ref().map(|c| c.amount.clone()),
                preset: r.charge.as_ref().map(|c| c.preset.clone()),
                activity_id: r.activity_id,
            });
        }
    }
    if let Some(s) = Status::read(&ctx.data).map_err(anyhow::Error::msg)? {
        for j in s.jobs {
            // A stored receipt wins: the status file lags the job's end by up to a second.
            if rows.iter().any(|r| r.activity_id == j.activity_id) {
                continue;
            }
            rows.push(JobRow {
                activity_id: j.activity_id,
                state: "running",
                agreement_id: Some(j.agreement_id),
                requestor_id: Some(j.requestor_id),
                started_at: Some(j.started_at),
                ended_at: None,
                termination: None,
                commands: None,
                duration_sec: Some(j.usage.duration_sec),
                cpu_sec: Some(j.usage.cpu_sec),
                egress_bytes: Some(j.usage.egress_bytes),
                amount: Some(j.amount),
                preset: Some(j.preset),
            });
        }
    }
    // A job dir without a receipt: the VM never came up, or the daemon was killed.
    if let Ok(dir) = std::fs::read_dir(ctx.data.root().join("jobs")) {
        for e in dir.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') || !e.path().is_dir() || rows.iter().any(|r| r.activity_id == id)
            {
                continue;
            }
            let started = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(DateTime::<Utc>::from);
            rows.push(JobRow {
                activity_id: id,
                state: "no-receipt",
                agreement_id: None,
                requestor_id: None,
                started_at: started,
                ended_at: None,
                termination: None,
                commands: None,
                duration_sec: None,
                cpu_sec: None,
                egress_bytes: None,
                amount: None,
                preset: None,
            });
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.started_at));
    Ok(rows)
}

pub fn jobs(ctx: &Ctx, cmd: JobsCmd) -> anyhow::Result<Outcome> {
    let rows = collect(ctx)?;
    match cmd {
        JobsCmd::List => {
            if ctx.json {
                output::json(&rows)?;
                return Ok(Outcome::Done);
            }
            let mut t = Table::new(&[
                "ACTIVITY",
                "STATE",
                "REQUESTOR",
                "STARTED",
                "SECONDS",
                "CPU SEC",
                "AMOUNT",
                "ENDED",
            ]);
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            for r in &rows {
                t.row(vec![
                    short_id(&r.activity_id).into(),
                    r.state.into(),
                    opt(r.requestor_id.as_deref().map(short_peer)),
                    opt(r
                        .started_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())),
                    opt(r.duration_sec.map(|d| format!("{d:.1}"))),
                    opt(r.cpu_sec.map(|d| format!("{d:.1}"))),
                    opt(r.amount.clone()),
                    opt(r.termination.clone()),
                ]);
            }
            t.print();
            Ok(Outcome::Done)
        }
        JobsCmd::Show { id } => {
            let found: Vec<&JobRow> = rows
                .iter()
                .filter(|r| r.activity_id.starts_with(&id))
                .collect();
            let row = match found.as_slice() {
                [one] => *one,
                [] => anyhow::bail!("no job {id} (see `provider jobs list`)"),
                many => anyhow::bail!(
                    "job id prefix {id} is ambiguous: {}",
                    many.iter()
                        .map(|r| short_id(&r.activity_id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let receipt_path = ctx
                .data
                .root()
                .join("receipts")
                .join(format!("{}.json", row.activity_id));
            let receipt = if row.state == "ended" {
                Some(read_receipt(&receipt_path)?)
            } else {
                None
            };
            let dir = ctx.data.root().join("jobs").join(&row.activity_id);
            if ctx.json {
                output::json(&json!({
                    "job": row,
                    "receipt": receipt,
                    "receipt_valid": receipt.as_ref().map(|r| r.verify().is_ok()),
                    "dir": dir,
                }))?;
                return Ok(Outcome::Done);
            }
            let mut t = Table::new(&["FIELD", "VALUE"]);
            let mut add = |k: &str, v: String| t.row(vec![k.to_string(), v]);
            add("activity", row.activity_id.clone());
            add("state", row.state.into());
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            add("agreement", opt(row.agreement_id.clone()));
            add("requestor", opt(row.requestor_id.clone()));
            add("started", opt(row.started_at.map(|t| t.to_rfc3339())));
            add("ended", opt(row.ended_at.map(|t| t.to_rfc3339())));
            add("ended by", opt(row.termination.clone()));
            add("seconds", opt(row.duration_sec.map(|d| format!("{d:.3}"))));
            add("cpu seconds", opt(row.cpu_sec.map(|d| format!("{d:.2}"))));
            add("egress", opt(row.egress_bytes.map(bytes)));
            add("preset", opt(row.preset.clone()));
            add("amount", opt(row.amount.clone()));
            if let Some(r) = &receipt {
                add("commands", r.receipt.commands.len().to_string());
                add("egress decisions", r.receipt.egress.len().to_string());
                add("runtime profile", opt(r.receipt.runtime_profile.clone()));
                add(
                    "receipt",
                    format!(
                        "{} ({})",
                        receipt_path.display(),
                        match r.verify() {
                            Ok(()) => "signature OK".to_string(),
                            Err(e) => format!("INVALID: {e}"),
                        }
                    ),
                );
            }
            add("job dir", dir.display().to_string());
            t.print();
            if let Some(r) = &receipt {
                println!();
                let mut c = Table::new(&["BATCH", "#", "OUTCOME", "EXIT", "COMMAND"]);
                for cmd in &r.receipt.commands {
                    c.row(vec![
                        cmd.batch_id.chars().take(8).collect(),
                        cmd.index.to_string(),
                        serde_json::to_value(cmd.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        cmd.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        cmd.command.clone(),
                    ]);
                }
                c.print();
            }
            Ok(Outcome::Done)
        }
    }
}
