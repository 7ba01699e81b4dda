//! What this host offers for running VMs, and which backend `--vmm auto` picks.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::{find_guest_agent, find_kernel, Accel, Vmm};

/// Where `/sys` shows the PVM flavour of KVM is loaded.
pub const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Evidence about PVM (paravirtual KVM) on a host: the one probe behind `--vmm auto`'s
/// choice, `--vmm kvm`'s refusal and the own VMM's refusal to start Linux.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PvmProbe {
    /// The PVM module's `/sys` directory exists.
    pub module_loaded: bool,
    /// `KVM_GET_MSR_INDEX_LIST` lists one of PVM's own MSRs (0x4b564df0..=0x4b564dff).
    /// Measured on our PVM hosts: it does not, so this alone cannot rule PVM out.
    pub pvm_msr_listed: bool,
    /// The hypervisor CPUID signature KVM reports (reads `KVMKVMKVM` under PVM too).
    pub cpuid_signature: Option<String>,
}

impl PvmProbe {
    /// Looks for PVM: the module at `module`, and (if the KVM device `dev` opens) its MSRs
    /// and the CPUID signature.
    pub fn detect(dev: &Path, module: &Path) -> Self {
        let module_loaded = module.exists();
        let (pvm_msr_listed, cpuid_signature) = match open_kvm(dev) {
            Some(kvm) => (
                lists_pvm_msr(&kvm),
                kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .ok()
                    .and_then(|c| cpuid_signature(c.as_slice())),
            ),
            None => (false, None),
        };
        PvmProbe {
            module_loaded,
            pvm_msr_listed,
            cpuid_signature,
        }
    }

    /// True if any evidence says PVM.
    pub fn is_pvm(&self) -> bool {
        self.module_loaded || self.pvm_msr_listed
    }
}

/// True if the KVM at `dev` is PVM: the same evidence as [`PvmProbe::detect`], cheaply
/// (one `stat`, plus the MSR list when the module is not loaded).
pub fn is_pvm(dev: &Path, module: &Path) -> bool {
    module.exists() || open_kvm(dev).is_some_and(|kvm| lists_pvm_msr(&kvm))
}

/// True if this host's `/dev/kvm` is PVM.
pub fn host_is_pvm() -> bool {
    is_pvm(Path::new(KVM_DEVICE), Path::new(PVM_MODULE_PATH))
}

const KVM_DEVICE: &str = "/dev/kvm";

fn open_kvm(dev: &Path) -> Option<kvm_ioctls::Kvm> {
    let path = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()).ok()?;
    kvm_ioctls::Kvm::new_with_path(path).ok()
}

fn lists_pvm_msr(kvm: &kvm_ioctls::Kvm) -> bool {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().iter().any(|i| is_pvm_msr(*i)))
        .unwrap_or(false)
}

/// True if `index` is one of PVM's MSRs.
pub fn is_pvm_msr(index: u32) -> bool {
    (0x4b56_4df0..=0x4b56_4dff).contains(&index)
}

/// Reads the KVM CPUID signature (leaf 0x4000_0000: ebx, ecx, edx) from a supported
/// CPUID list.
pub fn cpuid_signature(entries: &[kvm_bindings::kvm_cpuid_entry2]) -> Option<String> {
    let e = entries.iter().find(|e| e.function == 0x4000_0000)?;
    let bytes: Vec<u8> = [e.ebx, e.ecx, e.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_owned(),
    )
}

/// KVM as seen from user space.
#[derive(Debug, Clone, Serialize)]
pub struct KvmInfo {
    /// `/dev/kvm` exists.
    pub present: bool,
    /// It can be opened read-write by this user.
    pub accessible: bool,
    /// The kernel's KVM is PVM ([`PvmProbe::is_pvm`]): a stock Linux guest kernel does not
    /// boot under it.
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
        let kvm = detect_kvm(Path::new(KVM_DEVICE), Path::new(PVM_MODULE_PATH));
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
        pvm: is_pvm(dev, pvm_module),
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

    #[test]
    fn pvm_msr_range_and_cpuid_signature() {
        assert!(is_pvm_msr(0x4b56_4df0));
        assert!(!is_pvm_msr(0x4b56_4d01), "kvmclock MSRs are plain KVM");
        let e = kvm_bindings::kvm_cpuid_entry2 {
            function: 0x4000_0000,
            ebx: u32::from_le_bytes(*b"KVMK"),
            ecx: u32::from_le_bytes(*b"VMKV"),
            edx: u32::from_le_bytes(*b"M\0\0\0"),
            ..Default::default()
        };
        assert_eq!(cpuid_signature(&[e]).as_deref(), Some("KVMKVMKVM"));
    }
}
