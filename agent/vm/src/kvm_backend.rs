//! The project's own VMM ([`super::kvm`]) behind the same [`Machine`] seam as QEMU: the
//! guest's COM2 is one end of a socket pair, the host side of the channel gets the other.
//!
//! Confinement: the VM's threads run under Landlock ([`FsPolicy::for_vmm_job`]: read the
//! kernel, the initramfs and the binary, write only the job dir) and the per-thread
//! seccomp filters with `KillProcess`. What was enforced is logged at info level and
//! written to `<job>/confinement.txt`, as the QEMU backend does for its child.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::kvm::{self, Confinement, KernelImage, RunningVm, VmConfig, VmExit};
use super::{Machine, MachineSpec, VmError};
use crate::confine::{FsPolicy, OnViolation};

/// Longest a job may run in the own VMM; the job's own deadlines are shorter, this is the
/// backstop that stops a VM whose host side vanished.
const TIME_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// A Linux guest running in the own VMM.
#[derive(Debug)]
pub struct KvmMachine {
    vm: Option<RunningVm>,
    channel: Option<UnixStream>,
    console_log: PathBuf,
    exit: Option<String>,
}

impl KvmMachine {
    /// Starts `spec`'s Linux kernel (a bzImage) with its initramfs.
    pub fn launch(spec: &MachineSpec) -> Result<Self, VmError> {
        Self::start(spec, KernelImage::BzImage(spec.kernel.clone()))
    }

    /// Starts `image` with the rest of `spec`, confined as a job is. The Landlock policy
    /// still names `spec.kernel` and `spec.initramfs` (they must exist). For running our
    /// own real-mode guests through the job path where Linux cannot boot (PVM hosts); only
    /// for tests (the `test-support` feature).
    #[cfg(any(test, feature = "test-support"))]
    pub fn launch_image(spec: &MachineSpec, image: KernelImage) -> Result<Self, VmError> {
        Self::start(spec, image)
    }

    fn start(spec: &MachineSpec, image: KernelImage) -> Result<Self, VmError> {
        // The own VMM runs in the provider's process: no cgroup of its own to hold a quota.
        if spec.runtime.cpu_quota_binds() {
            return Err(VmError::Unenforceable {
                profile: spec.runtime.profile.clone(),
                what: "it asks for a cpu_quota below 1 and the own VMM runs in the provider's process, which has no cgroup of its own; use --vmm qemu".into(),
            });
        }
        let (host_end, vmm_end) = UnixStream::pair().map_err(|e| VmError::Backend {
            message: format!("cannot create the channel socket pair: {e}"),
        })?;
        let config = VmConfig {
            mem_bytes: u64::from(spec.mem_mib) << 20,
            vcpus: u8::try_from(spec.cpus).unwrap_or(u8::MAX),
            kernel: image,
            initramfs: Some(spec.initramfs.clone()),
            cmdline: spec.runtime.guest_cmdline(&spec.cmdline),
            console_log: spec.console_log.clone(),
            time_limit: TIME_LIMIT,
            // The own VMM's allow lists are already the tightest filter there is: `default`
            // and `strict` both get them, `off` none.
            seccomp: (spec.runtime.seccomp != crate::runtime::Seccomp::Off)
                .then_some(OnViolation::KillProcess),
            // It reads only the kernel, the initramfs and itself: `job-dir` and `minimal`
            // are the same set here.
            landlock: (spec.runtime.landlock != crate::runtime::FsScope::Off)
                .then(|| FsPolicy::for_vmm_job(&spec.kernel, Some(&spec.initramfs), &spec.job_dir)),
            confined_check: None,
        };
        let vm = kvm::start(config, vmm_end).map_err(|e| VmError::Backend {
            message: format!("own VMM: {e}"),
        })?;
        // On error `vm` is dropped, which kills it: a job whose log cannot say how it is
        // confined does not run.
        record_confinement(&spec.job_dir, vm.confinement())?;
        Ok(Self {
            vm: Some(vm),
            channel: Some(host_end),
            console_log: spec.console_log.clone(),
            exit: None,
        })
    }

    fn describe(exit: VmExit) -> String {
        format!("{exit:?}")
    }
}

impl Machine for KvmMachine {
    fn backend(&self) -> &'static str {
        "kvm"
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn console_log(&self) -> &Path {
        &self.console_log
    }

    fn take_channel(&mut self) -> Option<UnixStream> {
        self.channel.take()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = &self.exit {
                return Ok(Some(done.clone()));
            }
            match &self.vm {
                Some(vm) if vm.is_finished() => {
                    let exit = self.vm.take().map(RunningVm::wait).map(Self::describe);
                    self.exit = exit;
                }
                Some(_) if Instant::now() >= deadline => return Ok(None),
                Some(_) => std::thread::sleep(Duration::from_millis(10)),
                None => return Ok(self.exit.clone()),
            }
        }
    }

    fn kill(&mut self) -> io::Result<()> {
        if let Some(vm) = self.vm.take() {
            self.exit = Some(Self::describe(vm.kill()));
        }
        Ok(())
    }
}

/// Logs what confines a VM's threads and writes it to `<job_dir>/confinement.txt`.
pub fn record_confinement(job_dir: &Path, confinement: &Confinement) -> Result<(), VmError> {
    tracing::info!(
        "kvm confinement: {}",
        confinement.to_string().replace('\n', "; ")
    );
    let path = job_dir.join("confinement.txt");
    std::fs::write(&path, format!("{confinement}\n")).map_err(|source| VmError::Io {
        action: "write",
        path,
        source,
    })
}
