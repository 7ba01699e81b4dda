//! The VMM with our own real-mode guests: serial out and in, interrupts, the time limit,
//! the ways a guest shuts down, and the PVM refusal. These run under the PVM flavour of
//! KVM on the build machines as well as under hardware KVM. Every VM here runs confined
//! as a job's does (Landlock to its temporary dir, seccomp with `KillProcess`); two tests
//! check that confinement itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use vm::confine::{self, Enforcement, FsPolicy, OnViolation};
use vm::host::host_is_pvm;
use vm::kvm::{
    self, guests, ConfinedCheck, KernelImage, KvmError, ShutdownCause, VmConfig, VmExit,
};
use vm::kvm_backend::KvmMachine;
use vm::{Machine, MachineSpec};

/// Bound on any single read from a guest, so a broken VMM fails the test instead of
/// hanging it.
const IO_BOUND: Duration = Duration::from_secs(20);

fn config(dir: &tempfile::TempDir, program: Vec<u8>, limit: Duration) -> VmConfig {
    VmConfig {
        mem_bytes: 2 << 20,
        vcpus: 1,
        kernel: KernelImage::RealMode(program),
        initramfs: None,
        cmdline: String::new(),
        console_log: dir.path().join("console.log"),
        time_limit: limit,
        seccomp: Some(OnViolation::KillProcess),
        landlock: Some(FsPolicy {
            read: vec![],
            write: vec![dir.path().to_owned()],
        }),
        confined_check: None,
    }
}

fn start(
    program: Vec<u8>,
    limit: Duration,
) -> (vm::kvm::RunningVm, BufReader<UnixStream>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(IO_BOUND)).unwrap();
    let vm = kvm::start(config(&dir, program, limit), guest).unwrap();
    (vm, BufReader::new(host), dir)
}

#[test]
fn guest_line_reaches_the_host_and_console_reaches_the_log() {
    let (vm, mut host, dir) = start(
        guests::hello("hello from the guest\n", "console says hi\n"),
        IO_BOUND,
    );
    let mut line = String::new();
    host.read_line(&mut line).unwrap();
    assert_eq!(line, "hello from the guest\n");
    assert_eq!(
        vm.wait(),
        VmExit::Shutdown(ShutdownCause::HaltedInterruptsOff)
    );
    let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    let (enforcement, _, _) = confine::expected_landlock();
    let landlock = match enforcement {
        Enforcement::Fully => "landlock: fully enforced",
        Enforcement::Partially => "landlock: partially enforced",
        Enforcement::Not => "landlock: not enforced",
    };
    let mut lines = log.lines();
    assert_eq!(
        lines.next(),
        Some("[provider: seccomp filters on the vCPU and VMM threads (a forbidden syscall kills the process)]"),
        "{log:?}"
    );
    assert!(
        lines.next().is_some_and(|l| l.starts_with(&format!(
            "[provider: on the VMM and vCPU threads, {landlock}"
        ))),
        "{log:?}"
    );
    assert_eq!(lines.next(), Some("console says hi"), "{log:?}");
    assert!(
        log.contains("[provider: VM stopped: guest shut down (HaltedInterruptsOff)]"),
        "{log:?}"
    );
    // The VM is gone: the channel reads end-of-file.
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn host_line_goes_in_and_comes_back_transformed_via_the_uart_interrupt() {
    let (vm, mut host, _dir) = start(guests::echo_upper(), IO_BOUND);
    let mut line = String::new();
    host.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    // Longer than the UART's 64-byte FIFO, so the VMM has to hold bytes back until the
    // guest drains it.
    let sent: String = (0..300)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect::<String>()
        + " kvm!\n";
    host.get_mut().write_all(sent.as_bytes()).unwrap();
    let mut back = String::new();
    host.read_line(&mut back).unwrap();
    assert_eq!(back, sent.to_uppercase());
    assert_eq!(
        vm.wait(),
        VmExit::Shutdown(ShutdownCause::HaltedInterruptsOff)
    );
}

#[test]
fn spinning_guest_is_stopped_within_a_second_of_its_deadline() {
    let limit = Duration::from_millis(700);
    let started = Instant::now();
    let (vm, _host, dir) = start(guests::spin(), limit);
    let exit = vm.wait();
    let took = started.elapsed();
    assert_eq!(exit, VmExit::TimeLimit);
    assert!(took >= limit, "stopped early: {took:?}");
    assert!(
        took < limit + Duration::from_secs(1),
        "stopped {:?} after the deadline",
        took - limit
    );
    let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(log.contains("time limit reached"), "{log:?}");
}

#[test]
fn triple_fault_is_a_shutdown() {
    let (vm, _host, _dir) = start(guests::triple_fault(), IO_BOUND);
    assert_eq!(vm.wait(), VmExit::Shutdown(ShutdownCause::TripleFault));
}

#[test]
fn i8042_reset_is_a_shutdown() {
    let (vm, _host, _dir) = start(guests::i8042_reset(), IO_BOUND);
    assert_eq!(vm.wait(), VmExit::Shutdown(ShutdownCause::I8042Reset));
}

#[test]
fn kill_stops_a_running_guest() {
    let (vm, _host, _dir) = start(guests::spin(), Duration::from_secs(120));
    let handle = vm.handle();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!vm.is_finished());
    handle.kill();
    assert_eq!(vm.wait(), VmExit::Killed);
    // Killing a VM that is gone is harmless.
    handle.kill();
}

#[test]
fn guest_blocked_on_a_host_that_never_reads_is_still_torn_down() {
    // The guest writes to COM2 without end and the host never reads: once the socket
    // buffer is full the vCPU blocks in `send`, and the time limit must still stop it.
    let limit = Duration::from_millis(500);
    let started = Instant::now();
    let (vm, _host, _dir) = start(guests::flood(), limit);
    assert_eq!(vm.wait(), VmExit::TimeLimit);
    assert!(
        started.elapsed() < limit + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn linux_on_pvm_fails_fast_naming_pvm_and_qemu() {
    if !host_is_pvm() {
        eprintln!("SKIP: /dev/kvm here is not PVM, so there is no refusal to test");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Any bzImage-shaped file will do: the refusal comes before the kernel is read. The
    // Debian cloud kernel is used when PROVIDER_TEST_KERNEL points at it.
    let kernel = std::env::var_os("PROVIDER_TEST_KERNEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("vmlinuz"));
    if !kernel.exists() {
        std::fs::write(&kernel, [0u8; 8192]).unwrap();
    }
    let (_host, guest) = UnixStream::pair().unwrap();
    let cfg = VmConfig {
        mem_bytes: 256 << 20,
        kernel: KernelImage::BzImage(kernel),
        cmdline: vm::kvm::DEFAULT_CMDLINE.into(),
        ..config(&dir, Vec::new(), Duration::from_secs(30))
    };
    let started = Instant::now();
    let err = kvm::start(cfg, guest).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, KvmError::PvmCannotBootLinux), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("PVM") && msg.contains("--vmm qemu"), "{msg}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// The errno of a failed open, 0 if it succeeded.
fn open_errno(r: std::io::Result<std::fs::File>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// The open attempts the confined-thread test makes, with their errno (0: it opened).
fn probe_opens(dir: &Path, who: &str) -> Vec<(String, i32)> {
    let job = dir.join("job");
    let write = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p)
    };
    vec![
        (
            format!("{who}: read the kernel"),
            open_errno(std::fs::File::open(dir.join("kernel"))),
        ),
        (
            format!("{who}: create in the job dir"),
            open_errno(write(&job.join(format!("{who}.probe")))),
        ),
        (
            format!("{who}: read a file outside"),
            open_errno(std::fs::File::open(dir.join("outside"))),
        ),
        (
            format!("{who}: read /etc/passwd"),
            open_errno(std::fs::File::open("/etc/passwd")),
        ),
        (
            format!("{who}: create outside the job dir"),
            open_errno(write(&dir.join(format!("{who}.escape")))),
        ),
        (
            format!("{who}: write the kernel"),
            open_errno(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("kernel")),
            ),
        ),
        (
            format!("{who}: open /dev/kvm again"),
            open_errno(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm"),
            ),
        ),
    ]
}

#[test]
fn confined_vmm_thread_opens_only_the_job_dir_and_its_inputs() {
    if confine::kernel_landlock_abi() == 0 {
        eprintln!("SKIP: this kernel has no Landlock, so nothing confines the VMM thread");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir(&job).unwrap();
    std::fs::write(dir.path().join("kernel"), b"k").unwrap();
    std::fs::write(dir.path().join("outside"), b"o").unwrap();
    let (tx, rx) = mpsc::channel();
    let root = dir.path().to_owned();
    // Runs on the VMM thread after Landlock and before seccomp; it also starts a thread,
    // as the VMM thread starts the vCPU threads, to show that they inherit the domain.
    let check = ConfinedCheck(Arc::new(move || {
        let mut got = probe_opens(&root, "vmm");
        let child_root = root.clone();
        got.extend(
            std::thread::spawn(move || probe_opens(&child_root, "child"))
                .join()
                .unwrap(),
        );
        let _ = tx.send(got);
    }));
    let privs_before = thread_privs();
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(IO_BOUND)).unwrap();
    let cfg = VmConfig {
        console_log: job.join("console.log"),
        landlock: Some(FsPolicy::for_vmm_job(
            &dir.path().join("kernel"),
            None,
            &job,
        )),
        confined_check: Some(check),
        ..config(&dir, guests::hello("up\n", "console\n"), IO_BOUND)
    };
    let vm = kvm::start(cfg, guest).unwrap();
    let report = vm.confinement().landlock.clone().unwrap();
    assert_ne!(report.enforcement, Enforcement::Not, "{report}");
    // The guest still runs with its threads confined.
    let mut line = String::new();
    BufReader::new(host).read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    assert_eq!(
        vm.wait(),
        VmExit::Shutdown(ShutdownCause::HaltedInterruptsOff)
    );
    let got = rx.recv_timeout(IO_BOUND).unwrap();
    eprintln!("{report}: {got:?}");
    for (what, errno) in &got {
        let allowed = what.ends_with("read the kernel") || what.ends_with("in the job dir");
        let want = if allowed { 0 } else { libc::EACCES };
        assert_eq!(*errno, want, "{what}: {got:?}");
    }
    assert_eq!(got.len(), 14, "{got:?}");
    // Nothing leaked onto this (the agent's) thread: it still opens and creates outside
    // the job dir.
    assert!(std::fs::File::open(dir.path().join("outside")).is_ok());
    assert!(std::fs::File::open("/etc/passwd").is_ok());
    assert!(std::fs::File::create(dir.path().join("after")).is_ok());
    // Nor did no_new_privs or seccomp (both per thread too).
    assert_eq!(thread_privs(), privs_before);
}

/// This thread's `NoNewPrivs` and `Seccomp` lines from `/proc`.
fn thread_privs() -> Vec<String> {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("NoNewPrivs:") || l.starts_with("Seccomp:"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn job_confinement_txt_states_landlock_and_seccomp() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job");
    std::fs::create_dir(&job).unwrap();
    let spec = MachineSpec {
        kernel: dir.path().join("vmlinuz"),
        initramfs: dir.path().join("initramfs.cpio.gz"),
        cmdline: String::new(),
        mem_mib: 2,
        cpus: 1,
        job_dir: job.clone(),
        console_log: job.join("console.log"),
        disks: Vec::new(),
        runtime: Default::default(),
    };
    // The policy names them, so they must exist; the guest is ours, not Linux.
    std::fs::write(&spec.kernel, b"k").unwrap();
    std::fs::write(&spec.initramfs, b"i").unwrap();
    let mut machine =
        KvmMachine::launch_image(&spec, KernelImage::RealMode(guests::hello("up\n", ""))).unwrap();
    let host = machine.take_channel().unwrap();
    host.set_read_timeout(Some(IO_BOUND)).unwrap();
    let mut line = String::new();
    BufReader::new(host).read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    assert!(machine.wait_timeout(IO_BOUND).unwrap().is_some());
    let text = std::fs::read_to_string(job.join("confinement.txt")).unwrap();
    eprintln!("{text}");
    let (enforcement, abi, _) = confine::expected_landlock();
    let landlock = match enforcement {
        Enforcement::Fully => {
            format!("landlock: fully enforced (kernel ABI {abi}), no_new_privs: yes\n")
        }
        Enforcement::Partially => format!("landlock: partially enforced (kernel ABI {abi};"),
        Enforcement::Not => {
            eprintln!("SKIP (landlock part): this kernel has no Landlock");
            "landlock: not enforced".to_owned()
        }
    };
    assert!(text.starts_with(&landlock), "{text}");
    assert!(
        text.contains("landlock applies to: the VMM thread and its 1 vCPU thread(s)"),
        "{text}"
    );
    for kind in ["vCPU threads", "VMM thread"] {
        assert!(
            text.contains(&format!(
                "seccomp ({kind}): filter installed (a forbidden syscall kills the process)"
            )),
            "{text}"
        );
    }
}
