//! The VMM with our own real-mode guests: serial out and in, interrupts, the time limit,
//! the ways a guest shuts down, and the PVM refusal. These run under the PVM flavour of
//! KVM on the build machines as well as under hardware KVM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent::confine::OnViolation;
use agent::vm::kvm::{
    guests, host_is_pvm, Error, KernelImage, ShutdownCause, Vm, VmConfig, VmExit,
};

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
    }
}

fn start(
    program: Vec<u8>,
    limit: Duration,
) -> (
    agent::vm::kvm::RunningVm,
    BufReader<UnixStream>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(IO_BOUND)).unwrap();
    let vm = Vm::start(config(&dir, program, limit), guest).unwrap();
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
    assert!(
        log.starts_with("[provider: seccomp filters on the vCPU and VMM threads (a forbidden syscall kills the process)]\nconsole says hi\n"),
        "{log:?}"
    );
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
        cmdline: agent::vm::kvm::DEFAULT_CMDLINE.into(),
        ..config(&dir, Vec::new(), Duration::from_secs(30))
    };
    let started = Instant::now();
    let err = Vm::start(cfg, guest).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::PvmCannotBootLinux), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("PVM") && msg.contains("--vmm qemu"), "{msg}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
