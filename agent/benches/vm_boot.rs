//! `cargo bench -p provider --bench vm_boot`: job start (image → first byte of a command's
//! output) on the disk path (the image a read-only squashfs disk, a fresh ext4 writable
//! layer) beside the initramfs path (the rootfs unpacked into the initramfs, as before the
//! disk path), rounds interleaved so load from elsewhere hits both alike; then the
//! channel's throughput: a command's stdout (guest→host) and file transfers both ways.
//!
//! Needs what the VM tests need (QEMU, the kernel and its modules from
//! scripts/fetch-guest-kernel.sh, busybox-static, squashfs-tools, e2fsprogs) and the static
//! guest agent (built here when missing).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provider::images::ImageStore;
use provider::store::DataDir;
use vm::qemu::QemuOptions;
use vm::{initramfs, Backend, MachineSpec, RunSpec, Vm};

const ROUNDS: usize = 5;
const STDOUT_BYTES: u64 = 100 * 1024 * 1024;
const TRANSFER_BYTES: usize = 100 * 1024 * 1024;
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

struct Round {
    prepare: Duration,
    boot: Duration,
    first_byte: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn echo(guest: &Vm, start: Instant) -> Duration {
    let mut first = FirstByte { at: None, start };
    guest
        .run(
            &RunSpec::new(["/bin/echo", "hello"]),
            &mut first,
            &mut std::io::sink(),
        )
        .unwrap();
    first.at.expect("output")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kernel = vm::find_kernel(None).expect("guest kernel (scripts/fetch-guest-kernel.sh)");
    let modules = vm::find_modules(&kernel).expect("guest kernel modules");
    let info = vm::HostInfo::detect();
    let q = info.qemu.clone().expect("qemu-system-x86_64");
    let choice = info.auto.clone().expect("a backend");
    let backend = Backend::Qemu(QemuOptions {
        binary: q.path.clone(),
        accel: choice.accel,
        sandbox: q.sandbox,
    });
    let files = vm::GuestFiles {
        kernel: kernel.clone(),
        modules: modules.clone(),
        agent: guest_agent(),
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("busybox.tar");
    let st = Command::new(workspace().join("scripts/make-test-image.sh"))
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    println!(
        "vm_boot: {} ({}), kernel {}, {ROUNDS} rounds",
        choice.reason,
        q.version,
        kernel.display()
    );

    let mut initramfs_path = Vec::new();
    let mut disk_path = Vec::new();
    let mut convert = None;
    for round in 0..ROUNDS {
        // The initramfs path: the rootfs unpacked into the initramfs (with the modules, for
        // the virtio-serial channel).
        let job = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let initrd = job.path().join("initramfs.cpio");
        initramfs::build(&initrd, &files.agent, &image).unwrap();
        let with_modules = job.path().join("modules.cpio");
        initramfs::build_agent(&with_modules, &files.agent, modules.as_deref()).unwrap();
        // newc archives concatenate: the kernel unpacks one after the other.
        let mut all = std::fs::read(&with_modules).unwrap();
        all.extend(std::fs::read(&initrd).unwrap());
        std::fs::write(&initrd, all).unwrap();
        let prepare = start.elapsed();
        let spec = MachineSpec {
            kernel: kernel.clone(),
            initramfs: initrd,
            cmdline: format!(
                "{} provider.channel={}",
                vm::CMDLINE,
                vm::qemu::CHANNEL_PORT
            ),
            mem_mib: 512,
            cpus: 1,
            job_dir: job.path().to_owned(),
            console_log: job.path().join("console.log"),
            disks: Vec::new(),
            runtime: Default::default(),
        };
        let mark = Instant::now();
        let guest = Vm::boot(
            backend.launch(&spec).unwrap(),
            Duration::from_secs(180),
            vm::refuse_streams(),
        )
        .unwrap();
        let boot = mark.elapsed();
        initramfs_path.push(Round {
            prepare,
            boot,
            first_byte: echo(&guest, start),
        });
        guest.shutdown(Duration::from_secs(20)).unwrap();

        // The disk path: the store's squashfs (converted once, in round 0), a fresh
        // writable layer, the agent's initramfs.
        let job = tempfile::tempdir().unwrap();
        let store = ImageStore::new(&DataDir::new(dir.path().join("data")));
        let stored = store.fetch(image.to_str().unwrap(), None).unwrap();
        let start = Instant::now();
        let disk = store.disk_image(&stored, 1 << 30).unwrap();
        if round == 0 {
            convert = Some(start.elapsed());
        }
        let spec = vm::disk_machine(&files, &disk, 1 << 30, 512, 1, job.path()).unwrap();
        let prepare = start.elapsed();
        let mark = Instant::now();
        let guest = Vm::boot(
            backend.launch(&spec).unwrap(),
            Duration::from_secs(180),
            vm::refuse_streams(),
        )
        .unwrap();
        let boot = mark.elapsed();
        disk_path.push(Round {
            prepare,
            boot,
            first_byte: echo(&guest, start),
        });
        if round == ROUNDS - 1 {
            throughput(&guest, job.path());
        }
        guest.shutdown(Duration::from_secs(20)).unwrap();
    }

    println!(
        "{:<40} {:>14} {:>14}",
        "phase (median)", "initramfs path", "disk path"
    );
    let row = |what: &str, f: fn(&Round) -> Duration| {
        println!(
            "{what:<40} {:>14} {:>14}",
            ms(median(initramfs_path.iter().map(f).collect())),
            ms(median(disk_path.iter().map(f).collect()))
        );
    };
    row("prepare (initramfs / layer + initramfs)", |r| r.prepare);
    row("launch + boot to agent ready", |r| r.boot);
    row("start → first byte of `echo`", |r| r.first_byte);
    if let Some(c) = convert {
        println!("tarball → squashfs, once per image: {}", ms(c));
    }
}

/// Stdout of a command (guest→host) and uploads/downloads of incompressible bytes to the
/// writable layer.
fn throughput(guest: &Vm, job: &Path) {
    let mut count = Count(0);
    let mark = Instant::now();
    guest
        .run(
            &RunSpec::new([
                "/bin/dd",
                "if=/dev/zero",
                "bs=65536",
                &format!("count={}", STDOUT_BYTES / 65536),
            ]),
            &mut count,
            &mut std::io::sink(),
        )
        .unwrap();
    assert_eq!(count.0, STDOUT_BYTES);
    println!(
        "guest→host, a command's stdout (dd, {} MiB): {:.0} MB/s",
        STDOUT_BYTES >> 20,
        mbps(STDOUT_BYTES, mark.elapsed())
    );
    let up = job.join("up.bin");
    let mut data = vec![0u8; TRANSFER_BYTES];
    openssl::rand::rand_bytes(&mut data).unwrap();
    std::fs::write(&up, &data).unwrap();
    for (what, guest_path) in [("tmpfs", "/tmp/up.bin"), ("writable layer", "/up.bin")] {
        let mark = Instant::now();
        guest.upload(&up, guest_path).unwrap();
        println!(
            "host→guest, upload to {what} ({} MiB): {:.0} MB/s",
            TRANSFER_BYTES >> 20,
            mbps(TRANSFER_BYTES as u64, mark.elapsed())
        );
    }
    let down = job.join("down.bin");
    let mark = Instant::now();
    guest.download("/up.bin", &down).unwrap();
    println!(
        "guest→host, download from the writable layer ({} MiB): {:.0} MB/s",
        TRANSFER_BYTES >> 20,
        mbps(TRANSFER_BYTES as u64, mark.elapsed())
    );
    assert!(std::fs::read(&down).unwrap() == data, "download differs");
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
