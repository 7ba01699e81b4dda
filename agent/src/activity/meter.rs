//! Usage metering: what a job's VM used, measured on the host, for its price and the
//! operator's status view.
//!
//! Counted from the moment the guest agent is ready (the activity exists) to teardown, so
//! the VM's boot — the provider's cost, reported apart as `boot_ms` — is not charged:
//! - wall seconds, from a monotonic clock;
//! - CPU seconds of the VMM process (QEMU: `utime + stime` of `/proc/<pid>/stat`, all its
//!   threads), less what it had used by then. The own VMM runs inside the daemon, whose
//!   CPU time is not the job's alone; its jobs report 0 CPU seconds.
//! - egress bytes, both directions, from the job's proxy.
//!
//! The guest cannot influence any of these: they are read from the host's kernel and the
//! host's proxy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use egress::Proxy;

use crate::market::pricing::Metered;

/// One job's meter; cheap to sample, shared between the job's thread and status readers.
pub struct Meter {
    pid: Option<u32>,
    proxy: Arc<Proxy>,
    started: Instant,
    /// The VMM's CPU ticks when the meter started.
    base: Option<u64>,
    /// The largest tick count seen (the process may be gone at the last sample).
    seen: AtomicU64,
    ticks_per_sec: u64,
}

/// `utime + stime` of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

impl Meter {
    /// Starts metering a VM whose VMM process is `pid` (none for the in-process VMM).
    pub fn new(pid: Option<u32>, proxy: Arc<Proxy>) -> Self {
        let base = pid.and_then(cpu_ticks);
        Self {
            pid,
            proxy,
            started: Instant::now(),
            base,
            seen: AtomicU64::new(base.unwrap_or(0)),
            ticks_per_sec: ticks_per_sec(),
        }
    }

    /// The usage so far.
    pub fn sample(&self) -> Metered {
        let now = self.pid.and_then(cpu_ticks).unwrap_or(0);
        let seen = self.seen.fetch_max(now, Ordering::Relaxed).max(now);
        let cpu = match self.base {
            Some(base) => seen.saturating_sub(base) as f64 / self.ticks_per_sec as f64,
            None => 0.0,
        };
        Metered {
            duration_sec: (self.started.elapsed().as_millis() as f64) / 1000.0,
            cpu_sec: cpu,
            egress_bytes: self.proxy.bytes_used(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cpu_time_is_read_from_proc() {
        let me = std::process::id();
        let before = cpu_ticks(me).unwrap();
        // Burn about 0.3 s of CPU.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_ticks(me).unwrap();
        let secs = (after - before) as f64 / ticks_per_sec() as f64;
        assert!(secs > 0.1, "{secs} s of CPU for a 0.3 s busy loop");
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
