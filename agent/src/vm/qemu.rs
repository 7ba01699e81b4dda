//! The QEMU backend: `qemu-system-x86_64 -M pc -nodefaults` with the job's kernel and
//! initramfs, `ttyS0` to the job's console log, `ttyS1` to a Unix socket the host listens
//! on (QEMU connects as the client), no network device, `-sandbox on` where compiled in.
//!
//! The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so it dies with the thread that spawned it
//! even if the provider is killed; [`QemuMachine`]'s drop kills and reaps it otherwise.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
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
    console: PathBuf,
    socket: PathBuf,
    exited: Option<String>,
}

/// The full argument list (tests and the docs show it).
pub fn args(spec: &MachineSpec, opts: &QemuOptions, socket: &Path) -> Vec<String> {
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
        spec.cmdline.clone(),
        "-chardev".into(),
        format!("file,id=console,path={}", spec.console_log.display()),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!("socket,id=channel,path={}", socket.display()),
        "-serial".into(),
        "chardev:channel".into(),
    ];
    if opts.sandbox {
        a.push("-sandbox".into());
        a.push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into());
    }
    a
}

impl QemuMachine {
    /// Starts QEMU and waits (up to `connect_timeout`) for it to connect the channel.
    pub fn launch(
        spec: &MachineSpec,
        opts: &QemuOptions,
        connect_timeout: Duration,
    ) -> Result<Self, VmError> {
        let socket = spec.job_dir.join("channel.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|e| VmError::Io {
            action: "listen on",
            path: socket.clone(),
            source: e,
        })?;
        listener.set_nonblocking(true).map_err(|e| VmError::Io {
            action: "configure",
            path: socket.clone(),
            source: e,
        })?;
        let stderr_path = spec.job_dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| VmError::Io {
            action: "create",
            path: stderr_path.clone(),
            source: e,
        })?;
        let mut cmd = Command::new(&opts.binary);
        cmd.args(args(spec, opts, &socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only calls prctl and
        // getppid, which are async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(io::Error::from)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| VmError::Backend {
            message: format!("cannot start {}: {e}", opts.binary.display()),
        })?;
        let deadline = Instant::now() + connect_timeout;
        let channel = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(VmError::Io {
                        action: "accept on",
                        path: socket,
                        source: e,
                    });
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(VmError::Backend {
                    message: format!(
                        "QEMU exited ({status}) before connecting the channel: {}",
                        err.trim()
                    ),
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmError::Backend {
                    message: "QEMU did not connect the channel socket".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        channel.set_nonblocking(false).map_err(|e| VmError::Io {
            action: "configure",
            path: socket.clone(),
            source: e,
        })?;
        Ok(QemuMachine {
            child,
            channel: Some(channel),
            console: spec.console_log.clone(),
            socket,
            exited: None,
        })
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
                let s = status.to_string();
                self.exited = Some(s.clone());
                let _ = std::fs::remove_file(&self.socket);
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
            let _ = std::fs::remove_file(&self.socket);
        }
        Ok(())
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
