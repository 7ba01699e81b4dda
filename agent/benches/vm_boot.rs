//! `cargo bench -p provider --bench vm_boot`: time from `vm run` start to the first byte of a
//! command's output, by phase, beside the floor on this machine (the same kernel booting a
//! busybox init that writes one byte to ttyS1 and powers off), rounds interleaved so load
//! from elsewhere hits both alike; then the channel's guest→host throughput.
//!
//! Needs what the VM tests need (QEMU, the kernel from scripts/fetch-guest-kernel.sh,
//! busybox-static) and the static guest agent (built here when missing).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provider::images::ImageStore;
use provider::store::DataDir;
use vm::initramfs::{self, Header, NewcWriter};
use vm::qemu::QemuOptions;
use vm::{Backend, MachineSpec, RunSpec, Vm};

const ROUNDS: usize = 5;
const THROUGHPUT_BYTES: u64 = 2 * 1024 * 1024;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn guest_agent() -> PathBuf {
    if let Ok(p) = vm::find_guest_agent(None) {
        return p;
    }
    let target = workspace().join("target/guest");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            "guest",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(st.success(), "building provider-guest failed");
    target.join("x86_64-unknown-linux-gnu/release/provider-guest")
}

fn floor_initramfs(out: &Path) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let init = b"#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\necho x > /dev/ttyS1\n/bin/busybox poweroff -f\n";
    let mut w = NewcWriter::new(std::io::BufWriter::new(std::fs::File::create(out).unwrap()));
    let h = |name, mode| Header {
        name,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        rdev: (0, 0),
    };
    w.entry(&h("dev", 0o040755), &[]).unwrap();
    w.entry(&h("bin", 0o040755), &[]).unwrap();
    w.entry(&h("bin/busybox", 0o100755), &busybox).unwrap();
    w.entry(&h("init", 0o100755), init).unwrap();
    w.finish().unwrap();
}

struct Ours {
    hash: Duration,
    initramfs: Duration,
    boot: Duration,
    command: Duration,
    first_byte: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kernel = vm::find_kernel(None).expect("guest kernel (scripts/fetch-guest-kernel.sh)");
    let info = vm::HostInfo::detect();
    let q = info.qemu.clone().expect("qemu-system-x86_64");
    let choice = info.auto.clone().expect("a backend");
    let backend = Backend::Qemu(QemuOptions {
        binary: q.path.clone(),
        accel: choice.accel,
        sandbox: q.sandbox,
    });
    let agent = guest_agent();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busybox.tar");
    let st = Command::new(workspace().join("scripts/make-test-image.sh"))
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = std::fs::read(&image).unwrap();
    let hex: String = openssl::hash::hash(openssl::hash::MessageDigest::sha3_256(), &bytes)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let hash = policies::manifest::PayloadHash::parse(&format!("sha3:{hex}")).unwrap();
    let floor_cpio = dir.path().join("floor.cpio");
    floor_initramfs(&floor_cpio);
    println!(
        "vm_boot: {} ({}), kernel {}, {ROUNDS} rounds",
        choice.reason,
        q.version,
        kernel.display()
    );

    let mut floors = Vec::new();
    let mut ours = Vec::new();
    let mut throughput = None;
    for round in 0..ROUNDS {
        // Floor: spawn → first byte on the channel.
        let job = tempfile::tempdir().unwrap();
        let spec = MachineSpec {
            kernel: kernel.clone(),
            initramfs: floor_cpio.clone(),
            cmdline: vm::CMDLINE.into(),
            mem_mib: 512,
            cpus: 1,
            job_dir: job.path().to_owned(),
            console_log: job.path().join("console.log"),
        };
        let start = Instant::now();
        let mut m = backend.launch(&spec).unwrap();
        let mut ch = m.take_channel().unwrap();
        let mut b = [0u8; 1];
        ch.read_exact(&mut b).unwrap();
        floors.push(start.elapsed());
        m.wait_timeout(Duration::from_secs(30)).unwrap();
        m.kill().unwrap();

        // Ours: fresh store (the hash is checked), initramfs, boot, `echo`.
        let job = tempfile::tempdir().unwrap();
        let store = ImageStore::new(&DataDir::new(job.path().join("data")));
        let start = Instant::now();
        let img = store.fetch(image.to_str().unwrap(), Some(&hash)).unwrap();
        let t_hash = start.elapsed();
        let initrd = job.path().join("initramfs.cpio");
        let mark = Instant::now();
        initramfs::build(&initrd, &agent, &img.path).unwrap();
        let t_initramfs = mark.elapsed();
        let spec = MachineSpec {
            initramfs: initrd,
            job_dir: job.path().to_owned(),
            console_log: job.path().join("console.log"),
            ..spec
        };
        let mark = Instant::now();
        let machine = backend.launch(&spec).unwrap();
        let guest = Vm::boot(machine, Duration::from_secs(180), vm::refuse_streams()).unwrap();
        let t_boot = mark.elapsed();
        let mark = Instant::now();
        let mut first = FirstByte { at: None, start };
        guest
            .run(
                &RunSpec::new(["/bin/echo", "hello"]),
                &mut first,
                &mut std::io::sink(),
            )
            .unwrap();
        let t_cmd = mark.elapsed();
        ours.push(Ours {
            hash: t_hash,
            initramfs: t_initramfs,
            boot: t_boot,
            command: t_cmd,
            first_byte: first.at.expect("output"),
        });
        if round == ROUNDS - 1 {
            let mut count = Count(0);
            let mark = Instant::now();
            guest
                .run(
                    &RunSpec::new([
                        "/bin/head",
                        "-c",
                        &THROUGHPUT_BYTES.to_string(),
                        "/dev/urandom",
                    ]),
                    &mut count,
                    &mut std::io::sink(),
                )
                .unwrap();
            assert_eq!(count.0, THROUGHPUT_BYTES);
            throughput =
                Some(THROUGHPUT_BYTES as f64 / (1024.0 * 1024.0) / mark.elapsed().as_secs_f64());
        }
        guest.shutdown(Duration::from_secs(20)).unwrap();
    }

    let floor = median(floors.clone());
    let fb = median(ours.iter().map(|o| o.first_byte).collect());
    println!("{:<34} {:>10}", "phase (median)", "time");
    println!(
        "{:<34} {:>10}",
        "hash check (sha3-256, file)",
        ms(median(ours.iter().map(|o| o.hash).collect()))
    );
    println!(
        "{:<34} {:>10}",
        "initramfs build",
        ms(median(ours.iter().map(|o| o.initramfs).collect()))
    );
    println!(
        "{:<34} {:>10}",
        "launch + boot to agent ready",
        ms(median(ours.iter().map(|o| o.boot).collect()))
    );
    println!(
        "{:<34} {:>10}",
        "command (echo) to its exit",
        ms(median(ours.iter().map(|o| o.command).collect()))
    );
    println!("{:<34} {:>10}", "vm run start → first byte", ms(fb));
    println!(
        "{:<34} {:>10}",
        "floor: busybox init → first byte",
        ms(floor)
    );
    println!(
        "overhead above the floor: {:+.1}% (target ≤ 10%); floors {:?}, ours {:?}",
        (fb.as_secs_f64() / floor.as_secs_f64() - 1.0) * 100.0,
        floors.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ours.iter().map(|o| ms(o.first_byte)).collect::<Vec<_>>()
    );
    if let Some(t) = throughput {
        println!(
            "channel guest→host: {t:.2} MiB/s ({} MiB of /dev/urandom)",
            THROUGHPUT_BYTES >> 20
        );
    }
}

struct FirstByte {
    at: Option<Duration>,
    start: Instant,
}

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.at.is_none() && !buf.is_empty() {
            self.at = Some(self.start.elapsed());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
