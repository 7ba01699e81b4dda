//! The QEMU backend: `qemu-system-x86_64 -M pc -nodefaults` with the job's kernel and
//! initramfs, `ttyS0` to the job's console log, the channel on a virtio-serial port
//! (`virtserialport name=provider.channel`) whose chardev is one end of a
//! `UnixStream::pair()` handed to QEMU as fd 3, the job's disks on virtio-blk (each found by
//! its serial in the guest), no network device, `-sandbox on` where compiled in.
//!
//! Why virtio-serial: the UART moved one byte per exit (0.27 MiB/s out, 55 KB/s in under
//! TCG); a virtqueue moves pages (about 100 MB/s both ways here, `docs/payload-runtime.md`).
//! Why a socketpair on fd 3 and not a socket path: no path to race for, no connect retry,
//! and the socket is connected before QEMU runs.
//!
//! The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the thread that spawned it
//! even if the provider is killed; [`QemuMachine`]'s drop kills and reaps it otherwise.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Accel, Machine, MachineSpec, VmError};

/// QEMU options beyond the machine spec.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub binary: PathBuf,
    pub accel: Accel,
    /// Pass `-sandbox on,…` (QEMU's own seccomp filter).
    pub sandbox: bool,
}

pub struct QemuMachine {
    child: Child,
    channel: Option<UnixStream>,
    /// The host end of the QMP monitor (warm-start machines only).
    qmp: Option<UnixStream>,
    console: PathBuf,
    exited: Option<String>,
    /// The VMM's cgroup (pids and CPU quota), removed once QEMU is reaped.
    cgroup: Option<crate::cgroup::JobCgroup>,
}

/// The name of the channel's virtio-serial port (`provider.channel=` on the command line).
pub const CHANNEL_PORT: &str = "provider.channel";
/// The fd QEMU's channel chardev is given in the child.
const CHANNEL_FD: i32 = 3;
/// The fd of the QMP monitor's chardev (warm start).
const QMP_FD: i32 = 4;
/// The fd of the snapshot's device state a restoring QEMU reads (`-incoming fd:5`).
const INCOMING_FD: i32 = 5;

/// What a warm-start machine adds to a cold one (see `crate::warm`): a QMP monitor, the
/// `vmgenid` device and, when restoring, the saved machine (RAM and devices).
#[derive(Debug, Default)]
pub struct WarmLaunch {
    /// Restoring: the snapshot's migration stream, read as `-incoming fd:5`.
    pub incoming: Option<File>,
    /// Wait for QMP `migrate-incoming` instead of reading `incoming` at once
    /// (`-incoming defer`: capabilities are set first).
    pub defer_incoming: bool,
    /// Paths QEMU may read beyond the spec's (the snapshot's files).
    pub read: Vec<PathBuf>,
    /// Paths QEMU may write beyond the job dir (file-backed RAM, which QEMU 7.2 opens
    /// read-write even for a private mapping).
    pub write: Vec<PathBuf>,
    /// File-backed guest RAM: `-object memory-backend-file,mem-path=…,share=…`.
    pub ram_file: Option<(PathBuf, bool)>,
}

/// The arguments a warm-start machine adds to [`args`].
pub fn warm_args(warm: &WarmLaunch, mem_mib: u32) -> Vec<String> {
    let mut a: Vec<String> = vec![
        // Tells the guest kernel it was restored (its vmgenid driver reseeds the CRNG);
        // a new id per QEMU start.
        "-device".into(),
        "vmgenid,guid=auto".into(),
        "-chardev".into(),
        format!("socket,id=qmp,fd={QMP_FD}"),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ];
    if let Some((path, share)) = &warm.ram_file {
        a.push("-object".into());
        a.push(format!(
            "memory-backend-file,id=warm-ram,size={mem_mib}M,mem-path={},share={}",
            qemu_escape(&path.display().to_string()),
            if *share { "on" } else { "off" }
        ));
        a.push("-machine".into());
        a.push("memory-backend=warm-ram".into());
    }
    if warm.defer_incoming {
        a.push("-incoming".into());
        a.push("defer".into());
    } else if warm.incoming.is_some() {
        a.push("-incoming".into());
        a.push(format!("fd:{INCOMING_FD}"));
    }
    a
}

/// The incoming migration's fd in a restoring QEMU (for `migrate-incoming fd:N`).
pub const INCOMING: i32 = INCOMING_FD;

/// The full argument list (tests and the docs show it).
pub fn args(spec: &MachineSpec, opts: &QemuOptions) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-M".into(),
        "pc".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-nic".into(),
        "none".into(),
        "-accel".into(),
        match opts.accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg".into(),
        },
        "-m".into(),
        format!("{}M", spec.mem_mib),
        "-smp".into(),
        spec.cpus.to_string(),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initramfs.display().to_string(),
        "-append".into(),
        spec.runtime.guest_cmdline(&spec.cmdline),
        "-chardev".into(),
        format!("file,id=console,path={}", spec.console_log.display()),
        "-serial".into(),
        "chardev:console".into(),
        "-device".into(),
        "virtio-serial-pci,id=vser".into(),
        "-chardev".into(),
        format!("socket,id=channel,fd={CHANNEL_FD}"),
        "-device".into(),
        format!("virtserialport,bus=vser.0,chardev=channel,name={CHANNEL_PORT}"),
    ];
    for (i, d) in spec.disks.iter().enumerate() {
        // `format=raw` always: a probed format would let an image pose as qcow2 with a
        // backing file on the host. `report`: a full host disk gives the guest an I/O
        // error instead of pausing the VM until its deadline.
        let mode = if d.read_only {
            "readonly=on".to_owned()
        } else {
            "werror=report,rerror=report".to_owned()
        };
        a.push("-drive".into());
        a.push(format!(
            "file={},if=none,id=disk{i},format=raw,{mode}",
            qemu_escape(&d.path.display().to_string())
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive=disk{i},serial={}", d.serial));
    }
    if opts.sandbox && spec.runtime.seccomp != crate::runtime::Seccomp::Off {
        a.push("-sandbox".into());
        a.push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into());
    }
    a
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(v: &str) -> String {
    v.replace(',', ",,")
}

impl QemuMachine {
    /// Starts QEMU with the channel already connected (one end of a socketpair as its fd 3).
    pub fn launch(spec: &MachineSpec, opts: &QemuOptions) -> Result<Self, VmError> {
        Self::launch_with(spec, opts, None)
    }

    /// [`QemuMachine::launch`], for a warm-start machine when `warm` is given.
    pub fn launch_with(
        spec: &MachineSpec,
        opts: &QemuOptions,
        warm: Option<WarmLaunch>,
    ) -> Result<Self, VmError> {
        for d in &spec.disks {
            if d.serial.is_empty()
                || d.serial.len() > 20
                || !d
                    .serial
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(VmError::Backend {
                    message: format!("disk serial `{}` must be 1-20 of [A-Za-z0-9_-]", d.serial),
                });
            }
        }
        let stderr_path = spec.job_dir.join("qemu.stderr");
        let stderr = File::create(&stderr_path).map_err(|e| VmError::Io {
            action: "create",
            path: stderr_path.clone(),
            source: e,
        })?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| VmError::Io {
            action: "socketpair for the channel of",
            path: spec.job_dir.clone(),
            source: e,
        })?;
        let mut cmd = Command::new(&opts.binary);
        cmd.args(args(spec, opts));
        if let Some(w) = &warm {
            cmd.args(warm_args(w, spec.mem_mib));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let (extra, cgroup, notes) = enforce_profile(spec, opts)?;
        // Landlock (read the emulator, its libraries, the kernel, the initramfs and the
        // read-only disks; write only the job dir, where the writable layer is), no_new_privs
        // and rlimits, applied between fork and exec.
        let mut policy = crate::confine::FsPolicy::for_qemu_scope(
            spec.runtime.landlock,
            &opts.binary,
            &spec.kernel,
            Some(&spec.initramfs),
            &spec.job_dir,
        );
        if let Some(policy) = policy.as_mut() {
            if let Some(w) = &warm {
                policy.read.extend(w.read.iter().cloned());
                policy.write.extend(w.write.iter().cloned());
            }
            for d in &spec.disks {
                if d.read_only {
                    policy.read.push(d.path.clone());
                } else if !d.path.starts_with(&spec.job_dir) {
                    policy.write.push(d.path.clone());
                }
            }
        }
        let limits = crate::confine::Rlimits {
            // Guest RAM plus the emulator's own mappings (TCG's code buffer alone reserves
            // up to 1 GiB of address space).
            address_space: (u64::from(spec.mem_mib) << 20) + (8 << 30),
            open_files: 1024,
        };
        let report = crate::confine::confine_command_with(&mut cmd, policy.as_ref(), limits, extra)
            .map_err(|e| VmError::Backend {
                message: format!("cannot confine QEMU: {e}"),
            })?;
        let text = format!("{report}\n{notes}");
        tracing::info!(profile = %spec.runtime.profile, "qemu confinement: {}", text.trim_end().replace('\n', "; "));
        let _ = std::fs::write(spec.job_dir.join("confinement.txt"), text);
        // The fds the child gets, by number. Each source is first duplicated above every
        // target, so no dup2 in the child overwrites a source still to be moved.
        let (qmp_ours, qmp_theirs) = match &warm {
            Some(_) => {
                let (a, b) = UnixStream::pair().map_err(|e| VmError::Io {
                    action: "socketpair for the QMP monitor of",
                    path: spec.job_dir.clone(),
                    source: e,
                })?;
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        #[allow(unsafe_code)]
        let high = |fd: BorrowedFd<'_>| -> Result<OwnedFd, VmError> {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                .map(|n| unsafe { OwnedFd::from_raw_fd(n) })
                .map_err(|e| VmError::Backend {
                    message: format!("duplicate a descriptor for QEMU: {e}"),
                })
        };
        let mut moves: Vec<(OwnedFd, i32)> = vec![(high(theirs.as_fd())?, CHANNEL_FD)];
        if let Some(q) = &qmp_theirs {
            moves.push((high(q.as_fd())?, QMP_FD));
        }
        if let Some(f) = warm.as_ref().and_then(|w| w.incoming.as_ref()) {
            moves.push((high(f.as_fd())?, INCOMING_FD));
        }
        let plan: Vec<(i32, i32)> = moves.iter().map(|(f, t)| (f.as_raw_fd(), *t)).collect();
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // getppid and dup2, which are async-signal-safe; it reads `plan`, allocated before
        // the fork, and touches no other memory shared with the parent. The source fds
        // stay open in the parent until after spawn.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(io::Error::other("parent exited"));
                }
                // Sources are all >= 10, targets 3..=5: dup2 onto a distinct number, which
                // clears close-on-exec on the new fd: QEMU inherits exactly these.
                for &(from, to) in &plan {
                    if libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| VmError::Backend {
            message: format!("cannot start {}: {e}", opts.binary.display()),
        })?;
        // Only QEMU holds its end now: when QEMU goes, ours reads EOF.
        drop(theirs);
        drop(moves);
        drop(qmp_theirs);
        Ok(QemuMachine {
            child,
            channel: Some(ours),
            qmp: qmp_ours,
            console: spec.console_log.clone(),
            exited: None,
            cgroup,
        })
    }
}

/// Checks that the job's runtime profile can be enforced here and prepares what enforces
/// it beyond Landlock: the deny filter of `seccomp = strict` and the VMM's cgroup. Also the
/// lines `confinement.txt` gets about them. Fails closed (see [`crate::runtime`]).
fn enforce_profile(
    spec: &MachineSpec,
    opts: &QemuOptions,
) -> Result<
    (
        crate::confine::Extra,
        Option<crate::cgroup::JobCgroup>,
        String,
    ),
    VmError,
> {
    use crate::cgroup::{JobCgroup, Limits};
    use crate::runtime::{FsScope, Seccomp};
    let rt = &spec.runtime;
    let refuse = |what: String| VmError::Unenforceable {
        profile: rt.profile.clone(),
        what,
    };
    if rt.landlock != FsScope::Off {
        let (enforcement, _, why) = crate::confine::expected_landlock();
        if enforcement == crate::confine::Enforcement::Not {
            return Err(refuse(format!(
                "it asks for Landlock ({:?}) and {}; use a profile with landlock = \"off\"",
                rt.landlock,
                why.unwrap_or_else(|| "the kernel enforces none".into())
            )));
        }
    }
    if rt.seccomp != Seccomp::Off && !opts.sandbox {
        return Err(refuse(format!(
            "it asks for seccomp = {:?} and {} was built without -sandbox (seccomp)",
            rt.seccomp,
            opts.binary.display()
        )));
    }
    let mut extra = crate::confine::Extra::default();
    let mut notes = format!(
        "seccomp: {}\n",
        match (rt.seccomp, opts.sandbox) {
            (Seccomp::Off, _) => "off (the runtime profile asks for none)",
            (Seccomp::Default, _) => "qemu -sandbox on (every option denied)",
            (Seccomp::Strict, _) =>
                "qemu -sandbox on (every option denied) + the provider's deny filter",
        }
    );
    if rt.seccomp == Seccomp::Strict {
        extra.filter = Some(
            crate::confine::vmm_deny_filter()
                .map_err(|e| refuse(format!("seccomp = strict: {e}")))?,
        );
    }
    let name = spec
        .job_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| std::process::id().to_string());
    let tasks = crate::runtime::vmm_task_bound(spec.cpus);
    let quota = rt.cpu_quota_us(spec.cpus);
    let mut cgroup = None;
    let mut why_not = Vec::new();
    if let Some(q) = quota {
        for limits in [
            Limits {
                pids_max: Some(tasks),
                cpu_quota_us: Some(q),
            },
            Limits {
                pids_max: None,
                cpu_quota_us: Some(q),
            },
        ] {
            match JobCgroup::create(&name, &limits) {
                Ok(g) => {
                    notes.push_str(&format!(
                        "cgroup: cpu quota {q} µs per {} µs{}\n",
                        crate::runtime::CPU_PERIOD_US,
                        if limits.pids_max.is_some() {
                            format!(", pids.max {tasks}")
                        } else {
                            String::new()
                        }
                    ));
                    cgroup = Some(g);
                    break;
                }
                Err(e) => why_not.push(e.to_string()),
            }
        }
        if cgroup.is_none() && rt.cpu_quota_binds() {
            return Err(refuse(format!(
                "it asks for cpu_quota = {} and no cgroup cpu quota can be set: {}",
                rt.cpu_quota.unwrap_or_default(),
                why_not.join("; ")
            )));
        }
    }
    if cgroup.is_none() {
        match JobCgroup::create(
            &name,
            &Limits {
                pids_max: Some(tasks),
                cpu_quota_us: None,
            },
        ) {
            Ok(g) => {
                notes.push_str(&format!(
                    "cgroup: pids.max {tasks}, no cpu quota{}\n",
                    if quota.is_some() {
                        " (cpu_quota = 1: the vCPU count bounds the guest)"
                    } else {
                        ""
                    }
                ));
                cgroup = Some(g);
            }
            Err(e) => {
                tracing::warn!(profile = %rt.profile, "the VMM runs without a cgroup: {e}");
                notes.push_str(&format!("cgroup: none ({e})\n"));
            }
        }
    }
    if let Some(g) = &cgroup {
        extra.cgroup_procs = g.procs_fds();
    }
    if let Some(n) = rt.pids_max {
        notes.push_str(&format!("guest: pids.max {n} for the payload\n"));
    }
    if rt.read_only_rootfs {
        notes.push_str("guest: read-only root file system\n");
    }
    Ok((extra, cgroup, notes))
}

impl QemuMachine {
    /// The host end of the QMP monitor, once (warm-start machines only).
    pub fn take_qmp(&mut self) -> Option<UnixStream> {
        self.qmp.take()
    }

    /// Gives the channel back after the warm start's identity line was written on it.
    pub fn put_channel(&mut self, s: UnixStream) {
        self.channel = Some(s);
    }
}

impl Machine for QemuMachine {
    fn backend(&self) -> &'static str {
        "qemu"
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    fn console_log(&self) -> &Path {
        &self.console
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<String>> {
        if let Some(e) = &self.exited {
            return Ok(Some(e.clone()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if let Some(g) = self.cgroup.take() {
                    g.remove();
                }
                let s = status.to_string();
                self.exited = Some(s.clone());
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) -> io::Result<()> {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let status = self.child.wait()?;
            self.exited = Some(status.to_string());
        }
        if let Some(g) = self.cgroup.take() {
            g.remove();
        }
        Ok(())
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
