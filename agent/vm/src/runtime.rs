//! What a job's runtime profile asks of its machine, in the terms the backends enforce it
//! in (the operator's profile files are the app's `market::runtime`; this is their
//! meaning here):
//!
//! | field | where it takes effect |
//! |---|---|
//! | `landlock` | the VMM process's Landlock ruleset ([`FsScope`]) |
//! | `seccomp` | QEMU's `-sandbox` and, for `strict`, a deny filter installed before `exec` ([`Seccomp`]) |
//! | `cpu_quota` | the VMM process's cgroup `cpu` quota (`cpu.max` / `cpu.cfs_quota_us`) |
//! | `pids_max` | the guest kernel's `pids` cgroup around every payload process (`provider.pids=`) |
//! | `read_only_rootfs` | the payload's `/` mounted read-only in the guest (`provider.ro=1`) |
//!
//! Every field fails closed: a profile that asks for something the host cannot do
//! (Landlock on a kernel without it, a sandbox from a QEMU built without seccomp, a CPU
//! quota without a cgroup `cpu` controller, a guest pids limit on a guest kernel without
//! the `pids` controller) stops the job before it runs ([`crate::VmError::Unenforceable`]).
//! The VMM's own process also gets a fixed task bound ([`vmm_task_bound`]) in its cgroup
//! where a `pids` controller is available; that one is hardening of the host, not the
//! profile's, and is logged when it cannot be applied.
#![forbid(unsafe_code)]

/// How far Landlock confines the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsScope {
    /// No Landlock ruleset.
    Off,
    /// Read the emulator, `/usr`, `/lib*`, the kernel and the image; write the job dir.
    JobDir,
    /// As `JobDir`, but of `/usr` and `/lib*` only the library directories and the
    /// firmware the emulator loads: no other program, no `/usr/share` beyond firmware.
    Minimal,
}

/// Which system calls the VMM may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seccomp {
    /// No filter (a QEMU built without seccomp).
    Off,
    /// QEMU's `-sandbox on` with every option it has (obsolete, elevateprivileges, spawn,
    /// resourcecontrol denied); the own VMM's per-thread allow lists.
    Default,
    /// `Default`, plus a deny filter on the VMM process, installed before `exec`, for the
    /// kernel interfaces an emulator never needs ([`crate::confine::vmm_deny_filter`]).
    Strict,
}

/// A runtime profile as the machine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeLimits {
    /// The profile's name, for errors and logs.
    pub profile: String,
    pub landlock: FsScope,
    pub seccomp: Seccomp,
    /// Tasks (processes and threads) the payload may have in the guest at once.
    pub pids_max: Option<u32>,
    /// Share of each vCPU, `(0, 1]`: the VMM process gets `cpu_quota × cpus` CPUs.
    pub cpu_quota: Option<f64>,
    /// The payload's `/` is read-only; only the image's volumes and working dir, `/tmp`
    /// and `/dev/shm` are writable.
    pub read_only_rootfs: bool,
}

impl Default for RuntimeLimits {
    /// What a machine gets without a profile (`provider vm run`, tests): Landlock on the
    /// job dir, the default sandbox, no quota, no guest pids limit, a writable root.
    fn default() -> Self {
        Self {
            profile: "(none)".into(),
            landlock: FsScope::JobDir,
            seccomp: Seccomp::Default,
            pids_max: None,
            cpu_quota: None,
            read_only_rootfs: false,
        }
    }
}

/// The period of the CPU quota (the kernel's default CFS period).
pub const CPU_PERIOD_US: u64 = 100_000;

impl RuntimeLimits {
    /// The CPU quota per period (µs) for a machine of `cpus` vCPUs, when one is set.
    pub fn cpu_quota_us(&self, cpus: u32) -> Option<u64> {
        self.cpu_quota.map(|q| {
            let us = (q * f64::from(cpus.max(1)) * CPU_PERIOD_US as f64).round() as u64;
            // The kernel's floor for a quota is 1 ms.
            us.max(1_000)
        })
    }

    /// Whether the quota limits the VM below its vCPU count (`cpu_quota` < 1): only then
    /// is a missing `cpu` controller a reason to refuse the job, since at 1 the vCPU count
    /// already bounds what the guest can use.
    pub fn cpu_quota_binds(&self) -> bool {
        self.cpu_quota.is_some_and(|q| q < 1.0)
    }

    /// The guest kernel's command line with this profile's guest parameters appended.
    pub fn guest_cmdline(&self, base: &str) -> String {
        let mut line = base.to_owned();
        if self.read_only_rootfs {
            line.push_str(" provider.ro=1");
        }
        if let Some(n) = self.pids_max {
            line.push_str(&format!(" provider.pids={n}"));
        }
        line
    }
}

/// The task bound of a VMM process's cgroup: QEMU's main loop, one thread per vCPU, its
/// RCU and signal threads and its block I/O worker pool (at most 64 workers), with room
/// to spare. A VMM past it is not emulating a machine any more.
pub fn vmm_task_bound(cpus: u32) -> u64 {
    96 + 2 * u64::from(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quota_scales_with_the_vcpus_and_only_binds_below_one() {
        let mut l = RuntimeLimits {
            cpu_quota: Some(0.5),
            ..RuntimeLimits::default()
        };
        assert_eq!(l.cpu_quota_us(1), Some(50_000));
        assert_eq!(l.cpu_quota_us(4), Some(200_000));
        assert!(l.cpu_quota_binds());
        l.cpu_quota = Some(0.000_001);
        assert_eq!(l.cpu_quota_us(1), Some(1_000));
        l.cpu_quota = Some(1.0);
        assert!(!l.cpu_quota_binds());
        l.cpu_quota = None;
        assert_eq!(l.cpu_quota_us(2), None);
    }

    #[test]
    fn guest_parameters_follow_the_profile() {
        let mut l = RuntimeLimits::default();
        assert_eq!(l.guest_cmdline("console=ttyS0"), "console=ttyS0");
        l.read_only_rootfs = true;
        l.pids_max = Some(64);
        assert_eq!(
            l.guest_cmdline("console=ttyS0"),
            "console=ttyS0 provider.ro=1 provider.pids=64"
        );
    }
}
