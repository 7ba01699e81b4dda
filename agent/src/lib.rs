//! The provider (package `provider`, directory `agent/`): its state (the data dir, the
//! audit log, the image store), the market and the jobs, the daemon that wires them to the
//! network, the VMs and the egress proxy (the crates `net`, `vm`, `egress`), the operator
//! CLI (`provider`), and the requestor CLI (`requestor`), its counterpart on the same wire.
//!
//! Modules depend on each other in one direction only, from the front ends down to the
//! leaves; [`LAYERS`] lists the order and a test holds every module to it (see
//! `docs/architecture.md`). Between crates, Cargo holds the direction.
//!
//! No `unsafe` here: the VMM, the confinement glue and the QEMU child's `pre_exec` hook
//! are in the `vm` crate.
#![forbid(unsafe_code)]

pub mod activity;
pub mod audit;
pub mod cli;
pub mod daemon;
pub mod images;
pub mod market;
pub mod requestor;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testsupport;
pub mod units;

/// The crate's modules from the leaves up: each may use only modules before it (the test
/// helpers, `testsupport`, are exempt).
pub const LAYERS: &[&str] = &[
    "units",
    "store",
    "images",
    "audit",
    "market",
    "activity",
    "daemon",
    "cli",
    "requestor",
];

#[cfg(test)]
mod layering {
    use std::path::{Path, PathBuf};

    fn sources(path: &Path, out: &mut Vec<PathBuf>) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                sources(&e.unwrap().path(), out);
            }
        } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_owned());
        }
    }

    /// The modules `module`'s sources name as `crate::<module>`.
    fn uses(module: &str) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src.join(module), &mut files);
        sources(&src.join(format!("{module}.rs")), &mut files);
        assert!(!files.is_empty(), "no sources for module {module}");
        let mut found: Vec<String> = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let name: String = text[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module && !found.contains(&name) {
                    found.push(name);
                }
            }
        }
        found
    }

    #[test]
    fn every_module_uses_only_the_layers_below_it() {
        let mut back_edges = Vec::new();
        for (at, module) in super::LAYERS.iter().enumerate() {
            for used in uses(module) {
                if used == "testsupport" {
                    continue;
                }
                match super::LAYERS.iter().position(|m| *m == used) {
                    Some(below) if below < at => {}
                    _ => back_edges.push(format!("{module} -> {used}")),
                }
            }
        }
        assert!(
            back_edges.is_empty(),
            "uses against the layering: {back_edges:?}"
        );
    }

    #[test]
    fn every_module_is_layered() {
        let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs"))
            .unwrap();
        for line in lib.lines() {
            if let Some(name) = line
                .strip_prefix("pub mod ")
                .and_then(|l| l.strip_suffix(';'))
            {
                assert!(
                    name == "testsupport" || super::LAYERS.contains(&name),
                    "module {name} is not in LAYERS"
                );
            }
        }
    }
}
