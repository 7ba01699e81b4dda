//! `provider vm run --vmm kvm` on a host whose KVM is PVM: refused at once, with the reason
//! and the way out, before any image is fetched or VM built.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn vmm_kvm_on_a_pvm_host_fails_fast_naming_pvm() {
    if !Path::new(vm::host::PVM_MODULE_PATH).exists() {
        eprintln!(
            "skipped: {} does not exist, this host's KVM is not PVM",
            vm::host::PVM_MODULE_PATH
        );
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "vm",
            "run",
            "--vmm",
            "kvm",
            "--image",
            "file:///nonexistent/image.tar",
            "--",
            "/bin/true",
        ])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("PVM"), "{stderr}");
    assert!(stderr.contains("--vmm qemu"), "{stderr}");
    // The image path does not exist: the refusal came before any fetch.
    assert!(!stderr.contains("nonexistent"), "{stderr}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(
        std::fs::read_dir(data.path()).unwrap().next().is_none(),
        "nothing may be written for a refused job"
    );
}
