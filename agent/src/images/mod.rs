//! The image store: payload images fetched (for a requestor only `http(s)://` under
//! [`FetchLimits`], see [`fetch`]; for the operator's own `provider vm run` also `file://`
//! and a local path), verified against the manifest's `sha3:` hash before anything uses the
//! bytes, and stored by hash in the data dir's `images/`. Reading a stored rootfs tarball
//! is `vm::image`'s.

pub mod fetch;
pub mod oci;

use std::fs;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use net::codes::Code;
use openssl::hash::{Hasher, MessageDigest};
use policies::manifest::{Payload, PayloadHash, Sha3};
use policies::{Platform, ReceivedManifest};
use vm::image::{io_err, ImageError};

pub mod cache;

use self::fetch::FetchLimits;
use crate::store::DataDir;

/// The stable code a requestor is told for `e` (docs/verdicts.md).
pub fn code(e: &ImageError) -> Code {
    match e {
        ImageError::PlatformUnsupported { .. } => policies::Code::PlatformUnsupported.into(),
        ImageError::BadHash(_) => policies::Code::ManifestInvalid.into(),
        ImageError::HashMismatch { .. } => Code::PayloadHashMismatch,
        ImageError::Fetch { .. } => Code::PayloadFetchFailed,
        ImageError::UrlRefused { .. } => policies::Code::PayloadUrlRefused.into(),
        ImageError::TooLarge { .. } => Code::PayloadTooLarge,
        ImageError::Io { .. } | ImageError::Store(_) | ImageError::Convert(_) => {
            Code::PayloadStoreFailed
        }
        ImageError::UnsafeEntry { .. } | ImageError::Format { .. } => Code::PayloadImageInvalid,
        ImageError::PlatformIncompatible { .. } => Code::PlatformIncompatible,
        ImageError::RegistryAuth { .. } => Code::PayloadAuthFailed,
        ImageError::Several(all) => match all.first().map(code) {
            Some(first) if all.iter().all(|e| code(e) == first) => first,
            _ => Code::PayloadFetchFailed,
        },
    }
}

/// Staging dirs and temp images a killed conversion left behind (`.staging-*`, `.sqfs-*`),
/// once they are an hour old: a conversion running now is younger than that.
fn sweep_stale_work(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    let hour = std::time::Duration::from_secs(3600);
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(".staging-") && !name.starts_with(".sqfs-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > hour);
        if old {
            let p = e.path();
            let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            tracing::info!(path = %p.display(), "removed a conversion's leftovers");
        }
    }
}

/// What a job's machine is given, besides its image.
#[derive(Debug, Clone, Copy)]
pub struct MachineSize {
    pub mem_mib: u32,
    pub cpus: u32,
    /// The writable layer (disk path only).
    pub storage_bytes: u64,
    /// What a tarball may expand to when it is converted.
    pub max_unpacked: u64,
}

/// Why a job's machine could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Initramfs(#[from] vm::initramfs::InitramfsError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
}

/// The machine for `image` in the job dir `dir` (the daemon's jobs and `provider vm run`
/// alike): under QEMU the image as a read-only disk (a tarball converted once, see
/// [`ImageStore::disk_image`]) with a fresh writable layer of `size.storage_bytes`; under
/// the own VMM, which has no virtio-blk yet, a tarball unpacked into the initramfs. Also
/// the image's config (a GVMI's `Env`, `WorkingDir`…), which `run` commands honour.
pub fn prepare_machine(
    store: &ImageStore,
    image: &StoredImage,
    backend: &vm::Backend,
    files: &vm::GuestFiles,
    size: MachineSize,
    dir: &Path,
) -> Result<(vm::MachineSpec, vm::rootfs::ImageConfig), PrepareError> {
    match backend {
        vm::Backend::Qemu(_) => {
            let disk = store.disk_image(image, size.max_unpacked)?;
            let spec = vm::disk_machine(
                files,
                &disk,
                size.storage_bytes,
                size.mem_mib,
                size.cpus,
                dir,
            )?;
            tracing::info!(
                format = disk.source_format,
                compression = disk.compression.name(),
                storage_bytes = size.storage_bytes,
                "rootfs: a read-only disk with a writable layer"
            );
            Ok((spec, disk.config))
        }
        vm::Backend::Kvm => {
            let initrd = dir.join("initramfs.cpio");
            vm::initramfs::build(&initrd, &files.agent, &image.path)?;
            Ok((
                vm::MachineSpec {
                    kernel: files.kernel.clone(),
                    initramfs: initrd,
                    cmdline: vm::CMDLINE.into(),
                    mem_mib: size.mem_mib,
                    cpus: size.cpus,
                    job_dir: dir.to_owned(),
                    console_log: dir.join("console.log"),
                    disks: Vec::new(),
                    runtime: Default::default(),
                },
                vm::rootfs::ImageConfig::default(),
            ))
        }
    }
}

/// The first payload whose platform matches this host, else `platform-unsupported`.
pub fn select_payload<'m>(
    manifest: &'m ReceivedManifest,
    host: &Platform,
) -> Result<&'m Payload, ImageError> {
    manifest.select_payload(host).ok_or_else(|| {
        let offered: Vec<String> = manifest
            .manifest
            .payload
            .iter()
            .map(|p| {
                let pl = p.platform.clone().unwrap_or_else(Platform::golem_default);
                format!("{}/{}", pl.arch, pl.os)
            })
            .collect();
        ImageError::PlatformUnsupported {
            arch: host.arch.clone(),
            os: host.os.clone(),
            offered: offered.join(", "),
        }
    })
}

fn digest(alg: Sha3) -> MessageDigest {
    match alg {
        Sha3::Sha3_224 => MessageDigest::sha3_224(),
        Sha3::Sha3_256 => MessageDigest::sha3_256(),
        Sha3::Sha3_384 => MessageDigest::sha3_384(),
        Sha3::Sha3_512 => MessageDigest::sha3_512(),
    }
}

fn alg_name(alg: Sha3) -> &'static str {
    match alg {
        Sha3::Sha3_224 => "sha3-224",
        Sha3::Sha3_256 => "sha3-256",
        Sha3::Sha3_384 => "sha3-384",
        Sha3::Sha3_512 => "sha3-512",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub path: PathBuf,
    pub hash: PayloadHash,
    /// False when the store already had it (nothing was fetched or copied).
    pub fetched: bool,
    pub bytes: u64,
}

/// `images/` in the data dir: `images/<sha3-N>/<hex>`, written only after verification
/// (temp file, fsync, rename), so a file there always matches its name.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    /// Show a progress bar on stderr for downloads (hidden when stderr is not a terminal).
    pub progress: bool,
    /// `None`: the operator's own fetch (`provider vm run`): local paths, `file://`, any
    /// address. `Some`: a requestor's manifest, fetched under these limits.
    requestor: Option<FetchLimits>,
    /// The data dir (its registry logins, `registry/auth.json`).
    data: DataDir,
    /// Registries spoken to over plain HTTP besides loopback ones (the daemon's
    /// `plain_http_registries`, `vm run --plain-http`).
    pub plain_http: Vec<String>,
}

impl ImageStore {
    /// The store for the operator's own commands.
    pub fn new(data: &DataDir) -> Self {
        Self {
            dir: data.root().join("images"),
            progress: true,
            requestor: None,
            data: data.clone(),
            plain_http: Vec::new(),
        }
    }

    /// The store for a requestor's payloads: only `http(s)`, under `limits`.
    pub fn for_requestor(data: &DataDir, limits: FetchLimits) -> Self {
        Self {
            requestor: Some(limits),
            ..Self::new(data)
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_for(&self, hash: &PayloadHash) -> PathBuf {
        self.dir.join(alg_name(hash.algorithm)).join(&hash.hex)
    }

    /// The payload's image: from the store when present, else from its URLs in order (the
    /// first that yields bytes with the right hash wins; every failure is reported).
    pub fn fetch_payload(&self, payload: &Payload) -> Result<StoredImage, ImageError> {
        let hash = PayloadHash::parse(&payload.hash).map_err(ImageError::BadHash)?;
        let mut errors = Vec::new();
        for url in &payload.urls {
            match self.fetch(url, Some(&hash)) {
                Ok(img) => return Ok(img),
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Err(ImageError::Fetch {
                url: "(none)".into(),
                message: "the payload lists no URL".into(),
            }),
            1 => Err(errors.remove(0)),
            _ => Err(ImageError::Several(errors)),
        }
    }

    /// The image as a disk for the VM: a squashfs or GVMI is used as stored (checked:
    /// superblock, compression, trailer); a tarball is converted once, with the reader's
    /// entry guards, into `images/squashfs/<alg>/<hex>` and that copy is used from then on.
    /// `max_unpacked` bounds what a tarball may expand to.
    pub fn disk_image(
        &self,
        image: &StoredImage,
        max_unpacked: u64,
    ) -> Result<vm::rootfs::DiskImage, ImageError> {
        match vm::rootfs::inspect(&image.path)? {
            vm::rootfs::ImageKind::Squashfs { .. } => vm::rootfs::disk_image(&image.path),
            vm::rootfs::ImageKind::Tarball => {
                let converted = self
                    .dir
                    .join("squashfs")
                    .join(alg_name(image.hash.algorithm))
                    .join(&image.hash.hex);
                if converted.is_file() {
                    if let Ok(d) = vm::rootfs::disk_image(&converted) {
                        return Ok(vm::rootfs::DiskImage {
                            source_format: "tarball",
                            ..d
                        });
                    }
                    // A damaged conversion is made again, not used.
                    let _ = fs::remove_file(&converted);
                }
                sweep_stale_work(&self.dir.join("tmp"));
                if let Some(parent) = converted.parent() {
                    sweep_stale_work(parent);
                }
                let started = std::time::Instant::now();
                let d = vm::rootfs::tarball_to_squashfs(
                    &image.path,
                    &converted,
                    &self.dir.join("tmp"),
                    vm::rootfs::ConvertLimits {
                        max_bytes: max_unpacked,
                        max_entries: 1_000_000,
                    },
                )?;
                tracing::info!(
                    image = %image.path.display(),
                    squashfs = %converted.display(),
                    ms = started.elapsed().as_millis() as u64,
                    "converted a rootfs tarball into a squashfs image"
                );
                Ok(d)
            }
        }
    }

    /// Fetches `source` (a URL or a local path). With `expected`, the store is consulted
    /// first and the bytes must hash to it; without, the image is stored under its
    /// SHA3-256.
    pub fn fetch(
        &self,
        source: &str,
        expected: Option<&PayloadHash>,
    ) -> Result<StoredImage, ImageError> {
        if let Some(h) = expected {
            let path = self.path_for(h);
            if let Ok(meta) = fs::metadata(&path) {
                return Ok(StoredImage {
                    path,
                    hash: h.clone(),
                    fetched: false,
                    bytes: meta.len(),
                });
            }
        }
        if source.starts_with("oci://") {
            return self.fetch_oci(source, expected);
        }
        // A requestor's source must be http(s); the operator's may also be a local file.
        let http = match &self.requestor {
            Some(limits) => Some((fetch::requestor_url(source)?, limits.clone())),
            None => url::Url::parse(source)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .map(|u| (u, FetchLimits::operator())),
        };
        let alg = expected.map(|h| h.algorithm).unwrap_or(Sha3::Sha3_256);
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempfile_in(&self.dir)
            .map_err(io_err("create a temp file in", &self.dir))?;
        let mut sink = HashingWriter {
            inner: io::BufWriter::new(tmp.as_file()),
            hasher: Hasher::new(digest(alg)).map_err(|e| ImageError::Format {
                path: self.dir.clone(),
                message: e.to_string(),
            })?,
            bytes: 0,
        };
        match http {
            Some((url, limits)) => {
                let cap = limits.cap(fs4::available_space(&self.dir).ok());
                let bar = self.progress_bar("fetching image".into());
                let mut progress = |len: Option<u64>, n: u64| {
                    if let Some(b) = &bar {
                        if n == 0 {
                            if let Some(len) = len {
                                b.set_length(len);
                                b.set_style(bar_style());
                                b.reset_elapsed();
                            }
                        }
                        b.inc(n);
                    }
                };
                fetch::fetch(url, &limits, cap, &mut sink, &mut progress)?;
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
            }
            None => self.copy_local(source, &mut sink)?,
        }
        sink.inner.flush().map_err(io_err("write", tmp.path()))?;
        let actual = hex(&sink.hasher.finish().map_err(|e| ImageError::Format {
            path: tmp.path().to_owned(),
            message: e.to_string(),
        })?);
        let bytes = sink.bytes;
        drop(sink);
        if let Some(h) = expected {
            if h.hex != actual {
                return Err(ImageError::HashMismatch {
                    source_name: source.to_owned(),
                    expected: h.hex.clone(),
                    actual,
                });
            }
        }
        let hash = PayloadHash {
            algorithm: alg,
            hex: actual,
        };
        let path = self.path_for(&hash);
        let parent = path.parent().unwrap_or(&self.dir).to_owned();
        fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
        tmp.as_file()
            .sync_all()
            .map_err(io_err("fsync", tmp.path()))?;
        tmp.persist(&path).map_err(|e| ImageError::Io {
            action: "store",
            path: path.clone(),
            source: e.error,
        })?;
        Ok(StoredImage {
            path,
            hash,
            fetched: true,
            bytes,
        })
    }

    /// An `oci://` image: its top manifest is resolved (and must hash to `expected`), then
    /// unless the store has it already, its layers are pulled into a squashfs stored under
    /// that hash ([`oci::pull`]). A requestor's reference must pin a digest.
    fn fetch_oci(
        &self,
        source: &str,
        expected: Option<&PayloadHash>,
    ) -> Result<StoredImage, ImageError> {
        let refused = |why: String| ImageError::UrlRefused {
            url: source.to_owned(),
            why,
        };
        let r = oci::reference::OciRef::parse(source).map_err(refused)?;
        if self.requestor.is_some() && r.digest.is_none() {
            return Err(refused(
                "a requestor's oci:// reference must pin its content with @sha256:DIGEST (a tag can be moved)".into(),
            ));
        }
        let limits = self.requestor.clone().unwrap_or_else(FetchLimits::operator);
        let logins = oci::auth::AuthFile::load(&self.data).map_err(|e| {
            tracing::warn!(error = %e, "registry logins unreadable; pulling without them");
            ImageError::RegistryAuth {
                registry: r.registry.clone(),
                why: "the provider's registry logins cannot be read (its operator's log has the cause)".into(),
            }
        });
        let credential = match logins {
            Ok(l) => l
                .registries
                .get(&r.registry)
                .filter(|c| self.requestor.is_none() || c.for_requestors)
                .cloned(),
            // The operator is told; a requestor's public image needs no login.
            Err(e) if self.requestor.is_none() => return Err(e),
            Err(_) => None,
        };
        let mut reg = oci::Registry::new(&r, &limits, &self.plain_http, credential);
        let top = oci::resolve(&mut reg)?;
        let alg = expected.map(|h| h.algorithm).unwrap_or(Sha3::Sha3_256);
        let actual = openssl::hash::hash(digest(alg), &top.bytes)
            .map(|d| hex(&d))
            .map_err(|e| ImageError::Convert(e.to_string()))?;
        if let Some(h) = expected {
            if h.hex != actual {
                return Err(ImageError::HashMismatch {
                    source_name: format!(
                        "{source} (its manifest {}, the bytes `hash` covers)",
                        top.digest
                    ),
                    expected: h.hex.clone(),
                    actual,
                });
            }
        }
        let hash = PayloadHash {
            algorithm: alg,
            hex: actual,
        };
        let path = self.path_for(&hash);
        if let Ok(meta) = fs::metadata(&path) {
            return Ok(StoredImage {
                path,
                hash,
                fetched: false,
                bytes: meta.len(),
            });
        }
        let work = self.dir.join("tmp");
        sweep_stale_work(&work);
        let pull = oci::Pull {
            limits: &limits,
            platform: oci::HostPlatform::detect(),
            features: oci::compat::HostFeatures::detect(),
            work: &work,
            max_unpacked: if self.requestor.is_some() {
                limits.max_bytes
            } else {
                u64::MAX
            },
            progress: self.progress_bar(format!("pulling {}", r.repository)),
        };
        oci::pull(&mut reg, &top, &pull, &path)?;
        let bytes = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        Ok(StoredImage {
            path,
            hash,
            fetched: true,
            bytes,
        })
    }

    /// The operator's own `file://` or path (http(s) went through [`fetch::fetch`]).
    fn copy_local(&self, source: &str, sink: &mut dyn Write) -> Result<(), ImageError> {
        let fetch_err = |message: String| ImageError::Fetch {
            url: source.to_owned(),
            message,
        };
        let local = if source.contains("://") {
            let url = url::Url::parse(source).map_err(|e| fetch_err(e.to_string()))?;
            match url.scheme() {
                "file" => url
                    .to_file_path()
                    .map_err(|_| fetch_err("not a local file path".into()))?,
                other => {
                    return Err(fetch_err(format!(
                        "unsupported scheme `{other}` (http, https and file are)"
                    )))
                }
            }
        } else {
            PathBuf::from(source)
        };
        let mut f = File::open(&local).map_err(io_err("open", &local))?;
        io::copy(&mut f, sink).map_err(io_err("read", &local))?;
        Ok(())
    }
}

impl ImageStore {
    /// A download's progress on stderr. indicatif draws nothing when stderr is not a
    /// terminal, so logs and pipes get no control characters; `--json` turns it off too.
    /// It starts as a spinner with `message` (a length is not known before the registry's
    /// manifest or the server's headers); [`bar_style`] takes over once it is.
    fn progress_bar(&self, message: String) -> Option<indicatif::ProgressBar> {
        if !self.progress {
            return None;
        }
        // A pull that fails midway clears its bar too, so the error is not printed after a
        // half-drawn line.
        let bar =
            indicatif::ProgressBar::no_length().with_finish(indicatif::ProgressFinish::AndClear);
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
            bar.set_style(style);
        }
        bar.set_message(message);
        Some(bar)
    }
}

/// A download of known length: message, bar, bytes, and the mean rate since the bar
/// became one. (indicatif's `{bytes_per_sec}` is a 15 s moving average that starts at zero:
/// a pull of a few seconds showed a tenth of its real rate.)
pub(crate) fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {mean_rate}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "mean_rate",
            |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let secs = s.elapsed().as_secs_f64();
                if secs > 0.0 {
                    let rate = (s.pos() as f64 / secs) as u64;
                    let _ = write!(w, "{}/s", indicatif::HumanBytes(rate));
                }
            },
        )
}

/// Passes writes on while hashing and counting what passed (fetches and OCI blobs).
pub(crate) struct HashingWriter<W: Write> {
    pub(crate) inner: W,
    pub(crate) hasher: Hasher,
    pub(crate) bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]).map_err(io::Error::other)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_verifies_before_storing_and_skips_a_second_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ImageStore::new(&DataDir::new(dir.path()));
        store.progress = false;
        let src = dir.path().join("img.tar");
        fs::write(&src, b"some image bytes").unwrap();
        let first = store.fetch(src.to_str().unwrap(), None).unwrap();
        assert!(first.fetched);
        assert_eq!(fs::read(&first.path).unwrap(), b"some image bytes");

        let wrong = PayloadHash::parse(&format!("sha3:{}", "0".repeat(64))).unwrap();
        let err = store
            .fetch(src.to_str().unwrap(), Some(&wrong))
            .unwrap_err();
        assert!(matches!(err, ImageError::HashMismatch { .. }), "{err}");
        assert!(!store.path_for(&wrong).exists());

        // Same hash again, even from a URL that no longer exists: served from the store.
        fs::remove_file(&src).unwrap();
        let again = store
            .fetch(&format!("file://{}", src.display()), Some(&first.hash))
            .unwrap();
        assert!(!again.fetched);
        assert_eq!(again.path, first.path);
        let leftovers: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".fetch-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn sha3_variants_follow_the_hex_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ImageStore::new(&DataDir::new(dir.path()));
        store.progress = false;
        let src = dir.path().join("abc");
        fs::write(&src, b"abc").unwrap();
        // FIPS 202 test vectors for "abc".
        for h in [
            "sha3:e642824c3f8cf24ad09234ee7d3c766fc9a3a5168d0c94ad73b46fdf",
            "sha3:3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
            "sha3:ec01498288516fc926459f58e2c6ad8df9b473cb0fc08c2596da7cf0e49be4b298d88cea927ac7f539f1edf228376d25",
            "sha3:b751850b1a57168a5693cd924b6b096e08f621827444f70d884f5d0240d2712e10e116e9192af3c91a7ec57647e3934057340b4cf408d5a56592f8274eec53f0",
        ] {
            let hash = PayloadHash::parse(h).unwrap();
            let img = store.fetch(src.to_str().unwrap(), Some(&hash)).unwrap();
            assert_eq!(img.hash, hash);
        }
    }
}
