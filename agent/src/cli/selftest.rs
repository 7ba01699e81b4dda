//! `provider self-test`: can this host run the daemon for real? Checks the data dir, the
//! operator's files, the hardware profile and presets, KVM, QEMU, the guest kernel and
//! agent, and the host kernel's confinement features; says what is missing and how to
//! fix it. Exit 0 when the daemon can run jobs here, 1 when something it needs is missing.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::daemon::DaemonConfig;
use crate::market::pricing::Presets;
use crate::market::profile::{HardwareProfile, HostCapacity};
use vm::host::HostInfo;

#[derive(Debug, Args)]
pub struct SelfTestArgs {
    /// The daemon's settings file, checked as `provider run --config` would.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    #[serde(rename = "ok")]
    Pass,
    /// Works, but not as well as it could.
    Warn,
    /// Jobs cannot run (or the daemon cannot start) until fixed.
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Level,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(
    check: &'static str,
    status: Level,
    detail: impl Into<String>,
    fix: Option<&str>,
) -> Check {
    Check {
        check,
        status,
        detail: detail.into(),
        fix: fix.map(String::from),
    }
}

fn writable(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    tempfile::tempfile_in(dir)
        .map(drop)
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))
}

pub fn run(ctx: &Ctx, args: SelfTestArgs) -> anyhow::Result<Outcome> {
    use Level::*;
    let mut out = Vec::new();
    let data = &ctx.data;
    let root = data.root();
    out.push(match writable(root) {
        Ok(()) => check("data dir", Pass, root.display().to_string(), None),
        Err(e) => check(
            "data dir",
            Fail,
            e,
            Some("pass --data-dir DIR (or PROVIDER_DATA_DIR) to a directory this user owns"),
        ),
    });
    let cfg = match DaemonConfig::from_file(args.config.as_deref()) {
        Ok(c) => {
            out.push(check(
                "settings",
                Pass,
                args.config
                    .as_ref()
                    .map_or("defaults (no --config)".into(), |p| p.display().to_string()),
                None,
            ));
            c
        }
        Err(e) => {
            out.push(check(
                "settings",
                Fail,
                e,
                Some("fix the file; docs/daemon.md lists every key"),
            ));
            DaemonConfig::default()
        }
    };
    let key = root.join("identity.key");
    out.push(match std::fs::metadata(&key) {
        Err(_) => check(
            "identity key",
            Pass,
            "none yet: created (0600) on the first run",
            None,
        ),
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt as _;
            if m.permissions().mode() & 0o077 == 0 {
                check("identity key", Pass, key.display().to_string(), None)
            } else {
                check(
                    "identity key",
                    Fail,
                    format!("{} is readable by group or others", key.display()),
                    Some(&format!("chmod 600 {}", key.display())),
                )
            }
        }
    });
    out.push(match data.load_keystore() {
        Ok(k) if k.is_empty() => check(
            "keystore",
            Warn,
            "no trusted certificates: signed (audited-payload) demands cannot verify",
            Some("provider keystore add CA.pem"),
        ),
        Ok(k) => check("keystore", Pass, format!("{} certificates", k.len()), None),
        Err(e) => check(
            "keystore",
            Fail,
            e.to_string(),
            Some("remove or fix the file named; `provider keystore list`"),
        ),
    });
    out.push(match data.load_judge() {
        Ok(_) => check("rules and whitelist", Pass, "load", None),
        Err(e) => check(
            "rules and whitelist",
            Fail,
            e.to_string(),
            Some("fix the file named (the daemon refuses to start with it)"),
        ),
    });
    match HostCapacity::detect(root) {
        Err(e) => out.push(check("hardware profile", Fail, e.to_string(), None)),
        Ok(host) => out.push(match HardwareProfile::load(data) {
            Ok(p) => {
                let (p, source) = match p {
                    Some(p) => (p, "profile.json"),
                    None => (
                        HardwareProfile::default_for(&host, cfg.max_jobs.unwrap_or(2)),
                        "default",
                    ),
                };
                match p.check_host(&host) {
                    Ok(()) => check(
                        "hardware profile",
                        Pass,
                        format!(
                            "{} threads, {} GiB, {} GiB, {} jobs ({source})",
                            p.cpu_threads, p.mem_gib, p.storage_gib, p.max_jobs
                        ),
                        None,
                    ),
                    Err(e) => check(
                        "hardware profile",
                        Fail,
                        e.to_string(),
                        Some("provider profile set …"),
                    ),
                }
            }
            Err(e) => check(
                "hardware profile",
                Fail,
                e.to_string(),
                Some("provider profile set … rewrites it"),
            ),
        }),
    }
    out.push(
        match Presets::load(data).and_then(|p| p.offered(cfg.preset.as_deref())) {
            Ok(p) => check("preset", Pass, format!("offers `{}`", p.name), None),
            Err(e) => check(
                "preset",
                Fail,
                e.to_string(),
                Some("provider preset list / create"),
            ),
        },
    );
    let info = HostInfo::detect();
    out.push(if !info.kvm.present {
        check(
            "kvm",
            Warn,
            "/dev/kvm is missing: VMs run under QEMU TCG, many times slower",
            Some("load kvm_intel or kvm_amd; enable virtualization in the firmware"),
        )
    } else if !info.kvm.accessible {
        check(
            "kvm",
            Warn,
            "/dev/kvm is not accessible to this user",
            Some("add the user to group kvm, or run the unit with SupplementaryGroups=kvm"),
        )
    } else if info.kvm.pvm {
        check(
            "kvm",
            Warn,
            "KVM is PVM: a stock guest kernel does not boot under it; QEMU TCG is used",
            None,
        )
    } else {
        check("kvm", Pass, "/dev/kvm", None)
    });
    let kvm_ok = info.kvm.present && info.kvm.accessible && !info.kvm.pvm;
    out.push(match &info.qemu {
        Some(q) => check(
            "qemu",
            Pass,
            format!("{} ({})", q.path.display(), q.version),
            None,
        ),
        None => check(
            "qemu",
            if kvm_ok { Warn } else { Fail },
            "qemu-system-x86_64 not found",
            Some("apt-get install qemu-system-x86 (or set PROVIDER_QEMU)"),
        ),
    });
    let kernel = vm::find_kernel(cfg.kernel.as_deref());
    out.push(match &kernel {
        Ok(p) => check("guest kernel", Pass, p.display().to_string(), None),
        Err(e) => check(
            "guest kernel",
            Fail,
            e.to_string(),
            Some("scripts/fetch-guest-kernel.sh, or --kernel PATH"),
        ),
    });
    if let Ok(k) = &kernel {
        out.push(match vm::find_modules(k) {
            Ok(Some(m)) => check("guest kernel modules", Pass, m.display().to_string(), None),
            Ok(None) => check(
                "guest kernel modules",
                Pass,
                "none (PROVIDER_MODULES=none)",
                None,
            ),
            Err(e) => check(
                "guest kernel modules",
                Fail,
                e.to_string(),
                Some("scripts/fetch-guest-kernel.sh puts them beside the kernel"),
            ),
        });
    }
    out.push(match vm::find_guest_agent(cfg.guest.as_deref()) {
        Ok(p) => check("guest agent", Pass, p.display().to_string(), None),
        Err(e) => check(
            "guest agent",
            Fail,
            e.to_string(),
            Some("build provider-guest (docs/vm.md), or --guest PATH"),
        ),
    });
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    out.push(if lsm.split(',').any(|m| m.trim() == "landlock") {
        check("landlock", Pass, "enabled", None)
    } else {
        check(
            "landlock",
            Warn,
            "not among the active LSMs: the VMM's file confinement is off",
            Some("boot the host with lsm=…,landlock"),
        )
    });
    out.push(
        if Path::new("/proc/sys/kernel/seccomp/actions_avail").exists() {
            check("seccomp", Pass, "available", None)
        } else {
            check("seccomp", Warn, "the kernel has no seccomp filters", None)
        },
    );
    out.push(match vm::Backend::select(cfg.vmm, &info) {
        Ok((_, why)) => check("backend", Pass, why, None),
        Err(e) => check("backend", Fail, e.to_string(), Some("see the checks above")),
    });
    let failed = out.iter().any(|c| c.status == Fail);
    if ctx.json {
        output::json(&serde_json::json!({"ok": !failed, "checks": out}))?;
    } else {
        let mut t = Table::new(&["CHECK", "STATUS", "DETAIL", "FIX"]);
        for c in &out {
            t.row(vec![
                c.check.into(),
                match c.status {
                    Pass => "ok",
                    Warn => "warn",
                    Fail => "FAIL",
                }
                .into(),
                c.detail.clone(),
                c.fix.clone().unwrap_or_default(),
            ]);
        }
        t.print();
        println!(
            "{}",
            if failed {
                "jobs cannot run here until every FAIL is fixed"
            } else {
                "this host can run the daemon and its jobs"
            }
        );
    }
    Ok(if failed {
        Outcome::Rejected
    } else {
        Outcome::Done
    })
}
