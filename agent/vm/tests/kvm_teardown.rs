//! 100 VMs created and torn down in a loop leave the process's fd count, thread count,
//! virtual size and RSS where they started. Alone in its own test binary so no other test's threads
//! or fds move the counts.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm::confine::{FsPolicy, OnViolation};
use vm::kvm::{self, guests, KernelImage, ShutdownCause, VmConfig, VmExit};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const GUEST_MEM: u64 = 64 << 20;
const VMS: usize = 100;
/// VMs in flight at once: most of a teardown is the kernel waiting for RCU grace
/// periods, so overlapping them keeps this test to a few seconds.
const IN_FLIGHT: usize = 4;

fn one_vm(dir: &tempfile::TempDir) {
    let (host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = VmConfig {
        mem_bytes: GUEST_MEM,
        vcpus: 2,
        kernel: KernelImage::RealMode(guests::touch_memory(1)),
        initramfs: None,
        cmdline: String::new(),
        console_log: dir.path().join("console.log"),
        time_limit: Duration::from_secs(20),
        seccomp: Some(OnViolation::KillProcess),
        // As jobs are: Landlock's ruleset fd must be closed and its per-thread domain
        // must not keep anything alive once the VM's threads are gone.
        landlock: Some(FsPolicy {
            read: vec![],
            write: vec![dir.path().to_owned()],
        }),
        confined_check: None,
    };
    let vm = kvm::start(config, guest).unwrap();
    let mut line = String::new();
    BufReader::new(host).read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    assert_eq!(vm.wait(), VmExit::Shutdown(ShutdownCause::I8042Reset));
}

fn snapshot() -> (usize, usize, u64, u64) {
    (
        count("/proc/self/fd"),
        count("/proc/self/task"),
        status_kib("VmSize:"),
        status_kib("VmRSS:"),
    )
}

fn run_vms(n: usize, dir: &tempfile::TempDir) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..IN_FLIGHT {
            s.spawn(|| {
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n {
                    one_vm(dir);
                }
            });
        }
    });
}

#[test]
fn a_hundred_vms_leave_no_fd_thread_or_memory_behind() {
    let dir = tempfile::tempdir().unwrap();
    // Warm up: the first VMs install the signal handler, cache CPUID and grow allocator
    // arenas and glibc's thread-stack cache, which are reused afterwards, not leaked.
    run_vms(2 * IN_FLIGHT, &dir);
    let (fds, threads, size, rss) = snapshot();
    run_vms(VMS, &dir);
    // A thread that has just been joined can linger in /proc for a moment (at either
    // snapshot), so give the count a bounded while to settle. Leaked VMs would add three
    // threads each (VMM + two vCPUs) that never go away.
    let mut after = snapshot();
    for _ in 0..200 {
        if after.1 <= threads {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        after = snapshot();
    }
    let (fds_after, threads_after, size_after, rss_after) = after;
    eprintln!(
        "fds {fds} → {fds_after}, threads {threads} → {threads_after}, \
         VmSize {size} → {size_after} KiB, VmRSS {rss} → {rss_after} KiB"
    );
    assert_eq!(fds_after, fds, "file descriptors");
    assert!(
        threads_after <= threads,
        "threads: {threads} → {threads_after}"
    );
    // A leaked guest mapping would add 64 MiB of address space per VM.
    assert!(
        size_after < size + GUEST_MEM / 1024,
        "address space grew from {size} KiB to {size_after} KiB over {VMS} VMs"
    );
    // Each guest wrote 64 KiB of its memory: leaking it would add 6.4 MiB of RSS.
    assert!(
        rss_after < rss + 3 * 1024,
        "RSS grew from {rss} KiB to {rss_after} KiB over {VMS} VMs"
    );
}
