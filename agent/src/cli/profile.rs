//! `provider profile show|set`: the hardware profile, how much of this machine is sold
//! (`<data-dir>/profile.json`, see [`crate::market::profile`]); `provider profile runtime
//! list|show`: the runtime profiles presets name (see [`crate::market::runtime`]).

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::market::profile::{HardwareProfile, HostCapacity};
use crate::market::runtime::RuntimeProfile;
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
    /// Runtime profiles: the confinement a preset's jobs run under.
    #[command(subcommand)]
    Runtime(RuntimeCmd),
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCmd {
    /// The built-in profiles and the data dir's (`runtime-profiles/*.toml|json`).
    List,
    /// One profile's settings.
    Show { name: String },
}

fn runtime(ctx: &Ctx, cmd: RuntimeCmd) -> anyhow::Result<Outcome> {
    let list = match cmd {
        RuntimeCmd::List => RuntimeProfile::all(&ctx.data)?,
        RuntimeCmd::Show { name } => vec![RuntimeProfile::load(&ctx.data, &name)?],
    };
    if ctx.json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("a profile serializes");
                v["name"] = p.name.clone().into();
                v
            })
            .collect();
        output::json(&v)?;
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&[
        "NAME",
        "LANDLOCK",
        "SECCOMP",
        "PIDS",
        "CPU QUOTA",
        "MEMORY",
        "DISK",
        "READ-ONLY ROOTFS",
    ]);
    let size = |b: Option<ByteSize>| {
        b.map_or("-".to_string(), |b| {
            format!("{} GiB", b.bytes() as f64 / (1u64 << 30) as f64)
        })
    };
    let text = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
    for p in &list {
        t.row(vec![
            p.name.clone(),
            text(serde_json::to_value(p.landlock)?),
            text(serde_json::to_value(p.seccomp)?),
            p.pids_max.to_string(),
            p.cpu_quota.to_string(),
            size(p.memory),
            size(p.disk),
            if p.read_only_rootfs { "yes" } else { "no" }.into(),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}

fn gib(b: ByteSize) -> f64 {
    // Whole MiB: a profile in GiB with more digits than that is noise.
    ((b.bytes() as f64) / (1u64 << 20) as f64).round() / 1024.0
}

pub fn run(ctx: &Ctx, cmd: ProfileCmd) -> anyhow::Result<Outcome> {
    if let ProfileCmd::Runtime(cmd) = cmd {
        return runtime(ctx, cmd);
    }
    let host = HostCapacity::detect(ctx.data.root())?;
    match cmd {
        ProfileCmd::Runtime(_) => unreachable!("handled above"),
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
