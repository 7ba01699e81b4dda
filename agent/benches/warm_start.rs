//! `cargo bench -p provider --bench warm_start`: job start (image → first byte of a
//! command's output) on the disk path, cold boot against a restore of the warm-start
//! snapshot (`vm::warm`), rounds interleaved so load from elsewhere hits both alike; with
//! the breakdown of the warm path (prepare, restore, hot-plug, agent setup to ready, first
//! command). Needs what `vm_boot` needs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provider::images::ImageStore;
use provider::store::DataDir;
use vm::qemu::QemuOptions;
use vm::warm::{SnapshotInputs, SnapshotStore};
use vm::{Backend, RunSpec, Vm};

const ROUNDS: usize = 7;

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
    hotplug: Duration,
    ready: Duration,
    first_byte: Duration,
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
    let inputs = SnapshotInputs {
        files: files.clone(),
        mem_mib: 512,
        cpus: 1,
        qemu: opts.clone(),
    };
    let snaps = SnapshotStore::new(dir.path().join("data/snapshots"));
    let mark = Instant::now();
    let snap = snaps.build(&inputs, Duration::from_secs(180)).unwrap();
    let build = mark.elapsed();
    let state = std::fs::metadata(snap.dir.join("state")).unwrap().len();
    let mark = Instant::now();
    let _ = snaps.open(&inputs).unwrap();
    let verify_cached = mark.elapsed();
    println!(
        "warm_start: {} ({}), kernel {}, 512 MiB, 1 vCPU, {ROUNDS} rounds; load average {}",
        choice.reason,
        q.version,
        kernel.display(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "snapshot: built in {}, state stream {:.0} MB; open (hashes cached) {}",
        ms(build),
        state as f64 / 1e6,
        ms(verify_cached)
    );

    let mut cold = Vec::new();
    let mut warm = Vec::new();
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

        let job = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let snap = snaps.open(&inputs).unwrap();
        let disks = vm::job_disks(&disk, 1 << 30, job.path()).unwrap();
        let spec = vm::MachineSpec {
            kernel: kernel.clone(),
            initramfs: PathBuf::new(),
            cmdline: String::new(),
            mem_mib: 512,
            cpus: 1,
            job_dir: job.path().to_owned(),
            console_log: job.path().join("console.log"),
            disks,
        };
        let prepare = start.elapsed();
        let (machine, times) = snap
            .restore(&spec, &opts, &format!("bench-{round}"))
            .unwrap();
        let guest = Vm::boot(machine, Duration::from_secs(60), vm::refuse_streams()).unwrap();
        let ready = start.elapsed();
        let first_byte = echo(&guest, start);
        warm.push(Warm {
            prepare,
            restore: times.restore,
            hotplug: times.hotplug,
            ready: ready - prepare - times.restore - times.hotplug,
            first_byte,
        });
        guest.shutdown(Duration::from_secs(20)).unwrap();
    }
    let m = |f: fn(&Warm) -> Duration| ms(median(warm.iter().map(f).collect()));
    println!("{:<52} {:>10}", "median", "");
    println!(
        "{:<52} {:>10}",
        "cold: start → first byte of `echo`",
        ms(median(cold))
    );
    println!(
        "{:<52} {:>10}",
        "warm: start → first byte of `echo`",
        m(|w| w.first_byte)
    );
    println!(
        "{:<52} {:>10}",
        "  warm: open snapshot + writable layer",
        m(|w| w.prepare)
    );
    println!(
        "{:<52} {:>10}",
        "  warm: QEMU start → restored VM running",
        m(|w| w.restore)
    );
    println!(
        "{:<52} {:>10}",
        "  warm: hot-plug the two disks (QMP)",
        m(|w| w.hotplug)
    );
    println!(
        "{:<52} {:>10}",
        "  warm: agent reseed, disks, mounts → ready",
        m(|w| w.ready)
    );
}
