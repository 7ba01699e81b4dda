//! The `provider` binary starts and describes itself. (Also what makes `cargo test
//! --workspace` build the binary the `tests` crate drives.)

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
