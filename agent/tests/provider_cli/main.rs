//! The `provider` binary as an operator runs it: it starts and describes itself
//! (here), serves one manifest's egress proxy (`egress_serve`), and refuses `--vmm kvm`
//! where KVM is PVM (`vmm_kvm`). One test binary; also what makes `cargo test
//! --workspace` build the binaries the `tests` crate drives.

mod egress_serve;
mod vmm_kvm;

use std::process::Command;

#[test]
fn help_lists_the_operator_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["keystore", "rule", "whitelist", "manifest"] {
        assert!(text.contains(cmd), "{cmd} missing from --help: {text}");
    }
}

#[test]
fn no_subcommand_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
