//! The hardware profile — how much of this machine the operator sells — and the ledger
//! that keeps the jobs' shares of it within it.
//!
//! The profile (`<data-dir>/profile.json`, `provider profile show|set`) is the whole of
//! what the offer advertises (`golem.inf.cpu.threads`, `golem.inf.mem.gib`,
//! `golem.inf.storage.gib`) and how many jobs may run at once. Each job gets a [`Grant`]:
//! what its demand's constraints ask for (`(golem.inf.mem.gib>=2)` asks for 2 GiB), never
//! less than the daemon's per-job size. The [`Ledger`] holds every agreement's grant, and
//! a grant that would make the sum exceed the profile is refused (`busy`), so the machine
//! is never sold twice. A profile larger than the host is refused when it is set and when
//! the daemon starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::constraints::{Filter, Op, Piece};
use crate::store::{atomic_write, DataDir, StoreError, WriteLock};

/// Offer property: CPU threads sold.
pub const CPU_THREADS: &str = "golem.inf.cpu.threads";
/// Offer property: memory sold, GiB.
pub const MEM_GIB: &str = "golem.inf.mem.gib";
/// Offer property: disk sold, GiB.
pub const STORAGE_GIB: &str = "golem.inf.storage.gib";

/// Slack for comparing GiB values that went through decimal text.
const EPS: f64 = 1e-9;

/// What the operator sells, in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareProfile {
    pub cpu_threads: u32,
    pub mem_gib: f64,
    pub storage_gib: f64,
    /// Jobs running (or agreed and about to run) at once.
    pub max_jobs: usize,
}

/// What this host really has: the ceiling of any profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostCapacity {
    pub cpu_threads: u32,
    pub mem_gib: f64,
    /// Free space on the data dir's file system.
    pub storage_gib: f64,
}

/// Why a profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{field} = {value} is more than this host has ({host}); lower it to at most {host}")]
    BeyondHost {
        field: &'static str,
        value: String,
        host: String,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("cannot measure this host: {0}")]
    Host(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The nearest existing directory at or above `path` (the data dir may not exist yet).
fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return PathBuf::from("/");
        }
    }
    p
}

impl HostCapacity {
    /// CPU threads this process may use, `MemTotal` from `/proc/meminfo`, free space where
    /// `data_dir` is.
    pub fn detect(data_dir: &Path) -> Result<Self, ProfileError> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| ProfileError::Host(format!("read /proc/meminfo: {e}")))?;
        let mem_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| ProfileError::Host("/proc/meminfo has no MemTotal line".into()))?;
        let dir = existing_ancestor(data_dir);
        let free = fs4::available_space(&dir)
            .map_err(|e| ProfileError::Host(format!("free space of {}: {e}", dir.display())))?;
        Ok(Self {
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            mem_gib: mem_kib as f64 / (1024.0 * 1024.0),
            storage_gib: free as f64 / GIB,
        })
    }
}

/// Rounds down to a multiple of `step`.
fn floor_to(v: f64, step: f64) -> f64 {
    (v / step).floor() * step
}

impl HardwareProfile {
    /// What a data dir without `profile.json` sells: every CPU thread, the memory less
    /// 1 GiB for the host (at least 0.5 GiB), 80 % of the free disk (at least 1 GiB), and
    /// `max_jobs` jobs.
    pub fn default_for(host: &HostCapacity, max_jobs: usize) -> Self {
        Self {
            cpu_threads: host.cpu_threads.max(1),
            mem_gib: floor_to((host.mem_gib - 1.0).max(0.5), 0.25),
            storage_gib: floor_to(host.storage_gib * 0.8, 1.0).max(1.0),
            max_jobs: max_jobs.max(1),
        }
    }

    pub fn path(data: &DataDir) -> PathBuf {
        data.root().join("profile.json")
    }

    /// `profile.json`, or `None` when the operator never set one.
    pub fn load(data: &DataDir) -> Result<Option<Self>, ProfileError> {
        let path = Self::path(data);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    action: "read",
                    path,
                    source,
                }
                .into())
            }
        };
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let p: Self = serde_path_to_error::deserialize(de).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            message: format!("at {}: {}", e.path(), e.inner()),
        })?;
        p.check_shape().map_err(|e| StoreError::Invalid {
            path,
            message: e.to_string(),
        })?;
        Ok(Some(p))
    }

    /// Writes `profile.json` atomically (under the data dir's lock).
    pub fn save(&self, data: &DataDir, _lock: &WriteLock) -> Result<(), ProfileError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a profile serializes");
        bytes.push(b'\n');
        atomic_write(&Self::path(data), &bytes)?;
        Ok(())
    }

    /// Values that make no sense on any host.
    pub fn check_shape(&self) -> Result<(), ProfileError> {
        let invalid = |field, message: &str| {
            Err(ProfileError::Invalid {
                field,
                message: message.into(),
            })
        };
        if self.cpu_threads == 0 {
            return invalid("cpu_threads", "must be at least 1");
        }
        if !(self.mem_gib.is_finite() && self.mem_gib > 0.0) {
            return invalid("mem_gib", "must be a positive number of GiB");
        }
        if !(self.storage_gib.is_finite() && self.storage_gib > 0.0) {
            return invalid("storage_gib", "must be a positive number of GiB");
        }
        if self.max_jobs == 0 {
            return invalid("max_jobs", "must be at least 1");
        }
        Ok(())
    }

    /// Refuses a profile that sells more than `host` has.
    pub fn check_host(&self, host: &HostCapacity) -> Result<(), ProfileError> {
        self.check_shape()?;
        if self.cpu_threads > host.cpu_threads {
            return Err(ProfileError::BeyondHost {
                field: "cpu_threads",
                value: self.cpu_threads.to_string(),
                host: format!("{} threads", host.cpu_threads),
            });
        }
        if self.mem_gib > host.mem_gib + EPS {
            return Err(ProfileError::BeyondHost {
                field: "mem_gib",
                value: format!("{} GiB", self.mem_gib),
                host: format!("{:.2} GiB of memory", host.mem_gib),
            });
        }
        if self.storage_gib > host.storage_gib + EPS {
            return Err(ProfileError::BeyondHost {
                field: "storage_gib",
                value: format!("{} GiB", self.storage_gib),
                host: format!("{:.2} GiB free in the data dir", host.storage_gib),
            });
        }
        Ok(())
    }

    /// Whether one job of `grant` could ever run here.
    pub fn holds(&self, grant: &Grant) -> bool {
        grant.cpu_threads <= self.cpu_threads
            && grant.mem_gib <= self.mem_gib + EPS
            && grant.storage_gib <= self.storage_gib + EPS
    }
}

/// One job's share of the profile: its VM's vCPUs, memory and disk.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub cpu_threads: u32,
    pub mem_gib: f64,
    pub storage_gib: f64,
}

impl Grant {
    /// The VM's memory, whole MiB (rounded up: a job gets at least what it asked for).
    pub fn mem_mib(&self) -> u32 {
        (self.mem_gib * 1024.0 - EPS).ceil().max(1.0) as u32
    }

    /// The job's writable layer, whole MiB (rounded up).
    pub fn storage_bytes(&self) -> u64 {
        ((self.storage_gib * 1024.0 - EPS).ceil().max(1.0) as u64) << 20
    }

    /// What a demand's constraints ask for: the largest lower bound (`>=`, `>`, `=`) each
    /// of `golem.inf.cpu.threads`, `golem.inf.mem.gib` and `golem.inf.storage.gib` gets in
    /// the filter's top-level conjunction, never less than `floor` (the per-job size).
    /// Bounds under `|` or `!` are not requirements and are ignored.
    pub fn for_demand(filter: Option<&Filter>, floor: Grant) -> Grant {
        let mut g = floor;
        if let Some(f) = filter {
            visit(f, &mut g);
        }
        g
    }
}

fn visit(f: &Filter, g: &mut Grant) {
    match f {
        Filter::And(fs) => fs.iter().for_each(|f| visit(f, g)),
        Filter::Compare { attr, op, value } => {
            let [Piece::Text(text)] = value.as_slice() else {
                return;
            };
            let Ok(v) = text.trim().parse::<f64>() else {
                return;
            };
            if !v.is_finite() || v < 0.0 {
                return;
            }
            let strict = matches!(op, Op::Gt);
            if !matches!(op, Op::Ge | Op::Gt | Op::Eq) {
                return;
            }
            match attr.as_str() {
                CPU_THREADS => {
                    let t = if strict { v.floor() + 1.0 } else { v.ceil() };
                    g.cpu_threads = g.cpu_threads.max(t.min(u32::MAX as f64) as u32);
                }
                // `>` on a size: one MiB more than the bound.
                MEM_GIB => g.mem_gib = g.mem_gib.max(v + if strict { 1.0 / 1024.0 } else { 0.0 }),
                STORAGE_GIB => {
                    g.storage_gib = g
                        .storage_gib
                        .max(v + if strict { 1.0 / 1024.0 } else { 0.0 })
                }
                _ => {}
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
struct Entry {
    grant: Grant,
    until: DateTime<Utc>,
}

/// What is in use: the sum of the live grants and their count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct InUse {
    pub jobs: usize,
    pub cpu_threads: u32,
    pub mem_gib: f64,
    pub storage_gib: f64,
}

/// The grants of agreements and jobs, against the profile. Every check and reservation
/// happens under one lock, so concurrent demands cannot both take the last share.
#[derive(Debug)]
pub struct Ledger {
    total: HardwareProfile,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Ledger {
    pub fn new(total: HardwareProfile) -> Self {
        Self {
            total,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn total(&self) -> &HardwareProfile {
        &self.total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sum(entries: &HashMap<String, Entry>) -> InUse {
        entries.values().fold(
            InUse {
                jobs: 0,
                cpu_threads: 0,
                mem_gib: 0.0,
                storage_gib: 0.0,
            },
            |u, e| InUse {
                jobs: u.jobs + 1,
                cpu_threads: u.cpu_threads + e.grant.cpu_threads,
                mem_gib: u.mem_gib + e.grant.mem_gib,
                storage_gib: u.storage_gib + e.grant.storage_gib,
            },
        )
    }

    /// Why `grant` does not fit beside what is in use, or `None` when it does.
    fn shortfall(&self, used: &InUse, grant: &Grant) -> Option<String> {
        let t = &self.total;
        if used.jobs >= t.max_jobs {
            return Some(format!("this provider runs {} jobs, its limit", used.jobs));
        }
        let mut short = Vec::new();
        if used.cpu_threads + grant.cpu_threads > t.cpu_threads {
            short.push(format!(
                "{} of {} CPU threads free, {} asked",
                t.cpu_threads - used.cpu_threads.min(t.cpu_threads),
                t.cpu_threads,
                grant.cpu_threads
            ));
        }
        if used.mem_gib + grant.mem_gib > t.mem_gib + EPS {
            short.push(format!(
                "{:.2} of {} GiB memory free, {} asked",
                (t.mem_gib - used.mem_gib).max(0.0),
                t.mem_gib,
                grant.mem_gib
            ));
        }
        if used.storage_gib + grant.storage_gib > t.storage_gib + EPS {
            short.push(format!(
                "{:.2} of {} GiB storage free, {} asked",
                (t.storage_gib - used.storage_gib).max(0.0),
                t.storage_gib,
                grant.storage_gib
            ));
        }
        (!short.is_empty()).then(|| short.join(", "))
    }

    /// Why `grant` would not fit now (`None`: it would), without reserving anything.
    pub fn check(&self, grant: &Grant, now: DateTime<Utc>) -> Option<String> {
        let mut e = self.lock();
        e.retain(|_, x| x.until > now);
        let used = Self::sum(&e);
        self.shortfall(&used, grant)
    }

    /// Reserves `grant` under `key` until `until`, or says why it does not fit.
    pub fn reserve(
        &self,
        key: &str,
        grant: Grant,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let mut e = self.lock();
        e.retain(|_, x| x.until > now);
        if let Some(why) = self.shortfall(&Self::sum(&e), &grant) {
            return Err(why);
        }
        e.insert(key.to_owned(), Entry { grant, until });
        Ok(())
    }

    /// Moves `key`'s reservation to `until`; false when it has lapsed (or never was).
    pub fn extend(&self, key: &str, until: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let mut e = self.lock();
        e.retain(|_, x| x.until > now);
        match e.get_mut(key) {
            Some(x) => {
                x.until = until;
                true
            }
            None => false,
        }
    }

    pub fn release(&self, key: &str) {
        self.lock().remove(key);
    }

    pub fn in_use(&self, now: DateTime<Utc>) -> InUse {
        let mut e = self.lock();
        e.retain(|_, x| x.until > now);
        Self::sum(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> HardwareProfile {
        HardwareProfile {
            cpu_threads: 2,
            mem_gib: 2.0,
            storage_gib: 10.0,
            max_jobs: 4,
        }
    }

    const FLOOR: Grant = Grant {
        cpu_threads: 1,
        mem_gib: 0.5,
        storage_gib: 1.0,
    };

    #[test]
    fn a_grant_is_what_the_demand_asks_and_never_below_the_floor() {
        let g = |c: &str| Grant::for_demand(Some(&Filter::parse(c).unwrap()), FLOOR);
        assert_eq!(g("(golem.runtime.name=vm)"), FLOOR);
        let big = g("(&(golem.inf.mem.gib>=1.5)(golem.inf.cpu.threads>1)(golem.inf.storage.gib=4)(golem.runtime.name=vm))");
        assert_eq!(big.cpu_threads, 2);
        assert_eq!(big.mem_gib, 1.5);
        assert_eq!(big.mem_mib(), 1536);
        assert_eq!(big.storage_gib, 4.0);
        // Below the floor, an upper bound, or an alternative asks for nothing more.
        assert_eq!(g("(golem.inf.mem.gib>=0.1)"), FLOOR);
        assert_eq!(g("(golem.inf.mem.gib<=8)"), FLOOR);
        assert_eq!(g("(|(golem.inf.mem.gib>=8)(golem.runtime.name=vm))"), FLOOR);
        assert_eq!(g("(!(golem.inf.mem.gib>=8))"), FLOOR);
        assert_eq!(Grant::for_demand(None, FLOOR), FLOOR);
    }

    #[test]
    fn the_ledger_never_sells_more_than_the_profile() {
        let l = Ledger::new(profile());
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        let one = Grant {
            cpu_threads: 1,
            mem_gib: 1.0,
            storage_gib: 1.0,
        };
        l.reserve("a", one, later, now).unwrap();
        l.reserve("b", one, later, now).unwrap();
        let e = l.reserve("c", one, later, now).unwrap_err();
        assert!(e.contains("CPU threads") && e.contains("memory"), "{e}");
        l.release("a");
        l.reserve("c", one, later, now).unwrap();
        // A lapsed reservation frees its share and cannot be extended.
        let gone = later + chrono::Duration::seconds(1);
        assert!(!l.extend("b", gone, gone));
        assert_eq!(l.in_use(gone).jobs, 0);
        // Job count is a limit of its own.
        let l = Ledger::new(HardwareProfile {
            max_jobs: 1,
            ..profile()
        });
        l.reserve("a", FLOOR, later, now).unwrap();
        assert!(l
            .reserve("b", FLOOR, later, now)
            .unwrap_err()
            .contains("its limit"));
    }

    #[test]
    fn concurrent_reservations_never_overcommit() {
        let l = std::sync::Arc::new(Ledger::new(profile()));
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        let won: usize = (0..16)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || {
                    l.reserve(&format!("k{i}"), FLOOR, later, now).is_ok() as usize
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(won, 2, "two 1-thread grants fit in 2 threads");
        let u = l.in_use(now);
        assert!(u.cpu_threads <= 2 && u.mem_gib <= 2.0, "{u:?}");
    }

    #[test]
    fn a_profile_beyond_the_host_is_refused_naming_the_field() {
        let host = HostCapacity {
            cpu_threads: 2,
            mem_gib: 3.8,
            storage_gib: 50.0,
        };
        profile().check_host(&host).unwrap();
        let e = HardwareProfile {
            cpu_threads: 64,
            ..profile()
        }
        .check_host(&host)
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("cpu_threads = 64") && e.contains("2 threads"),
            "{e}"
        );
        let e = HardwareProfile {
            mem_gib: 4.0,
            ..profile()
        }
        .check_host(&host)
        .unwrap_err()
        .to_string();
        assert!(e.contains("mem_gib"), "{e}");
        let e = HardwareProfile {
            storage_gib: 51.0,
            ..profile()
        }
        .check_host(&host)
        .unwrap_err()
        .to_string();
        assert!(e.contains("storage_gib"), "{e}");
        let d = HardwareProfile::default_for(&host, 2);
        d.check_host(&host).unwrap();
        assert_eq!((d.cpu_threads, d.mem_gib, d.storage_gib), (2, 2.75, 40.0));
    }
}
