//! Payloads in a VM: rootfs images ([`image`]: the tarball reader and its guards), the
//! per-job initramfs ([`initramfs`]), the backends that run a machine ([`qemu`] and the
//! project's own VMM, [`kvm`]), the confinement they run under ([`confine`]: Landlock,
//! seccomp, rlimits), host capability detection ([`host`]), and [`Vm`]: the host side of
//! the channel to the guest agent (run commands, stream output, transfer files, power off).
//!
//! The seam between a backend and the rest (see `docs/vm.md`): a backend turns a
//! [`MachineSpec`] into a running [`Machine`], which writes the guest console (`ttyS0`) to
//! `spec.console_log` and hands over the host end of the guest's `ttyS1` as a connected
//! [`UnixStream`]. Everything above (the channel, [`Vm`]) works on that stream alone.
//!
//! `unsafe` is denied crate-wide and allowed only in the own VMM (`kvm`), the confinement
//! glue (`confine`) and the QEMU child's `pre_exec` hook, where each block carries a
//! `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod confine;
pub mod host;
pub mod image;
pub mod initramfs;
pub mod kvm;
pub mod kvm_backend;
pub mod qemu;
pub mod qmp;
pub mod rootfs;
pub mod runtime;
pub mod upper;
pub mod warm;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use channel::{ChannelError, ExitStatus, GuestMsg, HostMsg, Mux, Side, Stream};
use serde::Serialize;

pub use host::HostInfo;

/// Which VMM runs a job's machine, as the operator asks for it (`--vmm`, the daemon's
/// `vmm`); [`Backend::select`] turns it into the [`Backend`] this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vmm {
    /// QEMU, with KVM where KVM boots Linux, else TCG.
    Auto,
    Qemu,
    /// The project's own VMM; refused at once where KVM is PVM.
    Kvm,
}

impl Vmm {
    pub fn as_str(self) -> &'static str {
        match self {
            Vmm::Auto => "auto",
            Vmm::Qemu => "qemu",
            Vmm::Kvm => "kvm",
        }
    }
}

impl std::fmt::Display for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Vmm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Vmm::Auto),
            "qemu" => Ok(Vmm::Qemu),
            "kvm" => Ok(Vmm::Kvm),
            other => Err(format!("`{other}` is not one of auto, qemu, kvm")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Vmm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{message}")]
    Backend { message: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("the VM did not come up: {message}{console}")]
    Boot {
        message: String,
        console: String,
        /// The guest agent's own reason, when it stopped the boot (see
        /// [`guest_setup_failure`]).
        setup: Option<String>,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the guest answered request {id} with {got}")]
    Unexpected { id: u64, got: String },
    #[error("{0}")]
    Guest(String),
    #[error("the guest did not answer within {0:?} of the command's deadline; the VM was killed")]
    Unresponsive(Duration),
    /// The job's runtime profile asks for a limit this host cannot apply.
    #[error("the runtime profile `{profile}` cannot be enforced on this host: {what}")]
    Unenforceable { profile: String, what: String },
}

/// What a backend needs to start a machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub mem_mib: u32,
    pub cpus: u32,
    /// The job's directory: sockets and backend files go here.
    pub job_dir: PathBuf,
    /// Where the guest console (`ttyS0`) is written.
    pub console_log: PathBuf,
    /// Block devices, in this order (the guest finds each by its serial).
    pub disks: Vec<DiskSpec>,
    /// The job's runtime profile (confinement, quota, guest limits).
    pub runtime: runtime::RuntimeLimits,
}

/// One virtio-blk disk of a machine.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// What the guest reads in `/sys/block/vd*/serial` (1–20 of `[A-Za-z0-9_-]`).
    pub serial: String,
    pub read_only: bool,
}

/// The kernel command line every backend passes: console on `ttyS0`, the agent as init,
/// power off (never reboot) on panic, quiet boot (serial output is slow under emulation).
pub const CMDLINE: &str = "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3";

/// A running machine, whatever runs it.
pub trait Machine: Send {
    /// `qemu`, `kvm`…
    fn backend(&self) -> &'static str;
    /// The VMM's process id, when it is a separate process.
    fn pid(&self) -> Option<u32>;
    fn console_log(&self) -> &Path;
    /// The host end of the guest's `ttyS1`, once.
    fn take_channel(&mut self) -> Option<UnixStream>;
    /// Waits up to `timeout` for the machine to stop; its exit description if it did.
    fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<String>>;
    /// Stops the machine now and releases everything it holds.
    fn kill(&mut self) -> io::Result<()>;
}

/// The backend to start and its options.
#[derive(Debug, Clone)]
pub enum Backend {
    Qemu(qemu::QemuOptions),
    /// The project's own VMM on `/dev/kvm` (see `docs/kvm.md`).
    Kvm,
}

impl Backend {
    /// The backend for the operator's `vmm` on this host, with the reason when `auto`
    /// chose: the one place a VMM is picked (`provider vm run` and the daemon alike).
    pub fn select(vmm: Vmm, info: &HostInfo) -> Result<(Backend, String), VmError> {
        let refused = |message: String| VmError::Backend { message };
        if vmm == Vmm::Kvm {
            if !info.kvm.accessible {
                return Err(refused(
                    "--vmm kvm: /dev/kvm is missing or not accessible; use --vmm qemu".into(),
                ));
            }
            // A stock kernel hangs under PVM instead of failing: refuse before any work.
            kvm::check_bootable(&kvm::KernelImage::BzImage(PathBuf::new()), info.kvm.pvm)
                .map_err(|e| refused(e.to_string()))?;
            return Ok((Backend::Kvm, "--vmm kvm: the project's own VMM".into()));
        }
        let Some(qemu) = &info.qemu else {
            return Err(refused(format!(
                "no usable QEMU ({} -version failed); install qemu-system-x86 or set PROVIDER_QEMU",
                host::qemu_binary().display()
            )));
        };
        let choice = host::choose(&info.kvm, Some(qemu))
            .ok_or_else(|| refused("no backend can run a Linux guest on this host".into()))?;
        Ok((
            Backend::Qemu(qemu::QemuOptions {
                binary: qemu.path.clone(),
                accel: choice.accel,
                sandbox: qemu.sandbox,
            }),
            format!("--vmm {vmm}: {}", choice.reason),
        ))
    }

    pub fn launch(&self, spec: &MachineSpec) -> Result<Box<dyn Machine>, VmError> {
        match self {
            Backend::Qemu(opts) => Ok(Box::new(qemu::QemuMachine::launch(spec, opts)?)),
            Backend::Kvm if !spec.disks.is_empty() => Err(VmError::Backend {
                message: "the own VMM has no virtio-blk device yet: disk images run under QEMU (--vmm qemu)".into(),
            }),
            Backend::Kvm => Ok(Box::new(kvm_backend::KvmMachine::launch(spec)?)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Backend::Qemu(o) => format!(
                "qemu ({}, accel {})",
                o.binary.display(),
                match o.accel {
                    Accel::Kvm => "kvm",
                    Accel::Tcg => "tcg",
                }
            ),
            Backend::Kvm => "kvm (the project's own VMM)".into(),
        }
    }
}

/// `explicit`, else `$PROVIDER_KERNEL`, else `vmlinuz` in the kernel cache
/// (`$PROVIDER_KERNEL_CACHE`, `$XDG_CACHE_HOME/provider/kernel`, `~/.cache/provider/kernel`:
/// where `scripts/fetch-guest-kernel.sh` puts it).
pub fn find_kernel(explicit: Option<&Path>) -> Result<PathBuf, VmError> {
    let candidates: Vec<PathBuf> = if let Some(p) = explicit {
        vec![p.to_owned()]
    } else if let Some(p) = env_path("PROVIDER_KERNEL") {
        vec![p]
    } else {
        kernel_cache()
            .into_iter()
            .map(|d| d.join("vmlinuz"))
            .collect()
    };
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| VmError::NotFound {
            message: format!(
                "no guest kernel at {}; run scripts/fetch-guest-kernel.sh or pass --kernel PATH",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        })
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn kernel_cache() -> Option<PathBuf> {
    env_path("PROVIDER_KERNEL_CACHE")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|c| c.join("provider/kernel")))
        .or_else(|| env_path("HOME").map(|h| h.join(".cache/provider/kernel")))
}

/// The kernel modules the disk path's guest loads (`virtio_pci`, `virtio_blk`,
/// `virtio_console`, `squashfs`, `overlay` and what they need): `$PROVIDER_MODULES`, else
/// `modules/` beside the kernel (where `scripts/fetch-guest-kernel.sh` puts them), when it
/// has an `order` file. `PROVIDER_MODULES=none`: a kernel with those drivers built in.
pub fn find_modules(kernel: &Path) -> Result<Option<PathBuf>, VmError> {
    let candidate = match env_path("PROVIDER_MODULES") {
        Some(p) if p.as_os_str() == "none" => return Ok(None),
        Some(p) => p,
        None => kernel
            .parent()
            .map(|d| d.join("modules"))
            .unwrap_or_else(|| PathBuf::from("modules")),
    };
    if candidate.join("order").is_file() {
        return Ok(Some(candidate));
    }
    Err(VmError::NotFound {
        message: format!(
            "no guest kernel modules at {} (an `order` file and the .ko files it names); run scripts/fetch-guest-kernel.sh, set PROVIDER_MODULES=DIR, or PROVIDER_MODULES=none for a kernel with virtio, squashfs and overlay built in",
            candidate.display()
        ),
    })
}

/// The disk serials and the channel port the guest agent is told about.
pub const ROOT_SERIAL: &str = "root";
pub const UPPER_SERIAL: &str = "upper";

/// What a disk-path machine is built from, besides its job dir.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    /// See [`find_modules`].
    pub modules: Option<PathBuf>,
    /// The static `provider-guest`.
    pub agent: PathBuf,
}

/// Prepares a job dir for the disk path and returns the machine to launch: the agent's
/// initramfs (`initramfs.cpio`), a fresh writable layer (`upper.img`, `upper_bytes`, with
/// the image's volumes and working dir made on it), the image read-only as the root disk,
/// the channel on virtio-serial. For QEMU; the own VMM has no virtio-blk yet.
pub fn disk_machine(
    files: &GuestFiles,
    image: &rootfs::DiskImage,
    upper_bytes: u64,
    mem_mib: u32,
    cpus: u32,
    job_dir: &Path,
) -> Result<MachineSpec, VmError> {
    let initramfs = job_dir.join("initramfs.cpio");
    initramfs::build_agent(&initramfs, &files.agent, files.modules.as_deref()).map_err(|e| {
        VmError::Backend {
            message: format!("build the guest initramfs: {e}"),
        }
    })?;
    let disks = match job_disks(image, upper_bytes, job_dir) {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&initramfs);
            return Err(e);
        }
    };
    Ok(MachineSpec {
        kernel: files.kernel.clone(),
        initramfs,
        cmdline: disk_cmdline(false),
        mem_mib,
        cpus,
        job_dir: job_dir.to_owned(),
        console_log: job_dir.join("console.log"),
        disks,
        runtime: runtime::RuntimeLimits::default(),
    })
}

/// The kernel command line of the disk path; `warm`: a warm-start snapshot's guest, which
/// parks for the snapshot and gets its disks hot-plugged (see [`warm`]).
pub fn disk_cmdline(warm: bool) -> String {
    format!(
        "{CMDLINE} provider.root={ROOT_SERIAL} provider.upper={UPPER_SERIAL} provider.channel={}{}",
        qemu::CHANNEL_PORT,
        if warm { " provider.warm=1" } else { "" }
    )
}

/// A job's disks on the disk path: the image read-only as the root disk and a fresh
/// writable layer (`upper.img` in the job dir, `upper_bytes`, with the image's volumes and
/// working dir made on it).
pub fn job_disks(
    image: &rootfs::DiskImage,
    upper_bytes: u64,
    job_dir: &Path,
) -> Result<Vec<DiskSpec>, VmError> {
    let upper = job_dir.join("upper.img");
    upper::create(&upper, upper_bytes, &image.config.dirs())?;
    Ok(vec![
        DiskSpec {
            path: image.path.clone(),
            serial: ROOT_SERIAL.into(),
            read_only: true,
        },
        DiskSpec {
            path: upper,
            serial: UPPER_SERIAL.into(),
            read_only: false,
        },
    ])
}

/// The agent's own explanation when it stopped the boot (`provider-guest: setup failed:
/// …` on the console), e.g. an image that does not mount.
pub fn guest_setup_failure(console_log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(console_log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.split_once("provider-guest: setup failed: "))
        .map(|(_, why)| why.trim().to_owned())
}

/// Where the static guest agent is built (relative to the cargo target dir).
pub const GUEST_BUILD_PATH: &str = "guest/x86_64-unknown-linux-gnu/release/provider-guest";

/// `explicit`, else `$PROVIDER_GUEST`, else `provider-guest` next to the running binary,
/// else the cargo build location beside it (`<target>/guest/x86_64-unknown-linux-gnu/
/// release/provider-guest` when the binary is `<target>/{debug,release}/provider`).
pub fn find_guest_agent(explicit: Option<&Path>) -> Result<PathBuf, VmError> {
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_owned());
    } else if let Some(p) = env_path("PROVIDER_GUEST") {
        candidates.push(p);
    } else if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("provider-guest"));
            // target/debug/deps/x (tests) or target/debug/provider
            for up in [dir.parent(), dir.parent().and_then(Path::parent)]
                .into_iter()
                .flatten()
            {
                candidates.push(up.join(GUEST_BUILD_PATH));
            }
        }
    }
    let mut dynamic = Vec::new();
    for c in &candidates {
        if c.is_file() {
            if is_static_elf(c) {
                return Ok(c.clone());
            }
            dynamic.push(c.display().to_string());
        }
    }
    let note = if dynamic.is_empty() {
        String::new()
    } else {
        format!(" ({} is not a static executable)", dynamic.join(", "))
    };
    Err(VmError::NotFound {
            message: format!(
                "no static guest agent (provider-guest) at {}{note}; build it with RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p guest --target x86_64-unknown-linux-gnu --target-dir target/guest, or set PROVIDER_GUEST",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        })
}

/// A static ELF executable: 64-bit ELF without a `PT_INTERP` program header (the guest has
/// no dynamic loader; a dynamic `provider-guest` would panic the kernel as init).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        match b.get(o..o + 4) {
            Some(t) => u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3, // PT_INTERP
            None => false,
        }
    })
}

/// One command for the guest.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub timeout: Option<Duration>,
}

impl RunSpec {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: "/".into(),
            timeout: None,
        }
    }
}

/// Handles streams the guest opens (connections to its proxy listener). Until an egress
/// proxy is attached to the job, [`refuse_streams`] resets them with a reason.
pub type StreamHandler = Arc<dyn Fn(Stream, String) + Send + Sync>;

/// The default [`StreamHandler`]: no egress for this job.
pub fn refuse_streams() -> StreamHandler {
    Arc::new(|mut s: Stream, purpose: String| {
        let _ = s.reset(&format!(
            "no egress proxy is attached to this job (stream purpose `{purpose}`)"
        ));
    })
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::Sender<GuestMsg>>>>;

/// A booted VM with its guest agent ready.
pub struct Vm {
    machine: Mutex<Box<dyn Machine>>,
    mux: Mux,
    pending: Pending,
    next_id: AtomicU64,
    /// From the guest's `Ready`.
    pub agent: String,
    pub kernel: String,
    /// From the start of [`Vm::boot`] to the guest's `Ready`.
    pub boot_time: Duration,
}

impl Vm {
    /// Waits for the guest agent on `machine`'s channel: the handshake and `Ready` within
    /// `timeout`. On failure the machine is killed and the console's tail is in the error.
    pub fn boot(
        mut machine: Box<dyn Machine>,
        timeout: Duration,
        handler: StreamHandler,
    ) -> Result<Vm, VmError> {
        let start = Instant::now();
        let fail = |machine: &mut Box<dyn Machine>, message: String| {
            let _ = machine.kill();
            let setup = guest_setup_failure(machine.console_log());
            VmError::Boot {
                message: match &setup {
                    Some(why) => format!("the guest agent stopped the boot: {why}"),
                    None => message,
                },
                console: console_tail(machine.console_log()),
                setup,
            }
        };
        let Some(stream) = machine.take_channel() else {
            return Err(fail(&mut machine, "the backend gave no channel".into()));
        };
        let setup = (|| -> io::Result<(UnixStream, UnixStream)> {
            stream.set_read_timeout(Some(timeout))?;
            Ok((stream.try_clone()?, stream))
        })();
        let (reader, writer) = match setup {
            Ok(p) => p,
            Err(e) => return Err(fail(&mut machine, format!("channel socket: {e}"))),
        };
        let read_half = reader.try_clone();
        let reader = io::BufReader::with_capacity(64 * 1024, reader);
        let mux = match Mux::handshake(Side::Host, Box::new(reader), Box::new(writer)) {
            Ok(m) => m,
            Err(e) => {
                let why = match machine.wait_timeout(Duration::ZERO) {
                    Ok(Some(status)) => {
                        format!("the VM stopped ({status}) before the guest agent spoke: {e}")
                    }
                    _ => format!("no guest agent handshake within {timeout:?}: {e}"),
                };
                return Err(fail(&mut machine, why));
            }
        };
        let remaining = timeout.saturating_sub(start.elapsed());
        let ready = mux.recv_msg::<GuestMsg>(Some(remaining.max(Duration::from_millis(1))));
        // From here reads block as long as the VM lives.
        if let Ok(r) = read_half {
            let _ = r.set_read_timeout(None);
        }
        let (agent, kernel) = match ready {
            Ok(GuestMsg::Ready { agent, kernel }) => (agent, kernel),
            Ok(other) => return Err(fail(&mut machine, format!("expected ready, got {other:?}"))),
            Err(e) => return Err(fail(&mut machine, format!("waiting for ready: {e}"))),
        };
        let boot_time = start.elapsed();
        let pending: Pending = Arc::default();
        {
            let mux = mux.clone();
            let pending = pending.clone();
            std::thread::Builder::new()
                .name("vm-control".into())
                .spawn(move || dispatch(mux, pending))
                .map_err(|e| VmError::Backend {
                    message: format!("spawn a thread: {e}"),
                })?;
        }
        {
            let mux = mux.clone();
            std::thread::Builder::new()
                .name("vm-streams".into())
                .spawn(move || {
                    while let Ok((s, purpose)) = mux.accept(None) {
                        handler(s, purpose);
                    }
                })
                .map_err(|e| VmError::Backend {
                    message: format!("spawn a thread: {e}"),
                })?;
        }
        tracing::info!(%agent, %kernel, ?boot_time, "guest agent ready");
        Ok(Vm {
            machine: Mutex::new(machine),
            mux,
            pending,
            next_id: AtomicU64::new(1),
            agent,
            kernel,
            boot_time,
        })
    }

    fn machine(&self) -> std::sync::MutexGuard<'_, Box<dyn Machine>> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VMM's process id (QEMU's), when it is a separate process.
    pub fn pid(&self) -> Option<u32> {
        self.machine().pid()
    }

    pub fn console_log(&self) -> PathBuf {
        self.machine().console_log().to_owned()
    }

    pub fn backend(&self) -> &'static str {
        self.machine().backend()
    }

    fn request(
        &self,
        build: impl FnOnce(u64) -> HostMsg,
    ) -> Result<(u64, mpsc::Receiver<GuestMsg>), VmError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        self.mux.send_msg(&build(id))?;
        Ok((id, rx))
    }

    fn gone(&self) -> VmError {
        VmError::Channel(ChannelError::Closed(
            self.mux
                .closed()
                .unwrap_or_else(|| "the VM went away".into()),
        ))
    }

    /// Runs a command, copying its stdout and stderr to the writers as they arrive.
    /// The guest kills it at `spec.timeout` (reported as `timed_out`); if the guest itself
    /// does not answer within a grace period after that, the VM is killed.
    pub fn run(
        &self,
        spec: &RunSpec,
        stdout: &mut (dyn Write + Send),
        stderr: &mut (dyn Write + Send),
    ) -> Result<ExitStatus, VmError> {
        let mut out = self.mux.open_stream()?;
        let mut err = self.mux.open_stream()?;
        let (id, rx) = self.request(|id| HostMsg::Run {
            id,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            stdout: out.id(),
            stderr: err.id(),
        })?;
        let grace = Duration::from_secs(15);
        let (answer, o, e) = std::thread::scope(|s| {
            let o = s.spawn(|| copy_out(&mut out, stdout));
            let e = s.spawn(|| copy_out(&mut err, stderr));
            let answer = match spec.timeout {
                Some(t) => rx.recv_timeout(t + grace).map_err(|e| match e {
                    mpsc::RecvTimeoutError::Timeout => true,
                    mpsc::RecvTimeoutError::Disconnected => false,
                }),
                None => rx.recv().map_err(|_| false),
            };
            if answer == Err(true) {
                // The guest is stuck: killing the machine closes the channel, which ends
                // the output copies.
                let _ = self.machine().kill();
            }
            (answer, o.join(), e.join())
        });
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let answer = match answer {
            Ok(a) => a,
            Err(true) => return Err(VmError::Unresponsive(grace)),
            Err(false) => return Err(self.gone()),
        };
        for r in [o, e] {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(VmError::Guest(format!("output stream: {e}"))),
                Err(_) => return Err(VmError::Guest("output copy panicked".into())),
            }
        }
        match answer {
            GuestMsg::Exited { status, .. } => Ok(status),
            GuestMsg::Failed { error, .. } => Err(VmError::Guest(error)),
            other => Err(VmError::Unexpected {
                id,
                got: format!("{other:?}"),
            }),
        }
    }

    /// Sends a local file to `guest_path` (inside the payload root); returns the bytes sent.
    pub fn upload(&self, local: &Path, guest_path: &str) -> Result<u64, VmError> {
        let mut f = std::fs::File::open(local).map_err(|e| VmError::Io {
            action: "open",
            path: local.to_owned(),
            source: e,
        })?;
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &f.metadata()
                .map_err(|e| VmError::Io {
                    action: "stat",
                    path: local.to_owned(),
                    source: e,
                })?
                .permissions(),
        );
        let mut s = self.mux.open_stream()?;
        let (id, rx) = self.request(|id| HostMsg::Upload {
            id,
            path: guest_path.to_owned(),
            mode,
            stream: s.id(),
        })?;
        let copied = io::copy(&mut f, &mut s).and_then(|n| {
            s.shutdown_write().map_err(io::Error::other)?;
            Ok(n)
        });
        drop(s);
        let answer = rx.recv().map_err(|_| self.gone())?;
        match (answer, copied) {
            (GuestMsg::Done { bytes, .. }, Ok(n)) if bytes == n => Ok(n),
            (GuestMsg::Done { bytes, .. }, Ok(n)) => Err(VmError::Guest(format!(
                "upload to {guest_path}: sent {n} bytes, the guest wrote {bytes}"
            ))),
            (GuestMsg::Failed { error, .. }, _) => {
                Err(VmError::Guest(format!("upload to {error}")))
            }
            (_, Err(e)) => Err(VmError::Guest(format!("upload to {guest_path}: {e}"))),
            (other, _) => Err(VmError::Unexpected {
                id,
                got: format!("{other:?}"),
            }),
        }
    }

    /// Fetches `guest_path` into a local file; returns the bytes received.
    pub fn download(&self, guest_path: &str, local: &Path) -> Result<u64, VmError> {
        let mut s = self.mux.open_stream()?;
        let (id, rx) = self.request(|id| HostMsg::Download {
            id,
            path: guest_path.to_owned(),
            stream: s.id(),
        })?;
        let copied = std::fs::File::create(local).and_then(|mut f| {
            let n = io::copy(&mut s, &mut f)?;
            f.sync_all()?;
            Ok(n)
        });
        drop(s);
        let answer = rx.recv().map_err(|_| self.gone())?;
        match (answer, copied) {
            (GuestMsg::Done { bytes, .. }, Ok(n)) if bytes == n => Ok(n),
            (GuestMsg::Failed { error, .. }, _) => {
                let _ = std::fs::remove_file(local);
                Err(VmError::Guest(format!("download of {error}")))
            }
            (GuestMsg::Done { bytes, .. }, Ok(n)) => Err(VmError::Guest(format!(
                "download of {guest_path}: guest sent {bytes} bytes, {n} arrived"
            ))),
            (_, Err(e)) => Err(VmError::Io {
                action: "write",
                path: local.to_owned(),
                source: e,
            }),
            (other, _) => Err(VmError::Unexpected {
                id,
                got: format!("{other:?}"),
            }),
        }
    }

    /// Kills the machine now, from any thread: a command, upload or download in progress
    /// on another thread returns an error as the channel closes. For a job that must end
    /// while a command runs; [`Vm::shutdown`] is the orderly way.
    pub fn kill(&self) -> Result<(), VmError> {
        self.machine().kill().map_err(|e| VmError::Backend {
            message: format!("kill the VM: {e}"),
        })
    }

    /// Asks the guest to power off and waits up to `grace`; then kills the machine.
    /// Either way the machine is gone when this returns.
    pub fn shutdown(mut self, grace: Duration) -> Result<(), VmError> {
        let _ = self.mux.send_msg(&HostMsg::Poweroff);
        let machine = self.machine.get_mut().unwrap_or_else(|p| p.into_inner());
        let stopped = machine.wait_timeout(grace);
        machine.kill().map_err(|e| VmError::Backend {
            message: format!("kill the VM: {e}"),
        })?;
        match stopped {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                tracing::warn!("the guest did not power off within {grace:?}; killed it");
                Ok(())
            }
            Err(e) => Err(VmError::Backend {
                message: format!("wait for the VM: {e}"),
            }),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self
            .machine
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .kill();
    }
}

fn copy_out(from: &mut Stream, to: &mut (dyn Write + Send)) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The guest resets the streams of a command that could not start.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return to.flush(),
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

fn dispatch(mux: Mux, pending: Pending) {
    loop {
        match mux.recv_msg::<GuestMsg>(None) {
            Ok(GuestMsg::Log { message }) => tracing::info!(target: "guest", "{message}"),
            Ok(msg) => {
                let id = match &msg {
                    GuestMsg::Exited { id, .. }
                    | GuestMsg::Done { id, .. }
                    | GuestMsg::Failed { id, .. } => *id,
                    other => {
                        tracing::warn!("unexpected message from the guest: {other:?}");
                        continue;
                    }
                };
                let tx = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(tx) = tx {
                    let _ = tx.send(msg);
                }
            }
            Err(ChannelError::Message(e)) => tracing::warn!("bad message from the guest: {e}"),
            Err(_) => break,
        }
    }
    // The channel closed: wake every waiter (their senders drop).
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// The last lines of the console log, for boot errors.
pub fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return format!(" (console log {} is empty)", path.display());
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    format!(
        " (console log {}, last lines: {})",
        path.display(),
        tail.iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_setup_failure_is_read_from_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "[    0.1] booting\nprovider-guest: setup failed: the payload image (/dev/vda, serial `root`) does not mount as squashfs: EINVAL\r\n").unwrap();
        assert_eq!(
            guest_setup_failure(&log).as_deref(),
            Some("the payload image (/dev/vda, serial `root`) does not mount as squashfs: EINVAL")
        );
        std::fs::write(&log, "[    0.1] booting\n").unwrap();
        assert_eq!(guest_setup_failure(&log), None);
        assert_eq!(guest_setup_failure(&dir.path().join("none")), None);
    }
}
