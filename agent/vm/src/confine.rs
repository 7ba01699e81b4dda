//! Host-side confinement of a job's VMM: what it may touch if a guest escapes into it.
//!
//! - **Landlock** (filesystem): read the kernel, the initramfs and the binary itself;
//!   read and write the job directory (and, for the QEMU child, which opens it itself,
//!   `/dev/kvm`); nothing else. Best effort over the kernel's Landlock ABI, and the
//!   [`LandlockReport`] says what was really enforced (fully, partially, or not, and why)
//!   so each job's log can state it. The own VMM applies it per thread: on its VMM
//!   thread, before that thread starts the vCPU threads (which inherit it), with a
//!   ruleset built beforehand by [`FsPolicy::prepare`].
//! - **seccomp** (syscalls, per thread, with `seccompiler`): the vCPU threads may only
//!   make the syscalls their loop needs, with `ioctl` limited to the three KVM requests it
//!   uses; the VMM thread gets its own list (no `ioctl` at all).
//! - **The QEMU child**: Landlock, `no_new_privs` and resource limits applied between
//!   `fork` and `exec` (see [`confine_command`]).
//!
//! Landlock and seccomp cannot be undone in a thread or process, so their tests run in a
//! child process.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use landlock::{
    path_beneath_rules, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, ABI,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The Landlock ABI we ask for: 5 adds `IOCTL_DEV` to the filesystem rights (Linux 6.10).
/// Older kernels enforce the subset they know (reported as partial).
const TARGET_ABI: ABI = ABI::V5;

/// What can go wrong setting confinement up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A path in the policy could not be opened to build a rule.
    #[error("landlock rule for {}: {reason}", path.display())]
    Rule {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The ruleset could not be created or applied.
    #[error("landlock ruleset: {0}")]
    Ruleset(String),
    /// A seccomp filter could not be built.
    #[error("building the {which} seccomp filter: {reason}")]
    BuildFilter {
        /// Which filter.
        which: &'static str,
        /// Why.
        reason: String,
    },
    /// A seccomp filter could not be installed.
    #[error("installing the seccomp filter: {0}")]
    ApplyFilter(String),
}

/// How much of a requested confinement the kernel enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything requested.
    Fully,
    /// A subset (an older Landlock ABI).
    Partially,
    /// Nothing.
    Not,
}

/// What Landlock enforced, for the job log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LandlockReport {
    /// Fully, partially, or not.
    pub enforcement: Enforcement,
    /// The kernel's Landlock ABI (0 = none).
    pub kernel_abi: i32,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
    /// Why it is not (fully) enforced, if it is not.
    pub reason: Option<String>,
}

impl fmt::Display for LandlockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.enforcement {
            Enforcement::Fully => "fully enforced",
            Enforcement::Partially => "partially enforced",
            Enforcement::Not => "not enforced",
        };
        write!(f, "landlock: {what} (kernel ABI {}", self.kernel_abi)?;
        if let Some(reason) = &self.reason {
            write!(f, "; {reason}")?;
        }
        write!(
            f,
            "), no_new_privs: {}",
            if self.no_new_privs { "yes" } else { "no" }
        )
    }
}

/// The kernel's Landlock ABI version: 0 if Landlock is not built in or not enabled.
pub fn kernel_landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a NULL attribute pointer, size 0 and the VERSION flag,
    // landlock_create_ruleset only returns the ABI version (or an error); it reads and
    // writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

/// What Landlock will enforce on this kernel for our target ABI, and why not more.
pub fn expected_landlock() -> (Enforcement, i32, Option<String>) {
    let abi = kernel_landlock_abi();
    let target = TARGET_ABI as i32;
    match abi {
        0 => (
            Enforcement::Not,
            0,
            Some("the kernel has no Landlock (not built in, or not in the lsm= list)".into()),
        ),
        a if a < target => (
            Enforcement::Partially,
            a,
            Some(format!("kernel ABI {a} lacks rights of ABI {target}")),
        ),
        a => (Enforcement::Fully, a, None),
    }
}

/// Which paths a confined process may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsPolicy {
    /// Readable (files, or directories and everything beneath them).
    pub read: Vec<PathBuf>,
    /// Readable and writable (files, or directories and everything beneath them).
    pub write: Vec<PathBuf>,
}

impl FsPolicy {
    /// The VMM side of a job: read the kernel, the initramfs and our own binary; write
    /// the job directory; nothing else.
    ///
    /// No `/dev/kvm`: the own VMM applies this on its VMM thread after it has opened
    /// `/dev/kvm` and created the VM and vCPU fds, and Landlock checks rights when a file
    /// is opened, so fds opened before are unaffected while a confined thread can open no
    /// new KVM device (nor write anything outside the job directory). Kernel and initramfs
    /// are already in guest memory by then too; they stay readable because that is what
    /// the job legitimately reads, as does the binary (what a backtrace would symbolise).
    pub fn for_vmm_job(kernel: &Path, initramfs: Option<&Path>, job_dir: &Path) -> Self {
        let mut read = vec![kernel.to_owned()];
        read.extend(initramfs.map(Path::to_owned));
        read.extend(std::env::current_exe().ok());
        Self {
            read,
            write: vec![job_dir.to_owned()],
        }
    }

    /// Builds this policy's Landlock ruleset now (opening each path, `O_PATH`, to make
    /// its rule, then closing it), to be applied later with
    /// [`PreparedLandlock::restrict_self`] on the thread to confine. Building first lets
    /// that thread confine itself without opening anything, and reports a missing path
    /// to whoever asked for the confinement.
    pub fn prepare(&self) -> Result<PreparedLandlock, ConfineError> {
        Ok(PreparedLandlock(self.ruleset()?))
    }

    /// The QEMU child of a job: as the VMM, plus the QEMU binary, the shared libraries and
    /// firmware it loads after `exec` (`/usr`, `/lib*`, `/etc/ld.so.cache`) and `/dev/null`.
    pub fn for_qemu_job(
        qemu: &Path,
        kernel: &Path,
        initramfs: Option<&Path>,
        job_dir: &Path,
    ) -> Self {
        let mut read = vec![qemu.to_owned(), kernel.to_owned()];
        read.extend(initramfs.map(Path::to_owned));
        for p in ["/usr", "/lib", "/lib64", "/etc/ld.so.cache"] {
            if Path::new(p).exists() {
                read.push(PathBuf::from(p));
            }
        }
        let mut write = vec![job_dir.to_owned(), PathBuf::from("/dev/null")];
        if Path::new("/dev/kvm").exists() {
            write.push(PathBuf::from("/dev/kvm"));
        }
        Self { read, write }
    }

    /// The QEMU child under the `minimal` scope: of `/usr` and `/lib*` only the library
    /// directories and the firmware directories QEMU searches (`<bindir>/../share/qemu`,
    /// `../share/seabios`, `../lib/ipxe/qemu`), so no other program or data file on the
    /// host is readable; the rest as [`Self::for_qemu_job`].
    pub fn minimal_for_qemu_job(
        qemu: &Path,
        kernel: &Path,
        initramfs: Option<&Path>,
        job_dir: &Path,
    ) -> Self {
        let full = Self::for_qemu_job(qemu, kernel, initramfs, job_dir);
        let mut read = vec![qemu.to_owned(), kernel.to_owned()];
        read.extend(initramfs.map(Path::to_owned));
        let mut candidates: Vec<PathBuf> = [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib64",
            "/etc/ld.so.cache",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        if let Some(bindir) = qemu.parent() {
            for rel in ["../share/qemu", "../share/seabios", "../lib/ipxe/qemu"] {
                candidates.push(bindir.join(rel));
            }
        }
        for p in candidates {
            // Canonical, so `..` and merged-/usr symlinks name what is really opened.
            if let Ok(c) = std::fs::canonicalize(&p) {
                if !read.contains(&c) {
                    read.push(c);
                }
            }
        }
        Self {
            read,
            write: full.write,
        }
    }

    /// The QEMU child's policy for `scope`; `None` for no Landlock at all.
    pub fn for_qemu_scope(
        scope: crate::runtime::FsScope,
        qemu: &Path,
        kernel: &Path,
        initramfs: Option<&Path>,
        job_dir: &Path,
    ) -> Option<Self> {
        use crate::runtime::FsScope;
        match scope {
            FsScope::Off => None,
            FsScope::JobDir => Some(Self::for_qemu_job(qemu, kernel, initramfs, job_dir)),
            FsScope::Minimal => Some(Self::minimal_for_qemu_job(qemu, kernel, initramfs, job_dir)),
        }
    }

    fn ruleset(&self) -> Result<RulesetCreated, ConfineError> {
        for p in self.read.iter().chain(&self.write) {
            if let Err(e) = std::fs::symlink_metadata(p) {
                return Err(ConfineError::Rule {
                    path: p.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let rs = |e: landlock::RulesetError| ConfineError::Ruleset(e.to_string());
        Ruleset::default()
            .handle_access(AccessFs::from_all(TARGET_ABI))
            .map_err(rs)?
            .create()
            .map_err(rs)?
            .add_rules(path_beneath_rules(
                &self.read,
                AccessFs::from_read(TARGET_ABI),
            ))
            .map_err(rs)?
            .add_rules(path_beneath_rules(
                &self.write,
                AccessFs::from_all(TARGET_ABI),
            ))
            .map_err(rs)
    }
}

/// Confines the calling thread (and whatever it later spawns or `exec`s) to `policy`.
/// Other threads that already exist are not affected: call it in the process's only
/// thread, in a dedicated VMM process, or (as the own VMM does) at the start of the thread
/// that will start the confined ones.
pub fn landlock_self(policy: &FsPolicy) -> Result<LandlockReport, ConfineError> {
    policy.prepare()?.restrict_self()
}

/// A Landlock ruleset built from an [`FsPolicy`] and not yet applied: it holds the
/// ruleset's fd, which [`restrict_self`](Self::restrict_self) (or dropping it) closes.
#[derive(Debug)]
pub struct PreparedLandlock(RulesetCreated);

impl PreparedLandlock {
    /// Confines the calling thread, and the threads it starts afterwards, to the policy;
    /// the process's other threads are left as they are (the ruleset is applied without
    /// Landlock's all-threads flag). Also sets the thread's `no_new_privs`. Closes the
    /// ruleset fd. Best effort: a kernel without Landlock gives a report saying "not
    /// enforced" and why, not an error.
    pub fn restrict_self(self) -> Result<LandlockReport, ConfineError> {
        let status = self
            .0
            .restrict_self()
            .map_err(|e| ConfineError::Ruleset(e.to_string()))?;
        Ok(report(status))
    }
}

/// What `status` means for the job log.
fn report(status: landlock::RestrictionStatus) -> LandlockReport {
    let (_, kernel_abi, why) = expected_landlock();
    let enforcement = match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Fully,
        RulesetStatus::PartiallyEnforced => Enforcement::Partially,
        RulesetStatus::NotEnforced => Enforcement::Not,
    };
    let reason = match (enforcement, status.landlock) {
        (Enforcement::Fully, _) => None,
        (_, LandlockStatus::NotEnabled) => {
            Some("Landlock is built in but not enabled (lsm=)".into())
        }
        (_, LandlockStatus::NotImplemented) => Some("the kernel has no Landlock".into()),
        _ => why,
    };
    LandlockReport {
        enforcement,
        kernel_abi,
        no_new_privs: status.no_new_privs,
        reason,
    }
}

/// Resource limits for a confined child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    /// Address space (bytes): guest memory plus the emulator's own overhead.
    pub address_space: u64,
    /// Open file descriptors.
    pub open_files: u64,
}

/// Makes `cmd`'s child confined: `no_new_privs`, no core dumps, `limits`, and Landlock
/// with `policy`, all applied between `fork` and `exec`. Returns what Landlock will
/// enforce on this kernel (the child cannot report back, but the same kernel decides).
pub fn confine_command(
    cmd: &mut Command,
    policy: &FsPolicy,
    limits: Rlimits,
) -> Result<LandlockReport, ConfineError> {
    confine_command_with(cmd, Some(policy), limits, Extra::default())
}

/// What a job's VMM child gets beyond [`confine_command`]'s.
#[derive(Debug, Default)]
pub struct Extra {
    /// `cgroup.procs` files the child joins first (it writes `0` to each).
    pub cgroup_procs: Vec<std::os::fd::RawFd>,
    /// A seccomp filter installed just before `exec` (see [`vmm_deny_filter`]).
    pub filter: Option<BpfProgram>,
}

/// [`confine_command`] with Landlock optional (`None`: the profile asks for none; the
/// report says so) and [`Extra`]: the child joins its cgroups, then gets `no_new_privs`,
/// the rlimits, the seccomp filter and Landlock, in that order.
pub fn confine_command_with(
    cmd: &mut Command,
    policy: Option<&FsPolicy>,
    limits: Rlimits,
    extra: Extra,
) -> Result<LandlockReport, ConfineError> {
    use std::os::unix::process::CommandExt;
    // Built in the parent: opening paths and allocating are not safe after `fork`.
    let ruleset = match policy {
        Some(p) => Some(p.ruleset()?),
        None => None,
    };
    let ruleset = std::sync::Mutex::new(ruleset);
    let (mut enforcement, kernel_abi, mut reason) = expected_landlock();
    if policy.is_none() {
        enforcement = Enforcement::Not;
        reason = Some("the runtime profile asks for no Landlock".into());
    }
    let limits_raw = [
        (libc::RLIMIT_AS, limits.address_space),
        (libc::RLIMIT_NOFILE, limits.open_files),
        (libc::RLIMIT_CORE, 0),
    ];
    let Extra {
        cgroup_procs,
        filter,
    } = extra;
    // SAFETY: the closure runs in the child between fork and exec. It only calls
    // async-signal-safe syscalls (write on fds opened in the parent, prctl, setrlimit,
    // seccomp with a program built in the parent, and Landlock's restrict_self, which is
    // prctl + landlock_restrict_self on an fd created in the parent); the Mutex is owned by
    // the closure and never held by another thread at fork time.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &cgroup_procs {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (resource, value) in limits_raw {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(f) = &filter {
                seccompiler::apply_filter(f).map_err(|_| std::io::Error::last_os_error())?;
            }
            let taken = ruleset.lock().ok().and_then(|mut r| r.take());
            if let Some(r) = taken {
                // No allocation after fork: report the syscall's errno as it is.
                r.restrict_self()
                    .map_err(|_| std::io::Error::last_os_error())?;
            }
            Ok(())
        });
    }
    Ok(LandlockReport {
        enforcement,
        kernel_abi,
        no_new_privs: true,
        reason,
    })
}

/// Kernel interfaces an emulator never uses and an escaped guest would want: debugging
/// other processes, loading code into the kernel, BPF, perf, namespaces and mounts, the
/// keyring, userfaultfd, io_uring, clocks and power. The `strict` seccomp level denies
/// them (`EPERM`) to the whole VMM process, under QEMU's own `-sandbox` filter.
pub const VMM_DENIED: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_fanotify_init,
    libc::SYS_mknod,
    libc::SYS_mknodat,
];

/// The `strict` level's filter: [`VMM_DENIED`] fail with `EPERM`, everything else is left
/// to QEMU's own sandbox.
pub fn vmm_deny_filter() -> Result<BpfProgram, ConfineError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = VMM_DENIED.iter().map(|s| (*s, vec![])).collect();
    let err = |e: &dyn fmt::Display| ConfineError::BuildFilter {
        which: "VMM deny",
        reason: e.to_string(),
    };
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// What a seccomp filter does to a syscall it does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// Kill the whole process (a VMM thread doing something it never does is a
    /// compromised VMM).
    KillProcess,
    /// Fail the syscall with `EPERM` (for diagnosis).
    Errno,
}

impl From<OnViolation> for SeccompAction {
    fn from(v: OnViolation) -> Self {
        match v {
            OnViolation::KillProcess => SeccompAction::KillProcess,
            OnViolation::Errno => SeccompAction::Errno(libc::EPERM as u32),
        }
    }
}

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xae << 8) | nr
}
/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_GET_REGS`: `_IOR(KVMIO, 0x81, struct kvm_regs)`.
pub const KVM_GET_REGS: u64 = ioc(
    2,
    0x81,
    std::mem::size_of::<kvm_bindings::kvm_regs>() as u64,
);
/// `KVM_GET_MP_STATE`: `_IOR(KVMIO, 0x98, struct kvm_mp_state)`.
pub const KVM_GET_MP_STATE: u64 = ioc(
    2,
    0x98,
    std::mem::size_of::<kvm_bindings::kvm_mp_state>() as u64,
);

/// Syscalls every VMM thread makes: memory management by the allocator, locks, returning
/// from the kick signal handler, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_close,
    libc::SYS_write,
    libc::SYS_exit,
];

fn build(
    which: &'static str,
    mut rules: BTreeMap<i64, Vec<SeccompRule>>,
    on: OnViolation,
) -> Result<BpfProgram, ConfineError> {
    let err = |e: &dyn fmt::Display| ConfineError::BuildFilter {
        which,
        reason: e.to_string(),
    };
    // `fcntl(fd, F_GETFD)` only: Rust's standard library checks an fd is still open
    // before closing it (debug builds), and nothing else here needs fcntl.
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| err(&e))?;
    rules.insert(libc::SYS_fcntl, vec![getfd]);
    let filter = SeccompFilter::new(rules, on.into(), SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

/// The vCPU thread's filter: the common set, `sendto` (COM2 bytes to the channel) and
/// `ioctl` only for `KVM_RUN`, `KVM_GET_REGS` and `KVM_GET_MP_STATE`.
pub fn vcpu_filter(on: OnViolation) -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|s| (*s, vec![])).collect();
    rules.insert(libc::SYS_sendto, vec![]);
    let ioctl = [KVM_RUN, KVM_GET_REGS, KVM_GET_MP_STATE]
        .iter()
        .map(|req| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *req)
                .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfineError::BuildFilter {
            which: "vCPU",
            reason: e.to_string(),
        })?;
    rules.insert(libc::SYS_ioctl, ioctl);
    build("vCPU", rules, on)
}

/// The VMM thread's filter: the common set plus polling and reading the channel and
/// eventfds, kicking vCPU threads (`tgkill`), shutting the channel down and sleeping
/// between kicks. No `ioctl`, no `open`.
pub fn vmm_filter(on: OnViolation) -> Result<BpfProgram, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|s| (*s, vec![])).collect();
    for s in [
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_read,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_tgkill,
        libc::SYS_getpid,
        libc::SYS_shutdown,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
    ] {
        rules.insert(s, vec![]);
    }
    build("VMM", rules, on)
}

/// Installs `filter` on the calling thread (and sets its `no_new_privs`, which seccomp
/// requires without `CAP_SYS_ADMIN`).
pub fn apply_to_this_thread(filter: &BpfProgram) -> Result<(), ConfineError> {
    seccompiler::apply_filter(filter).map_err(|e| ConfineError::ApplyFilter(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
    }

    #[test]
    fn filters_build_for_both_actions() {
        for on in [OnViolation::KillProcess, OnViolation::Errno] {
            assert!(!vcpu_filter(on).unwrap().is_empty());
            assert!(!vmm_filter(on).unwrap().is_empty());
        }
    }

    #[test]
    fn vmm_policy_names_what_the_vmm_needs_and_nothing_else() {
        let p = FsPolicy::for_vmm_job(
            Path::new("/k/vmlinuz"),
            Some(Path::new("/k/initrd")),
            Path::new("/jobs/1"),
        );
        assert!(p
            .read
            .starts_with(&[PathBuf::from("/k/vmlinuz"), PathBuf::from("/k/initrd")]));
        // Only the job dir: not even /dev/kvm, whose fds the VMM opened before.
        assert_eq!(p.write, vec![PathBuf::from("/jobs/1")]);
    }

    #[test]
    fn report_says_what_and_why() {
        let r = LandlockReport {
            enforcement: Enforcement::Partially,
            kernel_abi: 3,
            no_new_privs: true,
            reason: Some("kernel ABI 3 lacks rights of ABI 5".into()),
        };
        assert_eq!(
            r.to_string(),
            "landlock: partially enforced (kernel ABI 3; kernel ABI 3 lacks rights of ABI 5), no_new_privs: yes"
        );
    }

    #[test]
    fn missing_policy_paths_are_refused_by_name() {
        let p = FsPolicy {
            read: vec![PathBuf::from("/nonexistent/kernel")],
            write: vec![],
        };
        let err = p.ruleset().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kernel"), "{err}");
    }
}
