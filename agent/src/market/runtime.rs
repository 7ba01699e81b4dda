//! Runtime profiles: the confinement a preset's jobs run under, by name.
//!
//! Three are built in (`strict`, `default`, `permissive`); the operator adds more as
//! `<data-dir>/runtime-profiles/<name>.toml` or `<name>.json`, validated with unknown
//! fields refused (a misspelt limit must not silently be no limit). A preset names its
//! profile (`provider preset create … --runtime-profile NAME`); the daemon loads it at
//! start, refuses to start when it is missing or invalid, bounds each job's share by its
//! `memory` and `disk` (a demand asking more is `constraints-unmet`), writes its name and
//! settings into the job's directory and audit line, and the receipt names it.
//!
//! Every other field takes effect on the job's VM ([`RuntimeProfile::limits`], enforced by
//! `vm::runtime`): Landlock scope and seccomp level on the VMM process, `cpu_quota` as
//! the VMM's cgroup CPU quota, `pids_max` as the guest's pids cgroup around the payload,
//! `read_only_rootfs` as a read-only `/` in the guest. A field the host cannot enforce
//! refuses the job (fail closed); `docs/operator.md` (Runtime profiles) has the table.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{DataDir, StoreError};
use crate::units::ByteSize;

/// How far Landlock confines the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LandlockScope {
    /// Read the kernel and the image, write the job's directory only.
    JobDir,
    /// As `job-dir`, but of the host's `/usr` and `/lib*` only the emulator's libraries
    /// and firmware are readable.
    Minimal,
    /// No Landlock ruleset (hosts whose kernel lacks it).
    Off,
}

/// Which system calls the VMM's threads may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompLevel {
    /// `default`, plus a deny filter on the whole VMM process for the kernel interfaces an
    /// emulator never uses (ptrace, BPF, perf, namespaces, mounts, keyrings, io_uring…).
    Strict,
    /// QEMU's `-sandbox on` with every option it has; the own VMM's per-thread allow lists.
    Default,
    /// No filter (a QEMU built without seccomp).
    Off,
}

/// One runtime profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeProfile {
    /// Set from the file name (or the built-in's); not written in the file.
    #[serde(skip)]
    pub name: String,
    pub landlock: LandlockScope,
    pub seccomp: SeccompLevel,
    /// Processes in the guest at once.
    pub pids_max: u32,
    /// Share of each vCPU a job may use, `(0, 1]`.
    pub cpu_quota: f64,
    /// Most memory one job may get (its share is capped by it).
    pub memory: Option<ByteSize>,
    /// Most disk one job may get.
    pub disk: Option<ByteSize>,
    /// The payload's root file system is read-only (writes go to a scratch layer only).
    pub read_only_rootfs: bool,
}

/// Why a runtime profile cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeProfileError {
    #[error("runtime profile name `{0}` must be 1–64 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("no runtime profile `{0}`: not built in (strict, default, permissive) and no runtime-profiles/{0}.toml or .json in the data dir")]
    Unknown(String),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("both runtime-profiles/{0}.toml and {0}.json exist; keep one")]
    Ambiguous(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The built-in profiles' names.
pub const BUILTIN: [&str; 3] = ["strict", "default", "permissive"];

impl RuntimeProfile {
    /// A built-in profile.
    pub fn builtin(name: &str) -> Option<Self> {
        let gib = |n: u64| Some(ByteSize(n << 30));
        let p = match name {
            "strict" => Self {
                name: String::new(),
                landlock: LandlockScope::Minimal,
                seccomp: SeccompLevel::Strict,
                pids_max: 256,
                cpu_quota: 1.0,
                memory: gib(4),
                disk: gib(8),
                read_only_rootfs: true,
            },
            "default" => Self {
                name: String::new(),
                landlock: LandlockScope::JobDir,
                seccomp: SeccompLevel::Default,
                pids_max: 1024,
                cpu_quota: 1.0,
                memory: None,
                disk: None,
                read_only_rootfs: false,
            },
            "permissive" => Self {
                name: String::new(),
                landlock: LandlockScope::JobDir,
                seccomp: SeccompLevel::Default,
                pids_max: 65536,
                cpu_quota: 1.0,
                memory: None,
                disk: None,
                read_only_rootfs: false,
            },
            _ => return None,
        };
        Some(Self {
            name: name.into(),
            ..p
        })
    }

    /// What the VM start path enforces of this profile (memory and disk are enforced by
    /// the market, which caps a job's share by them).
    pub fn limits(&self) -> vm::runtime::RuntimeLimits {
        use vm::runtime::{FsScope, Seccomp};
        vm::runtime::RuntimeLimits {
            profile: self.name.clone(),
            landlock: match self.landlock {
                LandlockScope::Off => FsScope::Off,
                LandlockScope::JobDir => FsScope::JobDir,
                LandlockScope::Minimal => FsScope::Minimal,
            },
            seccomp: match self.seccomp {
                SeccompLevel::Off => Seccomp::Off,
                SeccompLevel::Default => Seccomp::Default,
                SeccompLevel::Strict => Seccomp::Strict,
            },
            pids_max: Some(self.pids_max),
            cpu_quota: Some(self.cpu_quota),
            read_only_rootfs: self.read_only_rootfs,
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.pids_max == 0 {
            return Err("pids_max must be at least 1".into());
        }
        if !(self.cpu_quota.is_finite() && self.cpu_quota > 0.0 && self.cpu_quota <= 1.0) {
            return Err(format!(
                "cpu_quota = {} must be more than 0 and at most 1 (a share of each vCPU)",
                self.cpu_quota
            ));
        }
        for (k, v) in [("memory", self.memory), ("disk", self.disk)] {
            if v.is_some_and(|b| b.bytes() == 0) {
                return Err(format!("{k} must be more than 0 (leave it out for no cap)"));
            }
        }
        Ok(())
    }

    /// Parses a profile file's text (`toml` or `json` by `is_json`), named `name`.
    pub fn parse(name: &str, text: &str, is_json: bool) -> Result<Self, String> {
        let mut p: Self = if is_json {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de)
                .map_err(|e| format!("at {}: {}", e.path(), e.inner()))?
        } else {
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?
        };
        p.check()?;
        p.name = name.into();
        Ok(p)
    }

    fn dir(data: &DataDir) -> PathBuf {
        data.root().join("runtime-profiles")
    }

    /// The profile `name`: the data dir's file, else a built-in.
    pub fn load(data: &DataDir, name: &str) -> Result<Self, RuntimeProfileError> {
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && name != "."
            && name != "..";
        if !ok_name {
            return Err(RuntimeProfileError::BadName(name.into()));
        }
        let dir = Self::dir(data);
        let toml_path = dir.join(format!("{name}.toml"));
        let json_path = dir.join(format!("{name}.json"));
        let (path, is_json) = match (toml_path.exists(), json_path.exists()) {
            (true, true) => return Err(RuntimeProfileError::Ambiguous(name.into())),
            (true, false) => (toml_path, false),
            (false, true) => (json_path, true),
            (false, false) => {
                return Self::builtin(name).ok_or_else(|| RuntimeProfileError::Unknown(name.into()))
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        Self::parse(name, &text, is_json)
            .map_err(|message| RuntimeProfileError::Invalid { path, message })
    }

    /// Every profile: the built-ins, then the data dir's (which may replace a built-in).
    pub fn all(data: &DataDir) -> Result<Vec<Self>, RuntimeProfileError> {
        let mut names: Vec<String> = BUILTIN.iter().map(|s| s.to_string()).collect();
        if let Ok(dir) = std::fs::read_dir(Self::dir(data)) {
            let mut found: Vec<String> = dir
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let stem = n
                        .strip_suffix(".toml")
                        .or_else(|| n.strip_suffix(".json"))?;
                    (!n.starts_with('.')).then(|| stem.to_owned())
                })
                .collect();
            found.sort();
            for n in found {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names.iter().map(|n| Self::load(data, n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_validated_and_unknown_fields_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("runtime-profiles")).unwrap();
        let toml = r#"
landlock = "job-dir"
seccomp = "strict"
pids_max = 64
cpu_quota = 0.5
memory = "1G"
read_only_rootfs = true
"#;
        std::fs::write(dir.path().join("runtime-profiles/tight.toml"), toml).unwrap();
        let p = RuntimeProfile::load(&data, "tight").unwrap();
        assert_eq!(
            (p.name.as_str(), p.pids_max, p.memory),
            ("tight", 64, Some(ByteSize(1 << 30)))
        );
        assert_eq!(p.disk, None);

        std::fs::write(
            dir.path().join("runtime-profiles/typo.json"),
            r#"{"landlock":"job-dir","seccomp":"default","pids_max":1,"cpu_quota":1,"read_only_rootfs":false,"pid_max":5}"#,
        )
        .unwrap();
        let e = RuntimeProfile::load(&data, "typo").unwrap_err().to_string();
        assert!(e.contains("pid_max") && e.contains("typo.json"), "{e}");
        let bad = toml.replace("cpu_quota = 0.5", "cpu_quota = 2");
        std::fs::write(dir.path().join("runtime-profiles/over.toml"), bad).unwrap();
        let e = RuntimeProfile::load(&data, "over").unwrap_err().to_string();
        assert!(e.contains("cpu_quota"), "{e}");
        let wrong = toml.replace("\"strict\"", "\"paranoid\"");
        std::fs::write(dir.path().join("runtime-profiles/enum.toml"), wrong).unwrap();
        assert!(RuntimeProfile::load(&data, "enum").is_err());

        assert_eq!(RuntimeProfile::load(&data, "strict").unwrap().pids_max, 256);
        assert!(matches!(
            RuntimeProfile::load(&data, "nope"),
            Err(RuntimeProfileError::Unknown(_))
        ));
        assert!(matches!(
            RuntimeProfile::load(&data, "../x"),
            Err(RuntimeProfileError::BadName(_))
        ));
        // The VM start path gets every field.
        let strict = RuntimeProfile::load(&data, "strict").unwrap().limits();
        assert_eq!(
            (
                strict.landlock,
                strict.seccomp,
                strict.pids_max,
                strict.read_only_rootfs
            ),
            (
                vm::runtime::FsScope::Minimal,
                vm::runtime::Seccomp::Strict,
                Some(256),
                true
            )
        );
        let t = p.limits();
        assert_eq!((t.profile.as_str(), t.cpu_quota), ("tight", Some(0.5)));
        let permissive = RuntimeProfile::builtin("permissive").unwrap().limits();
        assert!(
            !permissive.read_only_rootfs && permissive.seccomp == vm::runtime::Seccomp::Default
        );
        // Listing stops at the first invalid file, naming it.
        assert!(RuntimeProfile::all(&data).is_err());
    }
}
