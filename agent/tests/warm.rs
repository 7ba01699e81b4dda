//! Warm start (`vm::warm`), end to end under QEMU TCG with the guest kernel the other VM
//! tests use: one snapshot is built per test binary run and restored several times, with
//! the job's real disks on the snapshot's placeholder slots. Skips with a printed reason
//! where the host lacks QEMU, the kernel or busybox (`.ci/run` installs and fetches them).

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use provider::testsupport::{vm_env, VmEnv};
use vm::qemu::QemuOptions;
use vm::warm::{SnapshotInputs, SnapshotStore, WarmError};
use vm::{Backend, RunSpec, Vm};

const MEM_MIB: u32 = 256;

fn qemu(env: &VmEnv) -> QemuOptions {
    match &env.backend {
        Backend::Qemu(o) => o.clone(),
        Backend::Kvm => unreachable!("vm_env picks QEMU"),
    }
}

fn inputs(env: &VmEnv) -> SnapshotInputs {
    SnapshotInputs {
        files: env.files(),
        mem_mib: MEM_MIB,
        cpus: 1,
        qemu: qemu(env),
        ram: vm::warm::RamMode::Stream,
    }
}

struct Shared {
    env: VmEnv,
    store: SnapshotStore,
    image: vm::rootfs::DiskImage,
    _dir: tempfile::TempDir,
}

/// The environment and one built snapshot, shared by the tests of this binary (a build
/// boots the guest once under TCG).
fn shared() -> Option<&'static Shared> {
    static S: OnceLock<Option<Shared>> = OnceLock::new();
    S.get_or_init(|| {
        let env = vm_env()?;
        let dir = tempfile::tempdir().unwrap();
        let image = env.disk_image(dir.path());
        let store = SnapshotStore::new(dir.path().join("snapshots"));
        store
            .build(&inputs(&env), Duration::from_secs(180))
            .unwrap_or_else(|e| panic!("build the snapshot: {e}"));
        Some(Shared {
            env,
            store,
            image,
            _dir: dir,
        })
    })
    .as_ref()
}

/// A job restored from the shared snapshot, with its own disks in `job` (a writable layer
/// of `upper_mib`) and the runtime profile `runtime`.
fn restore(
    s: &Shared,
    job: &Path,
    id: &str,
    upper_mib: u64,
    runtime: vm::runtime::RuntimeLimits,
) -> Vm {
    let snap = s.store.open(&inputs(&s.env)).expect("a sound snapshot");
    let mut spec =
        vm::disk_machine(&s.env.files(), &s.image, upper_mib << 20, MEM_MIB, 1, job).unwrap();
    spec.runtime = runtime;
    let (machine, _) = snap
        .restore(&spec, &qemu(&s.env), id)
        .unwrap_or_else(|e| panic!("restore: {e}"));
    Vm::boot(machine, Duration::from_secs(60), vm::refuse_streams())
        .unwrap_or_else(|e| panic!("the restored guest: {e}"))
}

fn sh(guest: &Vm, script: &str) -> (Option<i32>, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = guest
        .run(&RunSpec::new(["/bin/sh", "-c", script]), &mut out, &mut err)
        .unwrap_or_else(|e| panic!("`{script}`: {e}"));
    (
        st.code,
        String::from_utf8_lossy(&out).into_owned() + &String::from_utf8_lossy(&err),
    )
}

/// The snapshot was built with 1 MiB placeholders on the disk slots; restored jobs see
/// their own disks (the image's files; writable layers of 64 and 96 MiB, the size QEMU's
/// incoming side gives, not the placeholder's), get different random bytes and boot ids,
/// and each gets its own runtime profile's guest limits (sent with the identity, since
/// the snapshot's command line is every job's).
#[test]
fn restored_jobs_use_their_own_disks_profile_and_entropy() {
    let Some(s) = shared() else { return };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = restore(s, a_dir.path(), "job-a", 64, Default::default());
    let strict = vm::runtime::RuntimeLimits {
        read_only_rootfs: true,
        pids_max: Some(32),
        ..Default::default()
    };
    let b = restore(s, b_dir.path(), "job-b", 96, strict);
    let probe = "cat /proc/sys/kernel/random/boot_id; \
                 head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 for d in /sys/block/vd*; do echo $(cat $d/serial) $(cat $d/size); done; \
                 ls /bin/busybox; (echo written > /w && cat /w) 2>&1 | head -1; \
                 (i=0; while [ $i -lt 40 ]; do sleep 5 & i=$((i+1)); done; echo forked $i) 2>&1 | tail -1";
    let (ca, oa) = sh(&a, probe);
    let (cb, ob) = sh(&b, probe);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{oa}\n{ob}");
    let la: Vec<&str> = oa.lines().collect();
    let lb: Vec<&str> = ob.lines().collect();
    assert_eq!(la.len(), 7, "{oa}");
    assert_eq!(lb.len(), 7, "{ob}");
    assert_ne!(la[0], lb[0], "the same boot_id");
    assert_ne!(la[1], lb[1], "the same random bytes");
    assert_eq!(la[1].len(), 64, "{oa}");
    // 512-byte sectors: the job's writable layer, not the 2048 of the placeholder.
    assert!(la[2..4].contains(&"upper 131072"), "{oa}");
    assert!(lb[2..4].contains(&"upper 196608"), "{ob}");
    let image_sectors = std::fs::metadata(&s.image.path).unwrap().len() / 512;
    assert!(
        la[2..4].contains(&format!("root {image_sectors}").as_str()),
        "{oa}"
    );
    assert_eq!(la[4], "/bin/busybox");
    assert_eq!(la[5], "written", "{oa}");
    assert!(lb[5].contains("Read-only file system"), "{ob}");
    assert_eq!(la[6], "forked 40", "{oa}");
    assert!(
        lb[6].contains("can't fork"),
        "pids_max 32 did not hold: {ob}"
    );
    // The restoring QEMU is confined as a cold boot's.
    let conf = std::fs::read_to_string(b_dir.path().join("confinement.txt")).unwrap();
    assert!(conf.contains("guest: read-only root file system"), "{conf}");
    a.shutdown(Duration::from_secs(20)).unwrap();
    b.shutdown(Duration::from_secs(20)).unwrap();
    for d in [&a_dir, &b_dir] {
        let console = std::fs::read_to_string(d.path().join("console.log")).unwrap();
        eprintln!("{}", console.trim());
    }
}

/// A job whose disks are not on the snapshot's slots is refused before any QEMU starts.
#[test]
fn a_machine_unlike_the_snapshot_is_refused() {
    let Some(s) = shared() else { return };
    let snap = s.store.open(&inputs(&s.env)).expect("a sound snapshot");
    let job = tempfile::tempdir().unwrap();
    let mut spec =
        vm::disk_machine(&s.env.files(), &s.image, 16 << 20, MEM_MIB, 1, job.path()).unwrap();
    spec.disks.pop();
    match snap.restore(&spec, &qemu(&s.env), "job-x") {
        Err(WarmError::Restore(why)) => assert!(why.contains("is not the snapshot's"), "{why}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("restored with one disk"),
    }
    assert!(!job.path().join("qemu.stderr").exists());
}
