//! The vCPU threads: one per vCPU, each running `KVM_RUN` in a loop and handling the
//! exits that reach userspace (port I/O to the device bus, shutdown, failures). The VMM
//! thread interrupts them with a real-time signal ("kick") to stop them and, every
//! [`HALT_PROBE_INTERVAL`](super::HALT_PROBE_INTERVAL), to look for a guest halted with
//! interrupts off: with the in-kernel interrupt controller, `HLT` never leaves the kernel,
//! so that state is only visible by asking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;
use vmm_sys_util::eventfd::EventFd;

use super::devices::{PortAction, PortBus};
use super::{KvmError, ShutdownCause, VmExit};

/// The signal used to kick vCPU threads out of `KVM_RUN`. Real-time signals are unused
/// by the Rust runtime and by tokio; the handler does nothing: interrupting the ioctl
/// (`EINTR`) is the whole point.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

/// Installs the no-op kick handler once per process.
pub fn install_kick_handler() -> Result<(), KvmError> {
    static RESULT: OnceLock<Option<i32>> = OnceLock::new();
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let failed = RESULT.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
            .err()
            .map(|e| e.errno())
    });
    match failed {
        None => Ok(()),
        Some(errno) => Err(KvmError::Signal(vmm_sys_util::errno::Error::new(*errno))),
    }
}

/// Sends the kick signal to a vCPU thread.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` comes from a `JoinHandle` that has not been joined yet, so the
    // pthread id is still valid; the signal has a handler installed (no default action).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// State shared between the VMM thread and the vCPU threads.
pub struct Shared {
    /// Set when the VM is being torn down; vCPUs stop at their next exit.
    pub stop: AtomicBool,
    /// How the VM ended; the first writer wins.
    pub outcome: Mutex<Option<VmExit>>,
    /// Wakes the VMM thread (an outcome was set).
    pub wake: Arc<EventFd>,
    /// The port-I/O devices.
    pub bus: Mutex<PortBus>,
    /// Per vCPU: last seen halted with interrupts off, or never started by the guest.
    pub halted_off: Vec<AtomicBool>,
}

impl Shared {
    /// Records how the VM ended (unless something already did) and wakes the VMM thread.
    pub fn finish(&self, exit: VmExit) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if outcome.is_none() {
            *outcome = Some(exit);
        }
        drop(outcome);
        // The VMM thread also polls on a timer, so a failed wake-up only delays it.
        let _ = self.wake.write(1);
    }

    fn bus(&self) -> std::sync::MutexGuard<'_, PortBus> {
        // A poisoned bus means a vCPU thread panicked mid-access; the device state is
        // still memory-safe, and the VM is being torn down by that panic's outcome.
        self.bus.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The vCPU loop. Returns when the VM stops; the `VcpuFd` is dropped with it.
pub fn run(mut vcpu: VcpuFd, index: usize, shared: Arc<Shared>, filter: Option<&BpfProgram>) {
    if let Some(filter) = filter {
        if let Err(e) = crate::confine::apply_to_this_thread(filter) {
            shared.finish(VmExit::Failed(format!("vCPU {index}: {e}")));
            return;
        }
    }
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let exit = vcpu.run();
        let mut probe = false;
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => shared.bus().read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                if shared.bus().write(port, data) == PortAction::Reset {
                    shared.finish(VmExit::Shutdown(ShutdownCause::I8042Reset));
                    return;
                }
            }
            // No MMIO devices: reads float high, writes go nowhere.
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Shutdown) => {
                shared.finish(VmExit::Shutdown(ShutdownCause::TripleFault));
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _))
                if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
            {
                shared.finish(VmExit::Shutdown(ShutdownCause::SystemEvent));
                return;
            }
            // Only without an in-kernel irqchip; we always create one, but a HLT that
            // does reach us means the same thing as the probe below.
            Ok(VcpuExit::Hlt) => probe = true,
            Ok(VcpuExit::Intr) => probe = true,
            Err(e) if e.errno() == libc::EINTR => probe = true,
            Err(e) if e.errno() == libc::EAGAIN => {}
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                shared.finish(VmExit::Failed(format!(
                    "vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                )));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member is
                // the active one of the kvm_run exit union.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                shared.finish(VmExit::Failed(format!(
                    "vCPU {index}: KVM internal error (suberror {suberror}, rip {rip:#x})"
                )));
                return;
            }
            Ok(other) => {
                shared.finish(VmExit::Failed(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                )));
                return;
            }
            Err(e) => {
                shared.finish(VmExit::Failed(format!("vCPU {index}: KVM_RUN failed: {e}")));
                return;
            }
        }
        if !probe {
            shared.halted_off[index].store(false, Ordering::SeqCst);
            continue;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stopped = match (vcpu.get_mp_state(), vcpu.get_regs()) {
            (Ok(mp), Ok(regs)) => {
                mp.mp_state == KVM_MP_STATE_UNINITIALIZED
                    || (mp.mp_state == KVM_MP_STATE_HALTED && regs.rflags & (1 << 9) == 0)
            }
            _ => false,
        };
        shared.halted_off[index].store(stopped, Ordering::SeqCst);
        if stopped && shared.halted_off.iter().all(|h| h.load(Ordering::SeqCst)) {
            shared.finish(VmExit::Shutdown(ShutdownCause::HaltedInterruptsOff));
            return;
        }
    }
}
