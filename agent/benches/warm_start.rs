//! `cargo bench -p provider --bench warm_start`: job start (image → first byte of a
//! command's output) on the disk path, cold boot against a restore of the warm-start
//! snapshot (`vm::warm`), rounds interleaved so load from elsewhere hits both alike; with
//! the breakdown of the warm path (prepare, restore, agent setup to ready, first command),
//! for guest RAM copied from the migration stream and mapped from a file (private
//! copy-on-write per job). Needs what `vm_boot` needs.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provider::images::ImageStore;
use provider::store::DataDir;
use vm::qemu::QemuOptions;
use vm::warm::{RamMode, SnapshotInputs, SnapshotStore};
use vm::{Backend, RunSpec, Vm};

const ROUNDS: usize = 5;

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

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
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

#[derive(Default)]
struct Warm {
    prepare: Duration,
    restore: Duration,
    ready: Duration,
    first_byte: Duration,
    /// Resident memory of the restored QEMU (RSS, anonymous, file-backed) once ready.
    rss: (u64, u64, u64),
    /// The guest's own line: reseed, + disks probed, + disks mounted (ms since the identity).
    guest: Option<(u64, u64, u64)>,
}

/// The restored guest's `reseed A ms, disks probed B ms, disks mounted C ms` console line.
fn guest_phases(console: &Path) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(console).ok()?;
    let line = text.lines().find(|l| l.contains("disks mounted"))?;
    let num = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.trim_start().split(' ').next()?.parse().ok()
    };
    Some((num("reseed")?, num("disks probed")?, num("disks mounted")?))
}

/// `VmRSS`, `RssAnon`, `RssFile` of `pid` in KiB.
fn rss(pid: Option<u32>) -> (u64, u64, u64) {
    let Some(pid) = pid else { return (0, 0, 0) };
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("RssAnon:"), get("RssFile:"))
}

fn warm_round(
    snaps: &SnapshotStore,
    inputs: &SnapshotInputs,
    files: &vm::GuestFiles,
    disk: &vm::rootfs::DiskImage,
    opts: &QemuOptions,
    round: usize,
) -> Warm {
    let job = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let snap = snaps.open(inputs).unwrap();
    let spec = vm::disk_machine(files, disk, 1 << 30, 512, 1, job.path()).unwrap();
    let prepare = start.elapsed();
    let (machine, times) = snap
        .restore(&spec, opts, &format!("bench-{round}"))
        .unwrap_or_else(|e| panic!("restore ({:?}): {e}", inputs.ram));
    let pid = machine.pid();
    let guest = Vm::boot(machine, Duration::from_secs(60), vm::refuse_streams()).unwrap();
    let ready = start.elapsed();
    let first_byte = echo(&guest, start);
    let rss = rss(pid);
    guest.shutdown(Duration::from_secs(20)).unwrap();
    let guest = guest_phases(&job.path().join("console.log"));
    Warm {
        guest,
        prepare,
        restore: times.restore,
        ready: ready - prepare - times.restore,
        first_byte,
        rss,
    }
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
    let opts = QemuOptions {
        binary: q.path.clone(),
        accel: choice.accel,
        sandbox: q.sandbox,
    };
    let backend = Backend::Qemu(opts.clone());
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
    let store = ImageStore::new(&DataDir::new(dir.path().join("data")));
    let stored = store.fetch(image.to_str().unwrap(), None).unwrap();
    let disk = store.disk_image(&stored, 1 << 30).unwrap();
    let snaps = SnapshotStore::new(dir.path().join("data/snapshots"));
    println!(
        "warm_start: {} ({}), kernel {}, 512 MiB, 1 vCPU, {ROUNDS} rounds; load average {}",
        choice.reason,
        q.version,
        kernel.display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let modes = [RamMode::Stream, RamMode::SharedFile];
    let mut inputs = Vec::new();
    for ram in modes {
        let i = SnapshotInputs {
            files: files.clone(),
            mem_mib: 512,
            cpus: 1,
            qemu: opts.clone(),
            ram,
        };
        let mark = Instant::now();
        let snap = snaps.build(&i, Duration::from_secs(180)).unwrap();
        let build = mark.elapsed();
        let size = |f: &str| {
            std::fs::metadata(snap.dir.join(f))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0) as f64
                / 1e6
        };
        // The build hashed the files under their temp dir's path, so this hashes them again,
        // as the first check after a daemon start does.
        let mark = Instant::now();
        let _ = snaps.open(&i).unwrap();
        let verify_cached = mark.elapsed();
        println!(
            "snapshot ({ram:?}): built in {}, state {:.1} MB, ram file {:.1} MB on disk; \
             first open (hashes every file) {}",
            ms(build),
            size("state"),
            size("ram"),
            ms(verify_cached)
        );
        inputs.push(i);
    }

    let mut cold = Vec::new();
    let mut warm: Vec<Vec<Warm>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        let job = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let spec = vm::disk_machine(&files, &disk, 1 << 30, 512, 1, job.path()).unwrap();
        let guest = Vm::boot(
            backend.launch(&spec).unwrap(),
            Duration::from_secs(180),
            vm::refuse_streams(),
        )
        .unwrap();
        cold.push(echo(&guest, start));
        guest.shutdown(Duration::from_secs(20)).unwrap();
        for (m, i) in inputs.iter().enumerate() {
            warm[m].push(warm_round(&snaps, i, &files, &disk, &opts, round));
        }
    }
    println!("{:<56} {:>10}", "median", "");
    println!(
        "{:<56} {:>10}",
        "cold: job start → first byte of `echo`",
        ms(median(cold))
    );
    for (m, ram) in modes.iter().enumerate() {
        let w = &warm[m];
        let med = |f: fn(&Warm) -> Duration| ms(median(w.iter().map(f).collect()));
        println!(
            "{:<56} {:>10}",
            format!("warm ({ram:?}): job start → first byte of `echo`"),
            med(|w| w.first_byte)
        );
        println!(
            "{:<56} {:>10}",
            "  open snapshot (hashes cached), initramfs, writable layer",
            med(|w| w.prepare)
        );
        println!(
            "{:<56} {:>10}",
            "  QEMU start → restored VM running",
            med(|w| w.restore)
        );
        println!(
            "{:<56} {:>10}",
            "  agent: reseed, virtio_blk, mounts → ready",
            med(|w| w.ready)
        );
        let phases: Vec<(u64, u64, u64)> = w.iter().filter_map(|x| x.guest).collect();
        if !phases.is_empty() {
            let med = |f: fn(&(u64, u64, u64)) -> u64| {
                let mut v: Vec<u64> = phases.iter().map(f).collect();
                v.sort();
                v[v.len() / 2]
            };
            println!(
                "{:<56} {:>10}",
                "    guest: reseed / +disks probed / +disks mounted (ms)",
                format!("{} / {} / {}", med(|p| p.0), med(|p| p.1), med(|p| p.2))
            );
        }
        let (r, a, f) = w[w.len() / 2].rss;
        println!(
            "{:<56} {:>10}",
            "  QEMU resident once ready (RSS / anon / file, MiB)",
            format!("{} / {} / {}", r / 1024, a / 1024, f / 1024)
        );
    }
    let all: Vec<String> = warm
        .iter()
        .zip(modes)
        .map(|(w, m)| {
            format!(
                "{m:?} [{}]",
                w.iter()
                    .map(|x| format!("{:.0}", x.first_byte.as_secs_f64() * 1000.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
        .collect();
    println!("every round (ms): {}", all.join("; "));
}
