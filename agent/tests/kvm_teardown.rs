//! 100 VMs created and torn down in a loop leave the process's fd count, thread count
//! and RSS where they started. Alone in its own test binary so no other test's threads
//! or fds move the counts.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use agent::vm::kvm::{guests, KernelImage, ShutdownCause, Vm, VmConfig, VmExit};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn one_vm(dir: &tempfile::TempDir) {
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = VmConfig {
        mem_bytes: 2 << 20,
        vcpus: 2,
        kernel: KernelImage::RealMode(guests::touch_memory()),
        initramfs: None,
        cmdline: String::new(),
        console_log: dir.path().join("console.log"),
        time_limit: Duration::from_secs(20),
    };
    let vm = Vm::start(config, guest).unwrap();
    let mut line = String::new();
    BufReader::new(host).read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    assert_eq!(vm.wait(), VmExit::Shutdown(ShutdownCause::I8042Reset));
}

#[test]
fn a_hundred_vms_leave_no_fd_thread_or_memory_behind() {
    let dir = tempfile::tempdir().unwrap();
    // Warm up: the first VMs install the signal handler and grow allocator arenas and
    // glibc's thread-stack cache, which are reused afterwards, not leaked.
    for _ in 0..5 {
        one_vm(&dir);
    }
    let (fds, threads, rss) = (count("/proc/self/fd"), count("/proc/self/task"), rss_kib());
    for _ in 0..100 {
        one_vm(&dir);
    }
    let (fds_after, threads_after, rss_after) =
        (count("/proc/self/fd"), count("/proc/self/task"), rss_kib());
    assert_eq!(fds_after, fds, "file descriptors");
    assert_eq!(threads_after, threads, "threads");
    // Each VM's guest wrote 576 KiB of its memory: leaking it would add ~56 MiB here.
    // Allow a few MiB for allocator noise.
    assert!(
        rss_after < rss + 6 * 1024,
        "RSS grew from {rss} KiB to {rss_after} KiB over 100 VMs"
    );
    eprintln!("fds {fds}, threads {threads}, RSS {rss} KiB → {rss_after} KiB");
}
