//! The provider's own microVM monitor on KVM.
//!
//! A [`VmConfig`] names the guest (a Linux bzImage or ELF vmlinux with an initramfs and
//! command line, or a real-mode program of our own), its memory, vCPUs, console log and
//! wall-clock limit. [`start`] builds the machine and returns a [`RunningVm`]:
//!
//! - guest memory of the configured size (RAM above 4 GiB past the 32-bit hole);
//! - the in-kernel PIC/IOAPIC/LAPIC and PIT;
//! - COM1 (0x3f8, IRQ 4) → the console log; COM2 (0x2f8, IRQ 3) ↔ the host channel
//!   socket given to `start`, byte for byte, so the host-side channel code talks to a
//!   `UnixStream` exactly as it does with QEMU's socket chardev;
//! - the i8042 for its reset command;
//! - one thread per vCPU and one VMM thread that feeds COM2 from the socket, enforces the
//!   time limit and tears everything down.
//!
//! Confinement ([`crate::confine`]): the VMM thread applies the config's Landlock policy
//! to itself before it starts the vCPU threads, which inherit it, so every thread of the
//! VM is confined and none of the agent's other threads is; then each thread installs its
//! seccomp filter. What was enforced is in [`RunningVm::confinement`] (the job log's
//! `confinement.txt`) and on the first lines of the console log.
//!
//! Guest shutdown is an i8042 reset, a triple fault, a KVM system event, or every vCPU
//! halted with interrupts off. See `docs/kvm.md` for the layout, the threads and the
//! seam with the rest of the VM runtime.
//!
//! Where `/dev/kvm` is PVM (paravirtual KVM), a stock Linux kernel cannot boot: `start`
//! refuses Linux guests there with [`KvmError::PvmCannotBootLinux`] instead of hanging.
#![allow(unsafe_code)]

pub mod boot;
pub mod devices;
/// Test guests: only for this crate's tests and the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
pub mod guests;
pub mod layout;
mod vcpu;

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::host::{host_is_pvm, PVM_MODULE_PATH};
use crate::confine::{self, FsPolicy, LandlockReport, OnViolation, PreparedLandlock};
use devices::{ChannelWriter, ConsoleLog, PortBus};
use vcpu::Shared;

/// Most vCPUs a guest may have (the MP table must fit in the EBDA).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest: enough for the low tables and a real-mode program.
pub const MIN_MEM_BYTES: u64 = 1 << 20;
/// How often the VMM thread checks whether every vCPU has halted with interrupts off.
pub const HALT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// A command line for Linux guests of this VMM: console on COM1, the host channel on
/// COM2 needs nothing, `reboot=k` so a guest reboot reaches the i8042 (our shutdown
/// signal), `panic=-1` so a panic reboots (and so stops the VM) at once, and the probes
/// for hardware this machine does not have switched off.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
    i8042.noaux i8042.nomux i8042.dumbkbd tsc=reliable quiet";

/// The guest to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// A Linux bzImage (e.g. Debian's `vmlinuz`), 64-bit boot protocol.
    BzImage(PathBuf),
    /// An uncompressed ELF `vmlinux`, entered at its ELF entry in 64-bit mode.
    Elf(PathBuf),
    /// A real-mode program, loaded at `0000:1000` and started there.
    RealMode(Vec<u8>),
}

impl KernelImage {
    /// True for Linux kernels (the images PVM cannot run).
    pub fn is_linux(&self) -> bool {
        !matches!(self, KernelImage::RealMode(_))
    }
}

/// Everything that defines one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB, at least [`MIN_MEM_BYTES`]).
    pub mem_bytes: u64,
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    pub vcpus: u8,
    /// The guest.
    pub kernel: KernelImage,
    /// Initramfs for a Linux guest.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line for a Linux guest (see [`DEFAULT_CMDLINE`]).
    pub cmdline: String,
    /// COM1 output is appended here (the job's console log).
    pub console_log: PathBuf,
    /// Wall-clock limit from the vCPUs' start; the VM is stopped when it passes.
    pub time_limit: Duration,
    /// Per-thread seccomp filters for the vCPU and VMM threads ([`crate::confine`]), and
    /// what a forbidden syscall does; `None` runs them unfiltered.
    pub seccomp: Option<OnViolation>,
    /// Landlock policy for the VMM thread and the vCPU threads it starts (jobs use
    /// [`FsPolicy::for_vmm_job`]); `None` leaves them the agent's filesystem access.
    /// Everything the VM needs is opened before it applies, so the policy only has to
    /// name what a confined thread may still open.
    pub landlock: Option<FsPolicy>,
    /// Run on the VMM thread just after Landlock applies, before the vCPU threads start
    /// and before seccomp (which forbids `open` outright): lets tests and self-checks see
    /// what a confined VMM thread can open. `None` for jobs.
    pub confined_check: Option<ConfinedCheck>,
}

/// A function run on a VM's VMM thread once Landlock confines it (see
/// [`VmConfig::confined_check`]).
#[derive(Clone)]
pub struct ConfinedCheck(pub Arc<dyn Fn() + Send + Sync>);

impl fmt::Debug for ConfinedCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfinedCheck(..)")
    }
}

/// What confined a VM's threads, for the job log (`<job>/confinement.txt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// What Landlock enforced on the VMM thread and its vCPU threads; `None` if the
    /// config gave no policy.
    pub landlock: Option<LandlockReport>,
    /// What a forbidden syscall does under the vCPU and VMM threads' seccomp filters;
    /// `None` if none were installed.
    pub seccomp: Option<OnViolation>,
    /// How many vCPU threads there are.
    pub vcpus: u8,
}

impl fmt::Display for Confinement {
    /// One line per mechanism, the Landlock line in the QEMU backend's words.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.landlock {
            Some(report) => {
                writeln!(f, "{report}")?;
                writeln!(
                    f,
                    "landlock applies to: the VMM thread and its {} vCPU thread(s), not the agent's other threads",
                    self.vcpus
                )?;
            }
            None => writeln!(f, "landlock: not enforced (no policy given to this VM)")?,
        }
        let seccomp = match self.seccomp {
            Some(OnViolation::KillProcess) => {
                "filter installed (a forbidden syscall kills the process)"
            }
            Some(OnViolation::Errno) => "filter installed (a forbidden syscall fails with EPERM)",
            None => "no filter installed",
        };
        writeln!(f, "seccomp (vCPU threads): {seccomp}")?;
        write!(f, "seccomp (VMM thread): {seccomp}")
    }
}

/// Why the guest stopped by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// The guest wrote the CPU-reset command (0xfe) to the i8042 (Linux `reboot=k`).
    I8042Reset,
    /// A triple fault (Linux `reboot=t`, or a guest that crashed hard).
    TripleFault,
    /// Every vCPU halted with interrupts disabled (Linux `halt`/`poweroff` without ACPI).
    HaltedInterruptsOff,
    /// KVM reported a system shutdown or reset event.
    SystemEvent,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest shut down.
    Shutdown(ShutdownCause),
    /// The wall-clock limit passed.
    TimeLimit,
    /// [`RunningVm::kill`] or [`VmHandle::kill`] stopped it.
    Killed,
    /// KVM could not run the guest; the text says what happened.
    Failed(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Shutdown(cause) => write!(f, "guest shut down ({cause:?})"),
            VmExit::TimeLimit => f.write_str("time limit reached"),
            VmExit::Killed => f.write_str("killed by the host"),
            VmExit::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// What can go wrong starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// Linux on PVM: refused up front, because it would hang.
    #[error(
        "/dev/kvm on this host is PVM (paravirtual KVM: {PVM_MODULE_PATH} exists), which cannot \
         boot a stock Linux kernel (it hangs after the real-mode setup); use --vmm qemu on this host"
    )]
    PvmCannotBootLinux,
    /// The config is out of range.
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("cannot map {bytes} bytes of guest memory: {reason}")]
    GuestMemory {
        /// Requested size.
        bytes: u64,
        /// Why.
        reason: String,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write guest memory at {addr:#x}: {reason}")]
    WriteGuestMemory {
        /// Guest address.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The kernel file could not be read.
    #[error("cannot read kernel {}: {source}", path.display())]
    ReadKernel {
        /// Kernel path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a bzImage this VMM can start.
    #[error("{} is not a bootable 64-bit bzImage: {reason}", path.display())]
    BadBzImage {
        /// Kernel path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The loader rejected the kernel.
    #[error("cannot load kernel {}: {source}", path.display())]
    LoadKernel {
        /// Kernel path.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel needs more memory than the guest has.
    #[error("kernel {} needs {need} bytes from 1 MiB but low guest memory ends at {have:#x}", path.display())]
    KernelTooBig {
        /// Kernel path.
        path: PathBuf,
        /// Bytes it needs while decompressing.
        need: u64,
        /// End of low memory.
        have: u64,
    },
    /// The initramfs could not be read.
    #[error("cannot read initramfs {}: {source}", path.display())]
    ReadInitramfs {
        /// Initramfs path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error("initramfs {} ({size} bytes) does not fit in guest memory above the kernel", path.display())]
    InitramfsTooBig {
        /// Initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Command line too long for the kernel.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// Command line with a NUL byte (it would be silently cut there).
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Real-mode program too large for its slot.
    #[error("real-mode program is {len} bytes; at most {max} fit")]
    RealModeTooBig {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The console log could not be opened.
    #[error("cannot open console log {}: {source}", path.display())]
    ConsoleLog {
        /// Log path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The Landlock ruleset or the seccomp filters could not be built or applied.
    #[error("confining the VM's threads: {0}")]
    Confine(#[from] confine::ConfineError),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The refusal rule on its own, for callers that probed already (and for tests).
pub fn check_bootable(kernel: &KernelImage, pvm: bool) -> Result<(), KvmError> {
    if pvm && kernel.is_linux() {
        Err(KvmError::PvmCannotBootLinux)
    } else {
        Ok(())
    }
}

fn validate(config: &VmConfig) -> Result<(), KvmError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(KvmError::InvalidConfig(format!(
            "{} vCPUs; between 1 and {MAX_VCPUS} are supported",
            config.vcpus
        )));
    }
    if config.mem_bytes < MIN_MEM_BYTES || config.mem_bytes % 4096 != 0 {
        return Err(KvmError::InvalidConfig(format!(
            "{} bytes of memory; it must be a multiple of 4 KiB and at least {MIN_MEM_BYTES}",
            config.mem_bytes
        )));
    }
    if config.time_limit.is_zero() {
        return Err(KvmError::InvalidConfig("a zero time limit".into()));
    }
    Ok(())
}

/// What the VMM thread owns: dropping it releases every fd and the guest memory.
struct VmmState {
    // Field order is drop order: the VM fd (KVM's use of the memory) goes before the
    // memory mapping it points into.
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    _kvm: Kvm,
    vcpus: Vec<VcpuFd>,
    shared: Arc<Shared>,
    channel: Arc<OwnedFd>,
    drained: Arc<EventFd>,
    time_limit: Duration,
    filters: Option<Arc<Filters>>,
    /// Taken and applied by the VMM thread first thing; the ruleset fd closes with it.
    landlock: Option<PreparedLandlock>,
    confined_check: Option<ConfinedCheck>,
    /// For errors writing the console's confinement line.
    console_log: PathBuf,
}

/// The compiled seccomp programs for a VM's threads.
struct Filters {
    vcpu: seccompiler::BpfProgram,
    vmm: seccompiler::BpfProgram,
}

/// Builds the VM described by `config` and starts its vCPUs. COM2 is connected to
/// `channel`: guest writes are sent on it, bytes read from it are fed to the guest.
pub fn start(config: VmConfig, channel: UnixStream) -> Result<RunningVm, KvmError> {
    validate(&config)?;
    // Before anything else: on PVM a Linux guest would hang, not fail.
    if config.kernel.is_linux() {
        check_bootable(&config.kernel, host_is_pvm())?;
    }
    vcpu::install_kick_handler()?;
    // Built here, on the caller's thread: a missing path fails the start before any
    // KVM work, and the VMM thread can then confine itself without opening anything.
    let landlock = config
        .landlock
        .as_ref()
        .map(FsPolicy::prepare)
        .transpose()?;

    let kvm = Kvm::new().map_err(KvmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(|source| KvmError::Kvm {
        op: "KVM_CREATE_VM",
        source,
    })?;
    // Memory slots go in before the irqchip: measured under PVM, registering them
    // afterwards costs ~7 ms of RCU grace period per VM at creation instead of at
    // teardown, which is on the path to the guest's first instruction.
    let ranges: Vec<(GuestAddress, usize)> = layout::memory_ranges(config.mem_bytes)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| KvmError::GuestMemory {
        bytes: config.mem_bytes,
        reason: e.to_string(),
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live anonymous mapping of `len` bytes owned by `mem`,
        // which the VMM thread keeps until after the VM fd (and with it KVM's use of
        // the mapping) is closed: `VmmState` drops `_vm` before `_mem`.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| KvmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }

    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(|source| KvmError::Kvm {
            op: "KVM_SET_TSS_ADDR",
            source,
        })?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(|source| KvmError::Kvm {
            op: "KVM_SET_IDENTITY_MAP_ADDR",
            source,
        })?;
    vm.create_irq_chip().map_err(|source| KvmError::Kvm {
        op: "KVM_CREATE_IRQCHIP",
        source,
    })?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(|source| KvmError::Kvm {
        op: "KVM_CREATE_PIT2",
        source,
    })?;

    let entry = match &config.kernel {
        KernelImage::BzImage(path) => boot::load_linux(
            &mem,
            config.mem_bytes,
            config.vcpus,
            path,
            false,
            config.initramfs.as_deref(),
            &config.cmdline,
        )?,
        KernelImage::Elf(path) => boot::load_linux(
            &mem,
            config.mem_bytes,
            config.vcpus,
            path,
            true,
            config.initramfs.as_deref(),
            &config.cmdline,
        )?,
        KernelImage::RealMode(program) => boot::load_real_mode(&mem, program)?,
    };

    let filters = match config.seccomp {
        Some(on) => Some(Arc::new(Filters {
            vcpu: confine::vcpu_filter(on)?,
            vmm: confine::vmm_filter(on)?,
        })),
        None => None,
    };
    let mut console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.console_log)
        .map_err(|source| KvmError::ConsoleLog {
            path: config.console_log.clone(),
            source,
        })?;
    // The job log states what confined this VMM's threads.
    let note = match config.seccomp {
        Some(OnViolation::KillProcess) => {
            "seccomp filters on the vCPU and VMM threads (a forbidden syscall kills the process)"
        }
        Some(OnViolation::Errno) => {
            "seccomp filters on the vCPU and VMM threads (a forbidden syscall fails with EPERM)"
        }
        None => "no seccomp filters on the VMM threads",
    };
    writeln!(console, "[provider: {note}]").map_err(|source| KvmError::ConsoleLog {
        path: config.console_log.clone(),
        source,
    })?;
    let eventfd =
        || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(KvmError::EventFd);
    let (com1_irq, com2_irq) = (eventfd()?, eventfd()?);
    vm.register_irqfd(&com1_irq, devices::COM1_IRQ)
        .map_err(|source| KvmError::Kvm {
            op: "KVM_IRQFD (COM1)",
            source,
        })?;
    vm.register_irqfd(&com2_irq, devices::COM2_IRQ)
        .map_err(|source| KvmError::Kvm {
            op: "KVM_IRQFD (COM2)",
            source,
        })?;
    let drained = Arc::new(eventfd()?);
    let wake = Arc::new(eventfd()?);
    let channel = Arc::new(OwnedFd::from(channel));
    let bus = PortBus::new(
        com1_irq,
        com2_irq,
        ConsoleLog::new(console),
        ChannelWriter::new(channel.clone()),
        drained.clone(),
    );
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        outcome: Mutex::new(None),
        wake,
        bus: Mutex::new(bus),
        halted_off: (0..config.vcpus).map(|_| AtomicBool::new(false)).collect(),
    });

    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for index in 0..config.vcpus {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| KvmError::Kvm {
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        boot::setup_vcpu_common(&kvm, &fd, index, config.vcpus)?;
        if index == 0 {
            match entry {
                boot::Entry::Linux64(addr) => boot::setup_long_mode(&fd, addr)?,
                boot::Entry::RealMode => boot::setup_real_mode(&fd)?,
            }
        }
        vcpus.push(fd);
    }

    let machine = VmmState {
        _vm: vm,
        _mem: mem,
        _kvm: kvm,
        vcpus,
        shared: shared.clone(),
        channel,
        drained,
        time_limit: config.time_limit,
        filters,
        landlock,
        confined_check: config.confined_check.clone(),
        console_log: config.console_log.clone(),
    };
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    let vmm = std::thread::Builder::new()
        .name("vmm".into())
        .spawn(move || vmm_main(machine, started_tx))
        .map_err(|source| KvmError::Spawn {
            what: "VMM".into(),
            source,
        })?;
    match started_rx.recv() {
        Ok(Ok(landlock)) => Ok(RunningVm {
            vmm: Some(vmm),
            shared: Arc::downgrade(&shared),
            confinement: Confinement {
                landlock,
                seccomp: config.seccomp,
                vcpus: config.vcpus,
            },
        }),
        Ok(Err(e)) => {
            let _ = vmm.join();
            Err(e)
        }
        Err(_) => {
            let _ = vmm.join();
            Err(KvmError::Spawn {
                what: "VMM".into(),
                source: std::io::Error::other("the VMM thread ended before starting the vCPUs"),
            })
        }
    }
}

/// A VM whose vCPUs are running. Dropping it kills the VM and waits for the teardown.
#[derive(Debug)]
pub struct RunningVm {
    vmm: Option<JoinHandle<VmExit>>,
    shared: Weak<Shared>,
    confinement: Confinement,
}

/// A handle that can stop a VM from another thread.
#[derive(Debug, Clone)]
pub struct VmHandle {
    shared: Weak<Shared>,
}

impl VmHandle {
    /// Stops the VM (no effect if it already ended).
    pub fn kill(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.finish(VmExit::Killed);
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// A handle for stopping this VM from elsewhere.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// What confines this VM's threads (for the job log).
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// True once the VM has stopped and been torn down.
    pub fn is_finished(&self) -> bool {
        self.vmm.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits until the VM stops (by itself, at its time limit, or killed) and everything
    /// it used is released.
    pub fn wait(mut self) -> VmExit {
        self.join()
    }

    /// Stops the VM now and waits for the teardown.
    pub fn kill(mut self) -> VmExit {
        self.handle().kill();
        self.join()
    }

    fn join(&mut self) -> VmExit {
        match self.vmm.take().map(JoinHandle::join) {
            Some(Ok(exit)) => exit,
            Some(Err(_)) => VmExit::Failed("the VMM thread panicked".into()),
            None => VmExit::Killed,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.vmm.is_some() {
            self.handle().kill();
            self.join();
        }
    }
}

/// The VMM thread: confines itself with Landlock, starts the vCPU threads, installs its
/// seccomp filter, then feeds COM2 from the channel, enforces the time limit and probes
/// for halted guests until the VM stops; then tears down. Sends what Landlock enforced
/// (or why the start failed) on `started` once the vCPUs run.
fn vmm_main(
    mut machine: VmmState,
    started: mpsc::SyncSender<Result<Option<LandlockReport>, KvmError>>,
) -> VmExit {
    // Landlock before any vCPU thread exists: a thread inherits its creator's Landlock
    // domain when it is created, so the vCPU threads are confined too without applying it
    // again, and the agent's other threads (not descendants of this one) are not.
    let landlock = match machine.landlock.take().map(PreparedLandlock::restrict_self) {
        None => None,
        Some(Ok(report)) => Some(report),
        Some(Err(e)) => {
            let _ = started.send(Err(e.into()));
            return VmExit::Failed("could not confine the VMM thread with Landlock".into());
        }
    };
    {
        // Before the guest runs, so it is the console log's second line, after seccomp's.
        let mut bus = machine.shared.bus.lock().unwrap_or_else(|p| p.into_inner());
        let console = bus.com1.writer_mut();
        let written = match &landlock {
            Some(report) => writeln!(console, "[provider: on the VMM and vCPU threads, {report}]"),
            None => writeln!(
                console,
                "[provider: no landlock on the VMM and vCPU threads]"
            ),
        };
        if let Err(source) = written {
            let _ = started.send(Err(KvmError::ConsoleLog {
                path: machine.console_log.clone(),
                source,
            }));
            return VmExit::Failed("could not write the console log".into());
        }
    }
    if let Some(check) = machine.confined_check.take() {
        (check.0)();
    }
    let vcpus = std::mem::take(&mut machine.vcpus);
    let (shared, channel, drained) = (
        machine.shared.clone(),
        machine.channel.clone(),
        machine.drained.clone(),
    );
    let time_limit = machine.time_limit;
    let filters = machine.filters.clone();
    let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(vcpus.len());
    for (index, fd) in vcpus.into_iter().enumerate() {
        let shared_vcpu = shared.clone();
        let filters = filters.clone();
        match std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let filter = filters.as_ref().map(|f| &f.vcpu);
                vcpu::run(fd, index, shared_vcpu, filter)
            }) {
            Ok(t) => threads.push(t),
            Err(source) => {
                stop_vcpus(&shared, &channel, threads);
                let _ = started.send(Err(KvmError::Spawn {
                    what: format!("vCPU {index}"),
                    source,
                }));
                return VmExit::Failed("could not start every vCPU".into());
            }
        }
    }
    // From here on this thread only polls, reads, kicks and tears down.
    if let Some(f) = &filters {
        if let Err(e) = confine::apply_to_this_thread(&f.vmm) {
            stop_vcpus(&shared, &channel, threads);
            let _ = started.send(Err(e.into()));
            return VmExit::Failed("could not confine the VMM thread".into());
        }
    }
    let _ = started.send(Ok(landlock));
    drop(started);

    let deadline = Instant::now() + time_limit;
    let mut next_probe = Instant::now() + HALT_PROBE_INTERVAL;
    let mut pending: Vec<u8> = Vec::new();
    let mut input_open = true;
    let mut buf = [0u8; 4096];
    let exit = loop {
        if let Some(exit) = shared
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            break exit;
        }
        let now = Instant::now();
        if now >= deadline {
            shared.finish(VmExit::TimeLimit);
            continue;
        }
        if now >= next_probe {
            for t in &threads {
                vcpu::kick(t.as_pthread_t());
            }
            next_probe = now + HALT_PROBE_INTERVAL;
        }
        let want_input = input_open && pending.is_empty();
        let mut fds = [
            pollfd(shared.wake.as_raw_fd()),
            pollfd(drained.as_raw_fd()),
            pollfd(if want_input { channel.as_raw_fd() } else { -1 }),
        ];
        let timeout = deadline.min(next_probe).saturating_duration_since(now);
        // Round up so we do not spin on a sub-millisecond remainder.
        let timeout_ms = timeout.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of three pollfd structs that lives across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let _ = shared.wake.read();
        }
        if fds[1].revents != 0 {
            let _ = drained.read();
        }
        if fds[2].revents != 0 {
            // SAFETY: `channel` is an open socket and `buf` a writable buffer of
            // `buf.len()` bytes; MSG_DONTWAIT keeps the VMM thread from blocking.
            let got = unsafe {
                libc::recv(
                    channel.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match got {
                0 => input_open = false,
                n if n > 0 => pending.extend_from_slice(&buf[..n as usize]),
                _ => {
                    let err = std::io::Error::last_os_error();
                    if !matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        input_open = false;
                    }
                }
            }
        }
        if !pending.is_empty() {
            let mut bus = shared.bus.lock().unwrap_or_else(|p| p.into_inner());
            let room = bus.com2.fifo_capacity().min(pending.len());
            if room > 0 {
                if let Ok(n) = bus.com2.enqueue_raw_bytes(&pending[..room]) {
                    pending.drain(..n);
                }
            }
        }
    };
    stop_vcpus(&shared, &channel, threads);
    let mut bus = shared.bus.lock().unwrap_or_else(|p| p.into_inner());
    let console = bus.com1.writer_mut();
    let _ = writeln!(console, "\n[provider: VM stopped: {exit}]");
    let _ = bus.sync_console();
    drop(bus);
    // Everything the VM used goes now, before the caller learns the VM has ended.
    drop((shared, channel, drained));
    drop(machine);
    exit
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Stops every vCPU thread and joins it. A vCPU may be inside `KVM_RUN` (the kick makes
/// the ioctl return) or blocked sending to the channel (shutting the socket down makes
/// that send fail); it may also be between checking `stop` and entering `KVM_RUN`, where
/// one kick would be lost, so kicks repeat until the thread is gone.
fn stop_vcpus(shared: &Shared, channel: &OwnedFd, threads: Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    // SAFETY: `channel` is an open socket; shutdown only changes its state.
    unsafe {
        libc::shutdown(channel.as_raw_fd(), libc::SHUT_RDWR);
    }
    for t in &threads {
        let mut backoff = Duration::from_micros(50);
        while !t.is_finished() {
            vcpu::kick(t.as_pthread_t());
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }
    for t in threads {
        // A vCPU thread that panicked has already stopped; nothing more to release.
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_refuses_linux_but_not_real_mode() {
        let linux = KernelImage::BzImage("/boot/vmlinuz".into());
        let err = check_bootable(&linux, true).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("PVM") && msg.contains("--vmm qemu"), "{msg}");
        assert!(check_bootable(&KernelImage::Elf("/x".into()), true).is_err());
        assert!(check_bootable(&linux, false).is_ok());
        assert!(check_bootable(&KernelImage::RealMode(vec![0xf4]), true).is_ok());
    }

    #[test]
    fn confinement_says_what_each_mechanism_enforces() {
        let none = Confinement {
            landlock: None,
            seccomp: None,
            vcpus: 1,
        };
        assert_eq!(
            none.to_string(),
            "landlock: not enforced (no policy given to this VM)\n\
             seccomp (vCPU threads): no filter installed\n\
             seccomp (VMM thread): no filter installed"
        );
        let job = Confinement {
            landlock: Some(LandlockReport {
                enforcement: confine::Enforcement::Partially,
                kernel_abi: 3,
                no_new_privs: true,
                reason: Some("kernel ABI 3 lacks rights of ABI 5".into()),
            }),
            seccomp: Some(OnViolation::KillProcess),
            vcpus: 2,
        };
        assert_eq!(
            job.to_string(),
            "landlock: partially enforced (kernel ABI 3; kernel ABI 3 lacks rights of ABI 5), \
             no_new_privs: yes\n\
             landlock applies to: the VMM thread and its 2 vCPU thread(s), not the agent's other threads\n\
             seccomp (vCPU threads): filter installed (a forbidden syscall kills the process)\n\
             seccomp (VMM thread): filter installed (a forbidden syscall kills the process)"
        );
    }

    #[test]
    fn configs_out_of_range_are_refused() {
        let ok = VmConfig {
            mem_bytes: 2 << 20,
            vcpus: 1,
            kernel: KernelImage::RealMode(vec![0xf4]),
            initramfs: None,
            cmdline: String::new(),
            console_log: "/dev/null".into(),
            time_limit: Duration::from_secs(1),
            seccomp: None,
            landlock: None,
            confined_check: None,
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            VmConfig {
                vcpus: 0,
                ..ok.clone()
            },
            VmConfig {
                vcpus: MAX_VCPUS + 1,
                ..ok.clone()
            },
            VmConfig {
                mem_bytes: 4096,
                ..ok.clone()
            },
            VmConfig {
                mem_bytes: (2 << 20) + 1,
                ..ok.clone()
            },
            VmConfig {
                time_limit: Duration::ZERO,
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(validate(&bad), Err(KvmError::InvalidConfig(_))),
                "{bad:?}"
            );
        }
    }
}
