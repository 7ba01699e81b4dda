//! `provider profile show|set`: the hardware profile, how much of this machine is sold
//! (`<data-dir>/profile.json`, see [`crate::market::profile`]).

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::market::profile::{HardwareProfile, HostCapacity};
use crate::units::ByteSize;

/// Jobs at once of a data dir without a profile (the daemon's `max_jobs` default).
const DEFAULT_MAX_JOBS: usize = 2;

#[derive(Debug, Subcommand)]
pub enum ProfileCmd {
    /// The profile the daemon offers, beside what this host has.
    Show,
    /// Change the profile; unnamed values are kept. Values beyond the host are refused.
    Set {
        /// CPU threads sold (at most this host's).
        #[arg(long, value_name = "N")]
        cpu_threads: Option<u32>,
        /// Memory sold, e.g. `6G`, `3.5G` (at most this host's).
        #[arg(long, value_name = "SIZE")]
        mem: Option<ByteSize>,
        /// Disk sold, e.g. `100G` (at most the data dir's free space).
        #[arg(long, value_name = "SIZE")]
        storage: Option<ByteSize>,
        /// Jobs at once.
        #[arg(long, value_name = "N")]
        max_jobs: Option<usize>,
    },
}

fn gib(b: ByteSize) -> f64 {
    // Whole MiB: a profile in GiB with more digits than that is noise.
    ((b.bytes() as f64) / (1u64 << 20) as f64).round() / 1024.0
}

pub fn run(ctx: &Ctx, cmd: ProfileCmd) -> anyhow::Result<Outcome> {
    let host = HostCapacity::detect(ctx.data.root())?;
    match cmd {
        ProfileCmd::Show => {
            let stored = HardwareProfile::load(&ctx.data)?;
            let source = if stored.is_some() {
                "profile.json"
            } else {
                "default"
            };
            let p = stored.unwrap_or_else(|| HardwareProfile::default_for(&host, DEFAULT_MAX_JOBS));
            show(ctx, &p, &host, source)
        }
        ProfileCmd::Set {
            cpu_threads,
            mem,
            storage,
            max_jobs,
        } => {
            if cpu_threads.is_none() && mem.is_none() && storage.is_none() && max_jobs.is_none() {
                anyhow::bail!("nothing to set: give --cpu-threads, --mem, --storage or --max-jobs");
            }
            let lock = ctx.data.lock()?;
            let mut p = HardwareProfile::load(&ctx.data)?
                .unwrap_or_else(|| HardwareProfile::default_for(&host, DEFAULT_MAX_JOBS));
            if let Some(v) = cpu_threads {
                p.cpu_threads = v;
            }
            if let Some(v) = mem {
                p.mem_gib = gib(v);
            }
            if let Some(v) = storage {
                p.storage_gib = gib(v);
            }
            if let Some(v) = max_jobs {
                p.max_jobs = v;
            }
            p.check_host(&host).context("the profile was not changed")?;
            p.save(&ctx.data, &lock)?;
            drop(lock);
            eprintln!("hardware profile saved; a running daemon offers it after a restart");
            show(ctx, &p, &host, "profile.json")
        }
    }
}

fn show(
    ctx: &Ctx,
    p: &HardwareProfile,
    host: &HostCapacity,
    source: &str,
) -> anyhow::Result<Outcome> {
    if ctx.json {
        output::json(&json!({"profile": p, "host": host, "source": source}))?;
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&["RESOURCE", "OFFERED", "HOST"]);
    t.row(vec![
        "cpu threads".into(),
        p.cpu_threads.to_string(),
        host.cpu_threads.to_string(),
    ]);
    t.row(vec![
        "memory".into(),
        format!("{} GiB", p.mem_gib),
        format!("{:.2} GiB", host.mem_gib),
    ]);
    t.row(vec![
        "storage".into(),
        format!("{} GiB", p.storage_gib),
        format!("{:.2} GiB free", host.storage_gib),
    ]);
    t.row(vec!["max jobs".into(), p.max_jobs.to_string(), "-".into()]);
    t.print();
    println!("(from {source})");
    Ok(Outcome::Done)
}
