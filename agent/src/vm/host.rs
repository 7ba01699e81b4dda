//! What this host offers for running VMs, and which backend `--vmm auto` picks.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::{find_guest_agent, find_kernel, Accel, Vmm};

/// KVM as seen from user space.
#[derive(Debug, Clone, Serialize)]
pub struct KvmInfo {
    /// `/dev/kvm` exists.
    pub present: bool,
    /// It can be opened read-write by this user.
    pub accessible: bool,
    /// The kernel's KVM is PVM (`/sys/module/kvm_pvm` exists): a stock Linux guest kernel
    /// does not boot under it.
    pub pvm: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct QemuInfo {
    pub path: PathBuf,
    /// First line of `-version`, e.g. `QEMU emulator version 7.2.x`.
    pub version: String,
    /// `-sandbox` (seccomp) is compiled in.
    pub sandbox: bool,
}

/// The backend `auto` chose and why.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub vmm: Vmm,
    pub accel: Accel,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub kvm: KvmInfo,
    pub qemu: Option<QemuInfo>,
    pub kernel: Option<PathBuf>,
    pub guest_agent: Option<PathBuf>,
    /// `None` when no backend can run a Linux guest here.
    pub auto: Option<Choice>,
}

impl HostInfo {
    pub fn detect() -> Self {
        let kvm = detect_kvm(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"));
        let qemu = detect_qemu(&qemu_binary());
        let auto = choose(&kvm, qemu.as_ref());
        HostInfo {
            kvm,
            qemu,
            kernel: find_kernel(None).ok(),
            guest_agent: find_guest_agent(None).ok(),
            auto,
        }
    }
}

/// `$PROVIDER_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("PROVIDER_QEMU")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

pub fn detect_kvm(dev: &Path, pvm_module: &Path) -> KvmInfo {
    let present = dev.exists();
    let accessible = present
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .is_ok();
    KvmInfo {
        present,
        accessible,
        pvm: pvm_module.exists(),
    }
}

pub fn detect_qemu(bin: &Path) -> Option<QemuInfo> {
    let out = Command::new(bin).arg("-version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let help = Command::new(bin).arg("-help").output().ok()?;
    let sandbox = String::from_utf8_lossy(&help.stdout).contains("-sandbox");
    let path = if bin.components().count() > 1 {
        bin.to_owned()
    } else {
        which(bin).unwrap_or_else(|| bin.to_owned())
    };
    Some(QemuInfo {
        path,
        version,
        sandbox,
    })
}

fn which(name: &Path) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// For a Linux guest: QEMU with KVM where KVM boots a stock kernel, else QEMU with TCG.
pub fn choose(kvm: &KvmInfo, qemu: Option<&QemuInfo>) -> Option<Choice> {
    qemu?;
    Some(if kvm.accessible && !kvm.pvm {
        Choice {
            vmm: Vmm::Qemu,
            accel: Accel::Kvm,
            reason: "QEMU with KVM: /dev/kvm is usable and is not PVM".into(),
        }
    } else if kvm.pvm {
        Choice {
            vmm: Vmm::Qemu,
            accel: Accel::Tcg,
            reason: "QEMU with TCG: this host's KVM is PVM (/sys/module/kvm_pvm), which does not boot a stock Linux kernel".into(),
        }
    } else if kvm.present {
        Choice {
            vmm: Vmm::Qemu,
            accel: Accel::Tcg,
            reason: "QEMU with TCG: /dev/kvm exists but this user cannot open it".into(),
        }
    } else {
        Choice {
            vmm: Vmm::Qemu,
            accel: Accel::Tcg,
            reason: "QEMU with TCG: no /dev/kvm".into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu() -> QemuInfo {
        QemuInfo {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: "QEMU emulator version 7.2.0".into(),
            sandbox: true,
        }
    }

    #[test]
    fn pvm_forces_tcg_and_hardware_kvm_is_used() {
        let pvm = KvmInfo {
            present: true,
            accessible: true,
            pvm: true,
        };
        let c = choose(&pvm, Some(&qemu())).unwrap();
        assert_eq!((c.vmm, c.accel), (Vmm::Qemu, Accel::Tcg));
        assert!(c.reason.contains("PVM"), "{}", c.reason);

        let hw = KvmInfo { pvm: false, ..pvm };
        assert_eq!(choose(&hw, Some(&qemu())).unwrap().accel, Accel::Kvm);

        let none = KvmInfo {
            present: false,
            accessible: false,
            pvm: false,
        };
        assert_eq!(choose(&none, Some(&qemu())).unwrap().accel, Accel::Tcg);
        assert!(choose(&hw, None).is_none());
    }

    #[test]
    fn detection_reads_the_given_paths() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let module = dir.path().join("kvm_pvm");
        let k = detect_kvm(&dev, &module);
        assert!(!k.present && !k.accessible && !k.pvm);
        std::fs::write(&dev, b"").unwrap();
        std::fs::create_dir(&module).unwrap();
        let k = detect_kvm(&dev, &module);
        assert!(k.present && k.accessible && k.pvm);
        assert!(detect_qemu(&dir.path().join("no-such-qemu")).is_none());
    }
}
