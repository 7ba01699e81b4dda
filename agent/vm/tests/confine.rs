//! Landlock and seccomp cannot be undone, so each test re-runs this test binary as a
//! child (selected by `CONFINE_CHILD`) that confines itself and probes, and the parent
//! checks how the child ended.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use vm::confine::{self, Enforcement, FsPolicy, OnViolation};

/// Exit code a child uses to say "the kernel has no Landlock".
const NO_LANDLOCK: i32 = 77;

fn child(test: &str, mode: &str, dir: &Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("CONFINE_CHILD", mode)
        .env("CONFINE_DIR", dir)
        .output()
        .unwrap()
}

fn child_mode() -> Option<(String, std::path::PathBuf)> {
    let mode = std::env::var("CONFINE_CHILD").ok()?;
    Some((mode, std::env::var_os("CONFINE_DIR").unwrap().into()))
}

fn errno_of(ret: libc::c_long) -> i32 {
    if ret >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap()
    }
}

#[test]
fn landlocked_child_opens_only_its_allowed_files() {
    if let Some((_, dir)) = child_mode() {
        let allowed = dir.join("kernel");
        let job = dir.join("job");
        let outside = dir.join("outside");
        let report = confine::landlock_self(&FsPolicy {
            read: vec![allowed.clone()],
            write: vec![job.clone()],
        })
        .unwrap();
        println!("{report}");
        if report.enforcement == Enforcement::Not {
            std::process::exit(NO_LANDLOCK);
        }
        let denied = |r: std::io::Result<std::fs::File>| {
            r.err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES)
        };
        assert!(std::fs::File::open(&allowed).is_ok(), "read the kernel");
        assert!(denied(std::fs::File::open(&outside)), "read outside");
        assert!(
            denied(std::fs::File::open("/etc/passwd")),
            "read /etc/passwd"
        );
        assert!(
            std::fs::File::create(job.join("console.log")).is_ok(),
            "write in the job dir"
        );
        assert!(
            denied(std::fs::File::create(dir.join("escape"))),
            "write outside"
        );
        assert!(
            denied(std::fs::OpenOptions::new().write(true).open(&allowed)),
            "write the kernel"
        );
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kernel"), b"k").unwrap();
    std::fs::write(dir.path().join("outside"), b"o").unwrap();
    std::fs::create_dir(dir.path().join("job")).unwrap();
    let out = child(
        "landlocked_child_opens_only_its_allowed_files",
        "landlock",
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.code() == Some(NO_LANDLOCK) {
        eprintln!("SKIP: this kernel has no Landlock, nothing to enforce: {stdout}");
        return;
    }
    assert!(
        out.status.success(),
        "child: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("landlock: fully enforced")
            || stdout.contains("landlock: partially enforced"),
        "{stdout}"
    );
}

#[test]
fn vcpu_filter_fails_forbidden_syscalls_and_passes_kvm_ones() {
    if child_mode().is_some() {
        // In a thread of its own, as a vCPU thread is: the filter does not allow
        // exit_group, so the main thread (unfiltered) is the one that exits.
        let got = std::thread::spawn(|| {
            confine::apply_to_this_thread(&confine::vcpu_filter(OnViolation::Errno).unwrap())
                .unwrap();
            // SAFETY: (a test) raw syscalls with valid or deliberately invalid arguments; none
            // touches memory we do not own.
            // errno is read right after each call: the next call overwrites it.
            unsafe {
                [
                    errno_of(libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/hostname".as_ptr(),
                        libc::O_RDONLY,
                    )),
                    errno_of(libc::syscall(libc::SYS_ioctl, 0, libc::TCGETS, 0)),
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, confine::KVM_RUN, 0)),
                    // KVM_CREATE_VCPU: a KVM request the vCPU loop never makes.
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0xae41u64, 0)),
                ]
            }
        })
        .join()
        .unwrap();
        println!("errnos {got:?}");
        // openat and non-KVM ioctls are refused; KVM_RUN passes the filter and fails on
        // the bad fd; other KVM ioctls (creating vCPUs) are refused too.
        let expected = [libc::EPERM, libc::EPERM, libc::EBADF, libc::EPERM];
        std::process::exit(if got == expected { 0 } else { 1 });
    }
    let dir = tempfile::tempdir().unwrap();
    let out = child(
        "vcpu_filter_fails_forbidden_syscalls_and_passes_kvm_ones",
        "errno",
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn vcpu_filter_kills_the_process_on_a_forbidden_syscall() {
    if child_mode().is_some() {
        let _ = std::thread::spawn(|| {
            confine::apply_to_this_thread(&confine::vcpu_filter(OnViolation::KillProcess).unwrap())
                .unwrap();
            // SAFETY: (a test) getppid has no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
        })
        .join();
        std::process::exit(0); // not reached if the filter works
    }
    let dir = tempfile::tempdir().unwrap();
    let out = child(
        "vcpu_filter_kills_the_process_on_a_forbidden_syscall",
        "kill",
        dir.path(),
    );
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
}

#[test]
fn qemu_child_is_landlocked_and_limited() {
    if std::env::var_os("CONFINE_CHILD").is_some() {
        return; // only the parent runs this one
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir(&job).unwrap();
    std::fs::write(dir.path().join("secret"), b"s").unwrap();
    let sh = Path::new("/bin/sh");
    let policy = FsPolicy::for_qemu_job(sh, sh, None, &job);
    // Stand-in for QEMU: a shell that reports what it can do.
    let script = format!(
        "cat {secret} >/dev/null 2>&1 && echo secret-read || echo secret-denied; \
         echo x > {job}/out && echo job-write; ulimit -n; ulimit -c; \
         grep NoNewPrivs /proc/self/status >/dev/null 2>&1 && echo proc-read || echo proc-denied",
        secret = dir.path().join("secret").display(),
        job = job.display()
    );
    let mut cmd = Command::new(sh);
    cmd.args(["-c", &script]);
    let report = confine::confine_command(
        &mut cmd,
        &policy,
        confine::Rlimits {
            address_space: 4 << 30,
            open_files: 64,
        },
    )
    .unwrap();
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("job-write\n64\n0\n"), "{stdout}");
    if report.enforcement == Enforcement::Not {
        eprintln!("SKIP (landlock part): {report}");
        return;
    }
    assert!(stdout.contains("secret-denied"), "{stdout}");
    assert!(stdout.contains("proc-denied"), "{stdout}");
}

/// `seccomp = strict`'s deny filter: a namespace or a ptrace fails in the child, an ordinary
/// program still runs; `minimal` Landlock reads no program but the one it runs.
#[test]
fn strict_seccomp_and_minimal_landlock_take_away_what_default_leaves() {
    if std::env::var_os("CONFINE_CHILD").is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir(&job).unwrap();
    let script =
        "/usr/bin/unshare --user /bin/true 2>/dev/null && echo unshared || echo unshare-denied; \
                  cat /usr/bin/unshare >/dev/null 2>&1 && echo other-read || echo other-denied";
    let run = |strict: bool, scope: vm::runtime::FsScope| {
        let sh = Path::new("/bin/sh");
        let mut cmd = Command::new(sh);
        cmd.args(["-c", script]);
        let policy = FsPolicy::for_qemu_scope(scope, sh, sh, None, &job);
        let extra = confine::Extra {
            cgroup_procs: Vec::new(),
            filter: strict.then(|| confine::vmm_deny_filter().unwrap()),
        };
        let limits = confine::Rlimits {
            address_space: 4 << 30,
            open_files: 64,
        };
        confine::confine_command_with(&mut cmd, policy.as_ref(), limits, extra).unwrap();
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    if !Path::new("/usr/bin/unshare").exists() {
        eprintln!("SKIP: no /usr/bin/unshare");
        return;
    }
    let loose = run(false, vm::runtime::FsScope::Off);
    assert!(
        loose.contains("unshared") && loose.contains("other-read"),
        "{loose}"
    );
    let strict = run(true, vm::runtime::FsScope::Off);
    assert!(strict.contains("unshare-denied"), "{strict}");
    if confine::expected_landlock().0 != Enforcement::Not {
        // `job-dir` reads /usr; `minimal` only the libraries and firmware.
        let job_dir = run(false, vm::runtime::FsScope::JobDir);
        assert!(job_dir.contains("other-read"), "{job_dir}");
        let minimal = run(false, vm::runtime::FsScope::Minimal);
        assert!(minimal.contains("other-denied"), "{minimal}");
    }
}
