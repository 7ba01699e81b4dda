//! Warm start: boot the guest agent once into a snapshot, then start each job by
//! restoring it (QEMU only; see `docs/payload-runtime.md`, "Warm start").
//!
//! - **Build** ([`SnapshotStore::build`]): QEMU boots the agent's initramfs with
//!   `provider.warm=1` and *placeholder disks* on the slots a job's disks take (the image
//!   read-only, the writable layer), so the restoring QEMU has the same PCI devices. The
//!   agent loads its modules, unbinds the placeholder disks from `virtio_blk` (a
//!   virtio-blk disk's size is read once, at probe), opens the channel and parks. The host
//!   then `stop`s the VM and migrates it (`migrate fd:`, the file handed over QMP `getfd`:
//!   a sandboxed QEMU may neither open files nor spawn `cat`) into `state`. Files go to a
//!   temp dir, are fsynced, hashed into `snapshot.json`, and the dir is renamed into place.
//! - **Restore** ([`Snapshot::restore`]): a QEMU with the same machine, but the *job's*
//!   disks on those slots, reads `state` as `-incoming fd:5` and is continued (`cont`: the
//!   snapshot was taken stopped). The migration stream holds no disk contents or sizes (a
//!   virtio-blk device's config space is read from its backend whenever the guest reads
//!   it), so nothing is hot-plugged. First on the channel the guest reads the job's
//!   [`WarmIdentity`] (a seed from the host's CSPRNG, the clock, the job id, the profile's
//!   guest limits), then binds the disks again, which probes the job's, and does its
//!   normal mount and overlay setup.
//! - **Checked before use** ([`SnapshotStore::open`]): the key (kernel, agent, modules,
//!   memory, vCPUs, QEMU binary and options, this format) names the directory, and every
//!   file's SHA-256 must match `snapshot.json`. The hashes of a file are checked once per
//!   process while its inode, size, mtime and ctime stay the same (any write changes
//!   them).
//!
//! The QEMU of a restore is confined as a cold boot's: the job's runtime profile
//! (Landlock, seccomp, cgroup), no network device. It is given the stream as an fd and the
//! job's own initramfs, so its Landlock policy names nothing in the snapshot (except the
//! `ram` file of [`RamMode::SharedFile`]).
//!
//! Why a migration stream and not file-backed RAM (`memory-backend-file`, `share=off`,
//! `x-ignore-shared`), which restored faster here: QEMU 7.2 opens `mem-path` read-write
//! even for a private mapping (read-only opening, `rom=`, came in 8.2), so Landlock would
//! have to let every job's QEMU write the snapshot every later job maps. The bench
//! (`warm_start`) measures both.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use channel::msg::{WarmIdentity, PARKED_LINE, SEED_BYTES};
use openssl::hash::{Hasher, MessageDigest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::qemu::{QemuMachine, QemuOptions, WarmLaunch};
use crate::qmp::{Qmp, QmpError};
use crate::{DiskSpec, GuestFiles, Machine, MachineSpec};

/// Bump when the machine's arguments or the layout change: older snapshots stop matching.
pub const FORMAT: u32 = 2;
/// The files of a snapshot, all hashed (and `ram` with [`RamMode::SharedFile`]).
const FILES: [&str; 3] = ["initramfs.cpio", "state", "ram"];

/// Where a snapshot's guest RAM is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RamMode {
    /// In the migration stream (`state`), copied into each job's anonymous RAM. What the
    /// daemon uses.
    #[default]
    Stream,
    /// In a file of its own (`ram`): the build's RAM is `memory-backend-file,share=on` and
    /// migrates with `x-ignore-shared`, so `state` holds the devices only; each job maps the
    /// file `share=off`, a private copy-on-write view. Measured by the `warm_start` bench,
    /// not used by the daemon: QEMU 7.2 opens `mem-path` read-write even for a private
    /// mapping, so every job's QEMU could write the file every later job maps.
    SharedFile,
}

impl RamMode {
    fn files(self) -> &'static [&'static str] {
        match self {
            RamMode::Stream => &FILES[..2],
            RamMode::SharedFile => &FILES[..],
        }
    }
}
const MANIFEST: &str = "snapshot.json";

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("no warm-start snapshot at {0}")]
    Missing(PathBuf),
    #[error("the warm-start snapshot at {path} is invalid: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("the warm-start snapshot at {path} fails its hash check: {file} has SHA-256 {got}, snapshot.json says {want}")]
    HashMismatch {
        path: PathBuf,
        file: &'static str,
        got: String,
        want: String,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("building the warm-start snapshot: {0}")]
    Build(String),
    #[error("restoring the warm-start snapshot: {0}")]
    Restore(String),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Vm(#[from] crate::VmError),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WarmError + 'a {
    move |source| WarmError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// `snapshot.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    key: String,
    mem_mib: u32,
    cpus: u32,
    cmdline: String,
    ram: RamMode,
    /// The disk slots, in order: (serial, read-only). A job's disks must match them.
    disks: Vec<(String, bool)>,
    /// File name → SHA-256 (hex).
    sha256: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String, WarmError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut h =
        Hasher::new(MessageDigest::sha256()).map_err(|e| WarmError::Build(e.to_string()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n])
            .map_err(|e| WarmError::Build(e.to_string()))?;
    }
    Ok(hex(&h
        .finish()
        .map_err(|e| WarmError::Build(e.to_string()))?))
}

/// What identifies one version of a file without reading it: a write changes mtime and
/// ctime, a replacement the inode.
type FileId = (u64, u64, u64, i64, i64, i64, i64);

fn file_id(m: &fs::Metadata) -> FileId {
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Hashes computed in this process, by path, valid while the file's id is unchanged.
static HASHES: Mutex<Option<HashMap<PathBuf, (FileId, String)>>> = Mutex::new(None);

fn cached_sha256(path: &Path) -> Result<String, WarmError> {
    let meta = fs::metadata(path).map_err(io_err("stat", path))?;
    let id = file_id(&meta);
    {
        let cache = HASHES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, h)) = cache.as_ref().and_then(|c| c.get(path)) {
            if *seen == id {
                return Ok(h.clone());
            }
        }
    }
    let h = sha256_file(path)?;
    HASHES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(path.to_owned(), (id, h.clone()));
    Ok(h)
}

/// `snapshots/` in the data dir: one directory per key.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// A snapshot that passed its checks.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    kernel: PathBuf,
    manifest: Manifest,
}

/// What a snapshot is made from.
#[derive(Debug, Clone)]
pub struct SnapshotInputs {
    pub files: GuestFiles,
    pub mem_mib: u32,
    pub cpus: u32,
    pub qemu: QemuOptions,
    pub ram: RamMode,
}

impl SnapshotInputs {
    /// The key: a SHA-256 over the contents of the kernel, the agent and the modules, the
    /// machine size, the QEMU binary (path, size, mtime) and options, and [`FORMAT`].
    pub fn key(&self) -> Result<String, WarmError> {
        let mut parts = vec![
            format!("format {FORMAT}"),
            format!("kernel {}", cached_sha256(&self.files.kernel)?),
            format!("agent {}", cached_sha256(&self.files.agent)?),
            format!("mem {} cpus {} ram {:?}", self.mem_mib, self.cpus, self.ram),
            format!("accel {:?} sandbox {}", self.qemu.accel, self.qemu.sandbox),
        ];
        let q = fs::metadata(&self.qemu.binary).map_err(io_err("stat", &self.qemu.binary))?;
        parts.push(format!(
            "qemu {} {} {}",
            self.qemu.binary.display(),
            q.size(),
            q.mtime()
        ));
        if let Some(m) = &self.files.modules {
            let order = m.join("order");
            let text = fs::read_to_string(&order).map_err(io_err("read", &order))?;
            for name in text.lines().filter(|l| !l.trim().is_empty()) {
                parts.push(format!(
                    "module {name} {}",
                    cached_sha256(&m.join(name.trim()))?
                ));
            }
        }
        let mut h =
            Hasher::new(MessageDigest::sha256()).map_err(|e| WarmError::Build(e.to_string()))?;
        h.update(parts.join("\n").as_bytes())
            .map_err(|e| WarmError::Build(e.to_string()))?;
        Ok(hex(&h.finish().map_err(|e| WarmError::Build(e.to_string()))?)[..32].to_owned())
    }
}

impl SnapshotStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The snapshot for `inputs`, checked: [`WarmError::Missing`] when there is none,
    /// [`WarmError::Corrupt`] when a file's hash or the manifest does not match.
    pub fn open(&self, inputs: &SnapshotInputs) -> Result<Snapshot, WarmError> {
        let key = inputs.key()?;
        let dir = self.path_for(&key);
        let mpath = dir.join(MANIFEST);
        let text = match fs::read(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(WarmError::Missing(dir)),
            Err(e) => return Err(io_err("read", &mpath)(e)),
        };
        let corrupt = |why: String| WarmError::Corrupt {
            path: dir.clone(),
            why,
        };
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|e| corrupt(format!("{MANIFEST}: {e}")))?;
        if manifest.format != FORMAT
            || manifest.key != key
            || manifest.mem_mib != inputs.mem_mib
            || manifest.cpus != inputs.cpus
            || manifest.ram != inputs.ram
        {
            return Err(corrupt(format!(
                "{MANIFEST} is for another machine (format {}, key {})",
                manifest.format, manifest.key
            )));
        }
        for &f in manifest.ram.files() {
            let want = manifest
                .sha256
                .get(f)
                .ok_or_else(|| corrupt(format!("{MANIFEST} has no hash for {f}")))?;
            let p = dir.join(f);
            if !p.is_file() {
                return Err(corrupt(format!("{f} is missing")));
            }
            let got = cached_sha256(&p)?;
            if &got != want {
                return Err(WarmError::HashMismatch {
                    path: dir.clone(),
                    file: f,
                    got,
                    want: want.clone(),
                });
            }
        }
        Ok(Snapshot {
            dir,
            kernel: inputs.files.kernel.clone(),
            manifest,
        })
    }

    /// [`SnapshotStore::open`], building the snapshot when it is missing or corrupt (a
    /// corrupt one is logged and replaced, never used).
    pub fn open_or_build(
        &self,
        inputs: &SnapshotInputs,
        timeout: Duration,
    ) -> Result<Snapshot, WarmError> {
        match self.open(inputs) {
            Ok(s) => Ok(s),
            Err(
                e @ (WarmError::Missing(_)
                | WarmError::Corrupt { .. }
                | WarmError::HashMismatch { .. }),
            ) => {
                tracing::warn!(reason = %e, "building the warm-start snapshot");
                self.build(inputs, timeout)
            }
            Err(e) => Err(e),
        }
    }

    /// Boots the agent, parks it and saves it (see the module docs). One build at a time
    /// per store (a lock file); a build that finds a sound snapshot made meanwhile keeps it.
    pub fn build(&self, inputs: &SnapshotInputs, timeout: Duration) -> Result<Snapshot, WarmError> {
        use fs4::fs_std::FileExt;
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let lock_path = self.dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        lock.lock_exclusive().map_err(io_err("lock", &lock_path))?;
        // Under the lock no other build runs: what a killed build or swap left goes.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".build-") || name.starts_with(".old-") {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let key = inputs.key()?;
        let tmp = self
            .dir
            .join(format!(".build-{}-{key}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
        let built = self.build_in(inputs, &key, &tmp, timeout);
        let result = built.and_then(|manifest| {
            let target = self.path_for(&key);
            let old = self.dir.join(format!(".old-{}-{key}", std::process::id()));
            if target.exists() {
                // Jobs restoring from the old one keep their open files.
                fs::rename(&target, &old).map_err(io_err("move aside", &target))?;
            }
            fs::rename(&tmp, &target).map_err(io_err("rename", &tmp))?;
            let _ = fs::remove_dir_all(&old);
            self.remove_superseded(&manifest);
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync", &self.dir))?;
            Ok(Snapshot {
                dir: target,
                kernel: inputs.files.kernel.clone(),
                manifest,
            })
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        drop(lock);
        result
    }

    /// Removes the snapshots this one replaces: those for the same machine size and RAM
    /// mode under another key (an older kernel, agent or QEMU: they can never match again)
    /// and those of another format. Jobs restoring from one keep their open files.
    fn remove_superseded(&self, current: &Manifest) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == current.key {
                continue;
            }
            let superseded = match fs::read(e.path().join(MANIFEST))
                .ok()
                .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
            {
                Some(m) => {
                    m.format != FORMAT
                        || (m.mem_mib == current.mem_mib
                            && m.cpus == current.cpus
                            && m.ram == current.ram)
                }
                // Unreadable under this format: an older layout.
                None => e.path().join(MANIFEST).exists(),
            };
            if superseded {
                tracing::info!(key = %name, "removing a superseded warm-start snapshot");
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    fn build_in(
        &self,
        inputs: &SnapshotInputs,
        key: &str,
        tmp: &Path,
        timeout: Duration,
    ) -> Result<Manifest, WarmError> {
        let started = Instant::now();
        let initramfs = tmp.join("initramfs.cpio");
        crate::initramfs::build_agent(
            &initramfs,
            &inputs.files.agent,
            inputs.files.modules.as_deref(),
        )
        .map_err(|e| WarmError::Build(format!("the guest initramfs: {e}")))?;
        let cmdline = crate::disk_cmdline(true);
        let disks = placeholder_disks(tmp)?;
        let spec = MachineSpec {
            kernel: inputs.files.kernel.clone(),
            initramfs: initramfs.clone(),
            cmdline: cmdline.clone(),
            mem_mib: inputs.mem_mib,
            cpus: inputs.cpus,
            job_dir: tmp.to_owned(),
            console_log: tmp.join("console.log"),
            disks: disks.clone(),
            runtime: crate::runtime::RuntimeLimits::default(),
        };
        let mut machine = QemuMachine::launch_with(
            &spec,
            &inputs.qemu,
            Some(WarmLaunch {
                ram_file: (inputs.ram == RamMode::SharedFile).then(|| (tmp.join("ram"), true)),
                ..WarmLaunch::default()
            }),
        )?;
        let fail = |m: &mut QemuMachine, why: String| {
            let _ = m.kill();
            WarmError::Build(format!("{why}{}", crate::console_tail(&spec.console_log)))
        };
        let mut chan = machine
            .take_channel()
            .ok_or_else(|| WarmError::Build("no channel".into()))?;
        let qmp_sock = machine
            .take_qmp()
            .ok_or_else(|| WarmError::Build("no QMP monitor".into()))?;
        chan.set_read_timeout(Some(timeout))
            .map_err(io_err("set a timeout on the channel of", tmp))?;
        let mut got = vec![0u8; PARKED_LINE.len()];
        if let Err(e) = chan.read_exact(&mut got) {
            return Err(fail(&mut machine, format!("the guest did not park: {e}")));
        }
        if got != PARKED_LINE {
            return Err(fail(
                &mut machine,
                format!(
                    "the guest wrote {:?}, not the parked line",
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        let booted = started.elapsed();
        let state_path = tmp.join("state");
        let state = File::create(&state_path).map_err(io_err("create", &state_path))?;
        let saved = (|| -> Result<(), WarmError> {
            let mut q = Qmp::connect(qmp_sock, Duration::from_secs(30))?;
            q.execute("stop", json!({}))?;
            if inputs.ram == RamMode::SharedFile {
                // The RAM is in the file already (a shared mapping): only devices go.
                q.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                )?;
            }
            q.execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": 8u64 << 30}),
            )?;
            q.send_fd("snapshot", state.as_raw_fd())?;
            q.execute("migrate", json!({"uri": "fd:snapshot"}))?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = q.execute("query-migrate", json!({}))?;
                match r.get("status").and_then(|s| s.as_str()) {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        return Err(WarmError::Build(format!(
                            "migration {}: {}",
                            r["status"],
                            r.get("error-desc").and_then(|d| d.as_str()).unwrap_or("")
                        )))
                    }
                    _ if Instant::now() > deadline => {
                        return Err(WarmError::Build(
                            "migration did not complete in 60 s".into(),
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            let _ = q.execute("quit", json!({}));
            Ok(())
        })();
        if let Err(e) = saved {
            return Err(fail(&mut machine, e.to_string()));
        }
        let _ = machine.wait_timeout(Duration::from_secs(10));
        let _ = machine.kill();
        drop(chan);
        for d in &disks {
            let _ = fs::remove_file(&d.path);
        }
        // Only the snapshot's own files stay (and `console.log`, for a failed restore).
        for junk in ["qemu.stderr", "confinement.txt"] {
            let _ = fs::remove_file(tmp.join(junk));
        }
        state.sync_all().map_err(io_err("fsync", &state_path))?;
        let mut sha256 = HashMap::new();
        for &f in inputs.ram.files() {
            let p = tmp.join(f);
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync", &p))?;
            sha256.insert(f.to_owned(), cached_sha256(&p)?);
        }
        let manifest = Manifest {
            format: FORMAT,
            key: key.to_owned(),
            mem_mib: inputs.mem_mib,
            cpus: inputs.cpus,
            cmdline,
            ram: inputs.ram,
            disks: disks
                .iter()
                .map(|d| (d.serial.clone(), d.read_only))
                .collect(),
            sha256,
        };
        let mpath = tmp.join(MANIFEST);
        let mut mf = File::create(&mpath).map_err(io_err("create", &mpath))?;
        mf.write_all(
            &serde_json::to_vec_pretty(&manifest).map_err(|e| WarmError::Build(e.to_string()))?,
        )
        .and_then(|_| mf.sync_all())
        .map_err(io_err("write", &mpath))?;
        File::open(tmp)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", tmp))?;
        tracing::info!(
            key,
            boot_ms = booted.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "built the warm-start snapshot"
        );
        Ok(manifest)
    }
}

/// The disks a snapshot is built with, on the slots a job's disks take
/// ([`crate::job_disks`]): small files the guest never reads (it parks before it loads the
/// disk driver). Their contents and sizes do not matter; the job's replace them.
fn placeholder_disks(dir: &Path) -> Result<Vec<DiskSpec>, WarmError> {
    let mut disks = Vec::new();
    for (serial, read_only) in [(crate::ROOT_SERIAL, true), (crate::UPPER_SERIAL, false)] {
        let path = dir.join(format!("placeholder-{serial}.img"));
        let f = File::create(&path).map_err(io_err("create", &path))?;
        f.set_len(1 << 20).map_err(io_err("size", &path))?;
        disks.push(DiskSpec {
            path,
            serial: serial.into(),
            read_only,
        });
    }
    Ok(disks)
}

/// Where the time of a restore went.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimes {
    /// QEMU start → the restored VM runs.
    pub restore: Duration,
}

impl Snapshot {
    pub fn key(&self) -> &str {
        &self.manifest.key
    }

    /// Where the snapshot's migration stream is.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// A machine for the job `spec` (its disks, job dir, console and runtime profile; the
    /// kernel, initramfs and command line are the snapshot's) restored from this snapshot,
    /// with the job's disks on the snapshot's slots and its identity sent. Hand it to
    /// [`crate::Vm::boot`] as a cold machine.
    pub fn restore(
        &self,
        spec: &MachineSpec,
        qemu: &QemuOptions,
        job_id: &str,
    ) -> Result<(Box<dyn Machine>, RestoreTimes), WarmError> {
        let start = Instant::now();
        let slots: Vec<(String, bool)> = spec
            .disks
            .iter()
            .map(|d| (d.serial.clone(), d.read_only))
            .collect();
        if slots != self.manifest.disks
            || spec.mem_mib != self.manifest.mem_mib
            || spec.cpus != self.manifest.cpus
        {
            return Err(WarmError::Restore(format!(
                "the job's machine ({} MiB, {} vCPUs, disks {slots:?}) is not the snapshot's \
                 ({} MiB, {} vCPUs, disks {:?})",
                spec.mem_mib,
                spec.cpus,
                self.manifest.mem_mib,
                self.manifest.cpus,
                self.manifest.disks
            )));
        }
        let state_path = self.state_path();
        let state = File::open(&state_path).map_err(io_err("open", &state_path))?;
        // QEMU reads `-initrd` at start even when restoring (into fw_cfg; the guest's RAM
        // then comes from the stream), so the job's own initramfs does, made of the same
        // agent and modules. The restoring QEMU then needs no path into the snapshot: the
        // stream is an fd, and a rebuild that swaps the directory meanwhile cannot fail it.
        let initramfs = if spec.initramfs.is_file() {
            spec.initramfs.clone()
        } else {
            self.dir.join("initramfs.cpio")
        };
        let launch = MachineSpec {
            kernel: self.kernel.clone(),
            initramfs,
            cmdline: self.manifest.cmdline.clone(),
            ..spec.clone()
        };
        let mut machine = QemuMachine::launch_with(
            &launch,
            qemu,
            Some(match self.manifest.ram {
                // The kernel and initramfs are in the Landlock policy as on a cold boot.
                RamMode::Stream => WarmLaunch {
                    incoming: Some(state),
                    ..WarmLaunch::default()
                },
                RamMode::SharedFile => WarmLaunch {
                    incoming: Some(state),
                    defer_incoming: true,
                    read: Vec::new(),
                    write: vec![self.dir.join("ram")],
                    ram_file: Some((self.dir.join("ram"), false)),
                },
            }),
        )?;
        let mut chan = machine
            .take_channel()
            .ok_or_else(|| WarmError::Restore("no channel".into()))?;
        let qmp_sock = machine
            .take_qmp()
            .ok_or_else(|| WarmError::Restore("no QMP monitor".into()))?;
        let mut seed = [0u8; SEED_BYTES];
        openssl::rand::rand_bytes(&mut seed).map_err(|e| WarmError::Restore(e.to_string()))?;
        let identity = WarmIdentity {
            seed: hex(&seed),
            unix_nanos: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            job_id: job_id.to_owned(),
            read_only: spec.runtime.read_only_rootfs,
            pids_max: spec.runtime.pids_max,
        };
        let result = (|| -> Result<RestoreTimes, WarmError> {
            // Buffered in the socket until the guest reads it: the guest's first read
            // after the restore.
            chan.write_all(&identity.to_line())
                .map_err(io_err("send the identity on the channel of", &spec.job_dir))?;
            let mut q = Qmp::connect(qmp_sock, Duration::from_secs(30))?;
            if self.manifest.ram == RamMode::SharedFile {
                q.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                )?;
                q.execute(
                    "migrate-incoming",
                    json!({"uri": format!("fd:{}", crate::qemu::INCOMING)}),
                )?;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = q.execute("query-status", json!({}))?;
                match r.get("status").and_then(|s| s.as_str()) {
                    Some("running") => break,
                    // The snapshot was taken stopped, and the stream says so: once it is
                    // loaded the VM waits for `cont` (the state is `inmigrate` until then).
                    Some("paused") => {
                        q.execute("cont", json!({}))?;
                    }
                    Some(s @ ("internal-error" | "shutdown" | "guest-panicked")) => {
                        return Err(WarmError::Restore(format!("the VM is {s}")))
                    }
                    s if Instant::now() > deadline => {
                        let m = q.execute("query-migrate", json!({})).unwrap_or_default();
                        return Err(WarmError::Restore(format!(
                            "the restore did not finish in 60 s (status {s:?}, migration {m})"
                        )));
                    }
                    _ => std::thread::sleep(Duration::from_millis(2)),
                }
            }
            Ok(RestoreTimes {
                restore: start.elapsed(),
            })
        })();
        match result {
            Ok(times) => {
                machine.put_channel(chan);
                Ok((Box::new(machine), times))
            }
            Err(e) => {
                let _ = machine.kill();
                let stderr = fs::read_to_string(spec.job_dir.join("qemu.stderr"))
                    .map(|t| format!("; qemu: {}", t.trim()))
                    .unwrap_or_default();
                Err(WarmError::Restore(format!(
                    "{e}{stderr}{}",
                    crate::console_tail(&spec.console_log)
                )))
            }
        }
    }
}

/// What a job starts from, and why (the job's log says it).
#[derive(Debug)]
pub enum Start {
    /// Restore this snapshot.
    Warm(Snapshot),
    /// Boot cold; the reason.
    Cold(String),
}

#[derive(Debug, Default)]
struct BuildState {
    /// Machine sizes (MiB, vCPUs) whose snapshot is being built.
    building: std::collections::HashSet<(u32, u32)>,
    /// Keys whose build or restore failed, and why: not retried in this process (the
    /// inputs must change, or `provider vm snapshot --rebuild` be run and the daemon
    /// restarted).
    failed: HashMap<String, String>,
}

/// The daemon's warm start: one snapshot per job machine size (a job's memory and vCPUs
/// are its agreement's), built on first use in the background, so that job boots cold as
/// it would have anyway; checked before every restore and rebuilt when it is missing or
/// fails its checks.
#[derive(Debug, Clone)]
pub struct WarmStart {
    store: SnapshotStore,
    /// The inputs of the daemon's default job size; other sizes differ in memory and vCPUs.
    inputs: SnapshotInputs,
    boot_timeout: Duration,
    state: std::sync::Arc<Mutex<BuildState>>,
}

impl WarmStart {
    pub fn new(store: SnapshotStore, inputs: SnapshotInputs, boot_timeout: Duration) -> Self {
        Self {
            store,
            inputs,
            boot_timeout,
            state: Default::default(),
        }
    }

    /// The inputs of the default job size.
    pub fn inputs(&self) -> &SnapshotInputs {
        &self.inputs
    }

    /// The inputs of a job of `mem_mib` and `cpus`.
    pub fn inputs_for(&self, mem_mib: u32, cpus: u32) -> SnapshotInputs {
        SnapshotInputs {
            mem_mib,
            cpus,
            ..self.inputs.clone()
        }
    }

    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BuildState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hashes the default size's snapshot files in the background (once per process), so
    /// the first job's check reads nothing. A missing or broken snapshot is left for the
    /// first job.
    pub fn prime(&self) {
        let me = self.clone();
        std::thread::spawn(move || match me.store.open(&me.inputs) {
            Ok(s) => tracing::info!(key = s.key(), "warm-start snapshot checked"),
            Err(e) => tracing::info!("warm start: {e}"),
        });
    }

    /// The snapshot for a job of `mem_mib` and `cpus` if a sound one exists, else why it
    /// boots cold. A missing or invalid snapshot is never used;
    /// [`WarmStart::rebuild_in_background`] replaces it.
    pub fn choose(&self, mem_mib: u32, cpus: u32) -> Start {
        let inputs = self.inputs_for(mem_mib, cpus);
        let why = match self.store.open(&inputs) {
            Ok(s) => match self.state().failed.get(s.key()) {
                Some(why) => why.clone(),
                None => return Start::Warm(s),
            },
            Err(WarmError::Missing(_)) => "no warm-start snapshot yet".to_owned(),
            Err(e @ WarmError::HashMismatch { .. }) => format!("hash mismatch: {e}"),
            Err(e @ WarmError::Corrupt { .. }) => format!("invalid snapshot: {e}"),
            Err(e) => format!("the snapshot cannot be checked: {e}"),
        };
        let st = self.state();
        let key = inputs.key().unwrap_or_default();
        let next = if st.building.contains(&(mem_mib, cpus)) {
            "; one is being built"
        } else if st.failed.contains_key(&key) {
            "; not rebuilt in this process (see the earlier failure)"
        } else {
            "; rebuilding it in the background"
        };
        Start::Cold(format!("cold boot: {why}{next}"))
    }

    /// Builds the snapshot of a job of `mem_mib` and `cpus` in a thread unless one is
    /// being built, is sound, or failed here already.
    pub fn rebuild_in_background(&self, mem_mib: u32, cpus: u32) {
        let inputs = self.inputs_for(mem_mib, cpus);
        let key = inputs.key().unwrap_or_default();
        {
            let mut st = self.state();
            if st.failed.contains_key(&key) || !st.building.insert((mem_mib, cpus)) {
                return;
            }
        }
        let me = self.clone();
        std::thread::spawn(move || {
            let r = me
                .store
                .open(&inputs)
                .or_else(|_| me.store.build(&inputs, me.boot_timeout));
            let mut st = me.state();
            st.building.remove(&(mem_mib, cpus));
            match r {
                Ok(s) => tracing::info!(
                    key = s.key(),
                    dir = %s.dir.display(),
                    mem_mib,
                    cpus,
                    "warm-start snapshot ready"
                ),
                Err(e) => {
                    tracing::warn!(
                        mem_mib,
                        cpus,
                        "the warm-start snapshot could not be built; jobs boot cold: {e}"
                    );
                    st.failed
                        .insert(key, format!("the snapshot could not be built: {e}"));
                }
            }
        });
    }

    /// A restore of `snap` failed: later jobs of its size boot cold.
    pub fn restore_failed(&self, snap: &Snapshot, why: &str) {
        self.state().failed.insert(
            snap.key().to_owned(),
            format!("a restore of snapshot {} failed: {why}", snap.key()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs made of small files (no QEMU runs): the key only reads and stats them.
    fn inputs(dir: &Path) -> SnapshotInputs {
        for f in ["vmlinuz", "agent"] {
            fs::write(dir.join(f), f.as_bytes()).unwrap();
        }
        SnapshotInputs {
            files: GuestFiles {
                kernel: dir.join("vmlinuz"),
                modules: None,
                agent: dir.join("agent"),
            },
            mem_mib: 256,
            cpus: 1,
            qemu: QemuOptions {
                binary: dir.join("agent"),
                accel: crate::Accel::Tcg,
                sandbox: true,
            },
            ram: RamMode::Stream,
        }
    }

    /// A snapshot directory as a build leaves it, for `inputs`.
    fn fake_snapshot(store: &SnapshotStore, inputs: &SnapshotInputs) -> PathBuf {
        let key = inputs.key().unwrap();
        let dir = store.path_for(&key);
        fs::create_dir_all(&dir).unwrap();
        let mut sha256 = HashMap::new();
        for f in RamMode::Stream.files() {
            fs::write(dir.join(f), format!("contents of {f}")).unwrap();
            sha256.insert(f.to_string(), sha256_file(&dir.join(f)).unwrap());
        }
        let m = Manifest {
            format: FORMAT,
            key,
            mem_mib: inputs.mem_mib,
            cpus: inputs.cpus,
            cmdline: "x".into(),
            ram: inputs.ram,
            disks: vec![("root".into(), true), ("upper".into(), false)],
            sha256,
        };
        fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        dir
    }

    #[test]
    fn a_snapshot_is_used_only_while_every_hash_and_the_key_match() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(tmp.path().join("snapshots"));
        let inputs = inputs(tmp.path());
        assert!(matches!(store.open(&inputs), Err(WarmError::Missing(_))));
        let dir = fake_snapshot(&store, &inputs);
        store.open(&inputs).expect("sound");
        // One changed byte of the state (a write changes its mtime and ctime, so the
        // cached hash is not reused).
        let mut state = fs::read(dir.join("state")).unwrap();
        state[3] ^= 1;
        std::thread::sleep(Duration::from_millis(10));
        fs::write(dir.join("state"), &state).unwrap();
        match store.open(&inputs) {
            Err(WarmError::HashMismatch { file, .. }) => assert_eq!(file, "state"),
            other => panic!("{other:?}"),
        }
        // Another vCPU count is another key: no snapshot, not this one.
        let other = SnapshotInputs {
            cpus: 2,
            ..inputs.clone()
        };
        assert!(matches!(store.open(&other), Err(WarmError::Missing(_))));
        // A manifest that does not parse is invalid, not missing.
        fs::write(dir.join(MANIFEST), b"{").unwrap();
        assert!(matches!(
            store.open(&inputs),
            Err(WarmError::Corrupt { .. })
        ));
        // A changed agent changes the key.
        let key = inputs.key().unwrap();
        fs::write(tmp.path().join("agent"), b"agent v2").unwrap();
        assert_ne!(inputs.key().unwrap(), key);
    }

    #[test]
    fn a_new_snapshot_removes_those_it_supersedes_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(tmp.path().join("snapshots"));
        let inputs = inputs(tmp.path());
        let old = fake_snapshot(&store, &inputs);
        let other_size = fake_snapshot(
            &store,
            &SnapshotInputs {
                mem_mib: 512,
                ..inputs.clone()
            },
        );
        fs::write(tmp.path().join("agent"), b"agent v2").unwrap();
        let new = fake_snapshot(&store, &inputs);
        assert_ne!(old, new);
        let m: Manifest = serde_json::from_slice(&fs::read(new.join(MANIFEST)).unwrap()).unwrap();
        store.remove_superseded(&m);
        assert!(!old.exists(), "the old agent's snapshot of this size stays");
        assert!(new.exists() && other_size.exists());
    }
}
