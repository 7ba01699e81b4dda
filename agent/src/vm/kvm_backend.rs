//! The project's own VMM ([`super::kvm`]) behind the same [`Machine`] seam as QEMU: the
//! guest's COM2 is one end of a socket pair, the host side of the channel gets the other.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::kvm::{self, KernelImage, RunningVm, VmConfig, VmExit};
use super::{Machine, MachineSpec, VmError};

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
    pub fn launch(spec: &MachineSpec) -> Result<Self, VmError> {
        let (host_end, vmm_end) = UnixStream::pair().map_err(|e| VmError::Backend {
            message: format!("cannot create the channel socket pair: {e}"),
        })?;
        let config = VmConfig {
            mem_bytes: u64::from(spec.mem_mib) << 20,
            vcpus: u8::try_from(spec.cpus).unwrap_or(u8::MAX),
            kernel: KernelImage::BzImage(spec.kernel.clone()),
            initramfs: Some(spec.initramfs.clone()),
            cmdline: spec.cmdline.clone(),
            console_log: spec.console_log.clone(),
            time_limit: TIME_LIMIT,
            seccomp: Some(crate::confine::OnViolation::KillProcess),
        };
        let vm = kvm::Vm::start(config, vmm_end).map_err(|e| VmError::Backend {
            message: format!("own VMM: {e}"),
        })?;
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
