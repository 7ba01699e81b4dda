//! How fast the own VMM turns a VM around: create → the guest's first byte on COM2 →
//! teardown, with the real-mode `first_byte` guest (one `out` to COM2, then halt).
//!
//! Run with `cargo bench -p vm --bench kvm_cycle`. The whole process is pinned to one
//! CPU. Two passes of 200 VMs each:
//! - sequential: one VM at a time, timing each phase (median and p99);
//! - pipelined: four VMs in flight at once on that one CPU. Most of a KVM teardown is
//!   the kernel waiting for RCU grace periods, not computing, so VMs/s on one core is
//!   the figure with the waits overlapped.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm::confine::{FsPolicy, OnViolation};
use vm::kvm::{self, guests, KernelImage, VmConfig, VmExit};

const RUNS: usize = 200;
const IN_FLIGHT: usize = 4;

struct Sample {
    to_first_byte: Duration,
    teardown: Duration,
    total: Duration,
}

fn cycle(console: &std::path::Path) -> Sample {
    let (host, guest) = UnixStream::pair().expect("socketpair");
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let config = VmConfig {
        mem_bytes: 2 << 20,
        vcpus: 1,
        kernel: KernelImage::RealMode(guests::first_byte()),
        initramfs: None,
        cmdline: String::new(),
        console_log: console.to_owned(),
        time_limit: Duration::from_secs(10),
        seccomp: Some(OnViolation::KillProcess),
        // Confined as a job is, so the figures include applying Landlock.
        landlock: Some(FsPolicy {
            read: vec![],
            write: console
                .parent()
                .map(|d| vec![d.to_owned()])
                .unwrap_or_default(),
        }),
        confined_check: None,
    };
    let t0 = Instant::now();
    let vm = kvm::start(config, guest).expect("VM start");
    let mut byte = [0u8; 1];
    (&host).read_exact(&mut byte).expect("first COM2 byte");
    assert_eq!(byte[0], b'!');
    let t1 = Instant::now();
    let exit = vm.kill();
    let t2 = Instant::now();
    assert!(
        matches!(exit, VmExit::Killed | VmExit::Shutdown(_)),
        "{exit:?}"
    );
    Sample {
        to_first_byte: t1 - t0,
        teardown: t2 - t1,
        total: t2 - t0,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn pin_to_one_cpu() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_getcpu only touch
    // that local set; sched_setaffinity(0, …) applies to the calling thread and is
    // inherited by every thread spawned afterwards.
    unsafe {
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            panic!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        cpu
    }
}

fn main() {
    let cpu = pin_to_one_cpu();
    let dir = tempfile::tempdir().expect("tempdir");
    let console = dir.path().join("console.log");
    println!("kvm VM cycle: real-mode first_byte guest, 2 MiB, 1 vCPU, pinned to CPU {cpu}");
    for _ in 0..10 {
        cycle(&console); // warm-up: signal handler, CPUID cache, allocator
    }

    let started = Instant::now();
    let samples: Vec<Sample> = (0..RUNS).map(|_| cycle(&console)).collect();
    let elapsed = started.elapsed();
    let report = |name: &str, mut v: Vec<Duration>| {
        v.sort();
        println!(
            "  {name:<28} median {:>10}   p99 {:>10}",
            ms(pct(&v, 0.5)),
            ms(pct(&v, 0.99))
        );
    };
    println!("sequential, {RUNS} runs:");
    report(
        "create → first COM2 byte",
        samples.iter().map(|s| s.to_first_byte).collect(),
    );
    report(
        "first byte → torn down",
        samples.iter().map(|s| s.teardown).collect(),
    );
    report(
        "create → torn down",
        samples.iter().map(|s| s.total).collect(),
    );
    println!(
        "  VMs/s one at a time           {:.1}",
        RUNS as f64 / elapsed.as_secs_f64()
    );

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let next = next.clone();
            let console = console.clone();
            std::thread::spawn(move || {
                let mut firsts = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < RUNS {
                    firsts.push(cycle(&console).to_first_byte);
                }
                firsts
            })
        })
        .collect();
    let firsts: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    let elapsed = started.elapsed();
    println!("pipelined, {IN_FLIGHT} in flight on one CPU, {RUNS} runs:");
    report("create → first COM2 byte", firsts);
    println!(
        "  VMs/s on one core             {:.1}",
        RUNS as f64 / elapsed.as_secs_f64()
    );
}
