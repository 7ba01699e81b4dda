//! Payload images as disks: what kind of image a file is ([`inspect`]: a squashfs, a
//! GVMI, a rootfs tarball), the checks a squashfs passes before it is attached to a VM
//! (magic, version, a compression the guest kernel reads, `bytes_used` within the file),
//! a GVMI's trailer (its container config: `Env`, `WorkingDir`, `Volumes`, …), and the
//! one-time conversion of a checked tarball into a squashfs ([`tarball_to_squashfs`]).
//!
//! See `docs/payload-runtime.md` for the formats and the decisions (why `mksquashfs` with
//! fixed arguments and a guarded staging directory, why zstd).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::image::{self, io_err, EntryKind, ImageError};

/// The squashfs magic, `hsqs` as stored (little-endian `0x73717368`).
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
const SUPERBLOCK_LEN: usize = 96;
/// A GVMI's JSON is at most this long: real ones are a few KiB.
pub const MAX_GVMI_CONFIG: u64 = 1 << 20;
/// Volumes and env entries an image config may carry.
const MAX_VOLUMES: usize = 64;
const MAX_ENV: usize = 1024;

/// A squashfs compressor, by the superblock's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Lzma,
    Lzo,
    Xz,
    Lz4,
    Zstd,
}

impl Compression {
    fn from_id(id: u16) -> Option<Self> {
        Some(match id {
            1 => Compression::Gzip,
            2 => Compression::Lzma,
            3 => Compression::Lzo,
            4 => Compression::Xz,
            5 => Compression::Lz4,
            6 => Compression::Zstd,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Whether the guest kernel (Debian's cloud kernel: every compressor but the legacy
    /// lzma, which no Linux reads) mounts it.
    pub fn guest_reads(self) -> bool {
        self != Compression::Lzma
    }
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageKind {
    /// A squashfs image (`bytes_used` bytes of it), possibly followed by a GVMI trailer.
    Squashfs {
        compression: Compression,
        bytes_used: u64,
    },
    /// A rootfs tarball (plain or gzip): converted with [`tarball_to_squashfs`].
    Tarball,
}

/// The parts of a Docker/OCI container config a payload's commands honour. GVMI images
/// carry it in their trailer (PascalCase keys, as Docker writes them); keys this provider
/// does not use (`Labels`, `ExposedPorts`, …) are ignored, since every real image has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `KEY=value` pairs, in order, for every `run`.
    pub env: Vec<(String, String)>,
    /// The directory `run` commands start in (made on the writable layer if missing).
    pub working_dir: Option<String>,
    /// Directories made writable (on the writable layer) before the first command.
    pub volumes: Vec<String>,
    /// The image's default command (`Entrypoint` + `Cmd`), shown to the operator; an
    /// ExeScript `run` always names its own entry point.
    pub default_command: Vec<String>,
    /// The image's `User`: reported, not applied (the agent runs commands as root inside
    /// the VM today).
    pub user: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    volumes: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    user: Option<String>,
}

/// Env keys the provider sets for every command; an image cannot move them (its egress
/// would stop working, or go around nothing: there is no other way out).
const PROVIDER_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
];

impl ImageConfig {
    /// Parses a Docker-style container config (the JSON of a GVMI trailer, or an OCI
    /// image config's `config` object), checking every path it names.
    pub fn from_json(what: &str, json: &[u8]) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_slice(json)
            .map_err(|e| format!("{what}: not a container config: {e}"))?;
        let mut env = Vec::new();
        let raw_env = raw.env.unwrap_or_default();
        if raw_env.len() > MAX_ENV {
            return Err(format!(
                "{what}: Env has {} entries, at most {MAX_ENV}",
                raw_env.len()
            ));
        }
        for e in raw_env {
            let Some((k, v)) = e.split_once('=') else {
                return Err(format!("{what}: Env entry `{e}` is not KEY=value"));
            };
            if k.is_empty() || k.contains('\0') || v.contains('\0') {
                return Err(format!("{what}: Env entry `{e}` has an empty key or a NUL"));
            }
            if PROVIDER_ENV.contains(&k) {
                continue;
            }
            env.push((k.to_owned(), v.to_owned()));
        }
        let working_dir = match raw.working_dir.filter(|w| !w.is_empty()) {
            Some(w) => Some(guest_dir(&w).map_err(|e| format!("{what}: WorkingDir {e}"))?),
            None => None,
        };
        let raw_volumes = raw.volumes.unwrap_or_default();
        if raw_volumes.len() > MAX_VOLUMES {
            return Err(format!(
                "{what}: {} Volumes, at most {MAX_VOLUMES}",
                raw_volumes.len()
            ));
        }
        let mut volumes = Vec::new();
        for v in raw_volumes.keys() {
            volumes.push(guest_dir(v).map_err(|e| format!("{what}: volume {e}"))?);
        }
        let mut default_command = raw.entrypoint.unwrap_or_default();
        default_command.extend(raw.cmd.unwrap_or_default());
        Ok(ImageConfig {
            env,
            working_dir,
            volumes,
            default_command,
            user: raw.user.filter(|u| !u.is_empty()),
        })
    }

    /// The directories to make on the writable layer: the volumes and the working dir.
    pub fn dirs(&self) -> Vec<String> {
        let mut d = self.volumes.clone();
        d.extend(self.working_dir.iter().cloned());
        d.sort();
        d.dedup();
        d
    }
}

/// An absolute guest directory, normalised (`/data/x`); no `..`, no NUL, not `/` itself
/// for a volume (the root is always writable), at most 255 bytes.
fn guest_dir(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` is not an absolute path"));
    }
    if p.len() > 255 || p.contains('\0') {
        return Err(format!("`{p}` is longer than 255 bytes or has a NUL"));
    }
    let mut parts = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => parts.push(n.to_string_lossy().into_owned()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("`{p}` has a `..`"));
            }
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// An image ready to attach: the file, its kind, and its config (empty but for a GVMI).
#[derive(Debug, Clone)]
pub struct DiskImage {
    pub path: PathBuf,
    pub compression: Compression,
    pub config: ImageConfig,
    /// `gvmi`, `squashfs`, or `tarball` (converted).
    pub source_format: &'static str,
}

fn format_err(path: &Path, message: String) -> ImageError {
    ImageError::Format {
        path: path.to_owned(),
        message,
    }
}

/// Reads the first bytes of `path`: a squashfs (checked: see [`check_squashfs`]) or a
/// tarball; anything else is refused, naming what it starts with.
pub fn inspect(path: &Path) -> Result<ImageKind, ImageError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    let mut head = vec![0u8; SUPERBLOCK_LEN.min(len as usize)];
    f.read_exact(&mut head).map_err(io_err("read", path))?;
    if head.starts_with(SQUASHFS_MAGIC) {
        let (compression, bytes_used) = check_squashfs(path, &head, len)?;
        return Ok(ImageKind::Squashfs {
            compression,
            bytes_used,
        });
    }
    if head.starts_with(&[0x1f, 0x8b]) || looks_like_tar(&mut f, len) {
        return Ok(ImageKind::Tarball);
    }
    Err(format_err(
        path,
        format!(
            "neither a squashfs image (no `hsqs` magic) nor a rootfs tarball; it starts with {:02x?}",
            &head[..head.len().min(4)]
        ),
    ))
}

fn looks_like_tar(f: &mut File, len: u64) -> bool {
    if len < 512 {
        return false;
    }
    let mut block = [0u8; 512];
    if f.seek(SeekFrom::Start(0)).is_err() || f.read_exact(&mut block).is_err() {
        return false;
    }
    // ustar (POSIX and GNU) magic, else a header whose checksum adds up (v7 tar).
    if &block[257..262] == b"ustar" {
        return true;
    }
    let stored = std::str::from_utf8(&block[148..156])
        .ok()
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' '))
        .and_then(|s| u32::from_str_radix(s, 8).ok());
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    stored == Some(sum)
}

/// The superblock checks: version 4.0, a known compressor the guest reads, a sane block
/// size, and `bytes_used` within the file.
fn check_squashfs(path: &Path, sb: &[u8], len: u64) -> Result<(Compression, u64), ImageError> {
    if sb.len() < SUPERBLOCK_LEN {
        return Err(format_err(
            path,
            format!("a squashfs image of {len} bytes is shorter than its superblock"),
        ));
    }
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(sb[o..o + 8].try_into().unwrap_or([0; 8]));
    let (major, minor) = (u16_at(28), u16_at(30));
    if (major, minor) != (4, 0) {
        return Err(format_err(
            path,
            format!("squashfs version {major}.{minor}; Linux mounts only 4.0"),
        ));
    }
    let id = u16_at(20);
    let compression = Compression::from_id(id)
        .ok_or_else(|| format_err(path, format!("unknown squashfs compression id {id}")))?;
    if !compression.guest_reads() {
        return Err(format_err(
            path,
            "it is lzma-compressed (squashfs's legacy format before xz), which the guest kernel (and every Linux) cannot mount; build it with -comp zstd, xz, lzo, lz4 or gzip".into(),
        ));
    }
    let block = u32_at(12);
    if !(4096..=1 << 20).contains(&block) || !block.is_power_of_two() {
        return Err(format_err(
            path,
            format!("squashfs block size {block} is invalid"),
        ));
    }
    let bytes_used = u64_at(40);
    if bytes_used > len || bytes_used < SUPERBLOCK_LEN as u64 {
        return Err(format_err(
            path,
            format!("truncated: its superblock says {bytes_used} bytes, the file has {len}"),
        ));
    }
    Ok((compression, bytes_used))
}

/// A GVMI's trailer: `[squashfs][crc32 LE][json][len as 8 ASCII digits]`. `Ok(None)` when
/// the file ends where the squashfs does (a plain squashfs, padded to 4 KiB).
pub fn read_gvmi_trailer(path: &Path, bytes_used: u64) -> Result<Option<ImageConfig>, ImageError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let len = f.metadata().map_err(io_err("stat", path))?.len();
    if len < 12 || len - bytes_used < 12 {
        return Ok(None);
    }
    let mut digits = [0u8; 8];
    f.seek(SeekFrom::Start(len - 8))
        .and_then(|_| f.read_exact(&mut digits))
        .map_err(io_err("read", path))?;
    if !digits.iter().all(u8::is_ascii_digit) {
        // mksquashfs pads with zeros: a plain squashfs ends in NULs, not digits.
        if digits.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        return Err(format_err(
            path,
            format!(
                "bytes after the squashfs are not a GVMI trailer: the last 8 bytes {digits:02x?} are not a decimal length"
            ),
        ));
    }
    let n: u64 = std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX);
    if n > MAX_GVMI_CONFIG {
        return Err(format_err(
            path,
            format!("the GVMI config is {n} bytes, at most {MAX_GVMI_CONFIG}"),
        ));
    }
    if n + 12 > len || len - 12 - n < bytes_used {
        return Err(format_err(
            path,
            format!("the GVMI trailer says its config is {n} bytes, which overlaps the squashfs ({bytes_used} bytes of {len})"),
        ));
    }
    let mut crc_json = vec![0u8; n as usize + 4];
    f.seek(SeekFrom::Start(len - 12 - n))
        .and_then(|_| f.read_exact(&mut crc_json))
        .map_err(io_err("read", path))?;
    let (crc, json) = crc_json.split_at(4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let mut h = flate2::Crc::new();
    h.update(json);
    if h.sum() != stored {
        return Err(format_err(
            path,
            format!(
                "the GVMI config's CRC-32 is {:#010x}, its trailer says {stored:#010x}",
                h.sum()
            ),
        ));
    }
    ImageConfig::from_json("the GVMI config", json)
        .map(Some)
        .map_err(|m| format_err(path, m))
}

/// A squashfs or GVMI file, checked, ready to attach as is.
pub fn disk_image(path: &Path) -> Result<DiskImage, ImageError> {
    match inspect(path)? {
        ImageKind::Squashfs {
            compression,
            bytes_used,
        } => {
            let config = read_gvmi_trailer(path, bytes_used)?;
            Ok(DiskImage {
                path: path.to_owned(),
                compression,
                source_format: if config.is_some() { "gvmi" } else { "squashfs" },
                config: config.unwrap_or_default(),
            })
        }
        ImageKind::Tarball => Err(format_err(
            path,
            "a tarball, not a disk image: convert it first (tarball_to_squashfs)".into(),
        )),
    }
}

/// Limits on a tarball's conversion (a gzip of zeros unpacks without end).
#[derive(Debug, Clone, Copy)]
pub struct ConvertLimits {
    /// Total bytes of the files it holds.
    pub max_bytes: u64,
    pub max_entries: u64,
}

/// The compressor the provider writes: fast to decompress under TCG and compact (see
/// `docs/payload-runtime.md` for the figures).
pub const WRITE_COMPRESSION: &str = "zstd";

/// `mksquashfs` (squashfs-tools), or `$PROVIDER_MKSQUASHFS`.
pub fn mksquashfs_binary() -> PathBuf {
    std::env::var_os("PROVIDER_MKSQUASHFS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            [
                "/usr/bin/mksquashfs",
                "/usr/sbin/mksquashfs",
                "/sbin/mksquashfs",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("mksquashfs"))
        })
}

/// Converts the rootfs tarball `tar` into the squashfs `out`: every entry passes
/// [`image::read_rootfs`]'s guards and is written under a fresh staging directory in
/// `work` (created `0700`, removed afterwards), then `mksquashfs` packs it with fixed
/// arguments, confined by Landlock to reading the staging tree and writing `out`'s
/// directory. `out` appears only complete (written as a temp file, fsynced, renamed).
pub fn tarball_to_squashfs(
    tar: &Path,
    out: &Path,
    work: &Path,
    limits: ConvertLimits,
) -> Result<DiskImage, ImageError> {
    layers_to_squashfs(&[tar.to_owned()], out, work, limits).map(|d| DiskImage {
        source_format: "tarball",
        ..d
    })
}

/// Like [`tarball_to_squashfs`] for an image's layers (OCI/Docker), applied in order: a
/// layer's whiteouts (`.wh.NAME`: NAME of a lower layer is gone; `.wh..wh..opq`: the
/// directory's lower contents are gone) take effect before its own entries are written, and
/// a later layer's entry replaces a lower layer's (a directory included). Every layer
/// passes the tarball reader's guards, and no entry is written through a path that is a
/// symlink in the layers below it. `limits` bound all layers together. A hard link to a
/// file of a lower layer is refused (the reader links only within one archive).
pub fn layers_to_squashfs(
    layers: &[PathBuf],
    out: &Path,
    work: &Path,
    limits: ConvertLimits,
) -> Result<DiskImage, ImageError> {
    fs::create_dir_all(work).map_err(io_err("create", work))?;
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(work)
        .map_err(io_err("create a staging dir in", work))?;
    let root = staging.path().join("root");
    fs::create_dir(&root).map_err(io_err("create", &root))?;
    apply_layers(layers, &root, limits)?;
    let out_dir = out.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(out_dir).map_err(io_err("create", out_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".sqfs-")
        .tempfile_in(out_dir)
        .map_err(io_err("create a temp file in", out_dir))?;
    let binary = mksquashfs_binary();
    let mut cmd = Command::new(&binary);
    cmd.arg(&root)
        .arg(tmp.path())
        .args([
            "-noappend",
            "-comp",
            WRITE_COMPRESSION,
            "-b",
            "131072",
            "-no-xattrs",
            "-no-progress",
            "-quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut read = vec![binary.clone(), root.clone()];
    for p in [
        "/usr",
        "/lib",
        "/lib64",
        "/etc/ld.so.cache",
        "/proc",
        "/sys/devices/system/cpu",
    ] {
        if Path::new(p).exists() {
            read.push(PathBuf::from(p));
        }
    }
    let policy = crate::confine::FsPolicy {
        read,
        write: vec![out_dir.to_owned(), PathBuf::from("/dev/null")],
    };
    crate::confine::confine_command(
        &mut cmd,
        &policy,
        crate::confine::Rlimits {
            address_space: 16 << 30,
            open_files: 4096,
        },
    )
    .map_err(|e| ImageError::Convert(format!("cannot confine mksquashfs: {e}")))?;
    let output = cmd.output().map_err(|e| {
        ImageError::Convert(format!(
            "cannot run {} (install squashfs-tools): {e}",
            binary.display()
        ))
    })?;
    if !output.status.success() {
        return Err(ImageError::Convert(format!(
            "{} failed ({}): {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_err("fsync", tmp.path()))?;
    tmp.persist(out).map_err(|e| ImageError::Io {
        action: "rename into place",
        path: out.to_owned(),
        source: e.error,
    })?;
    drop(staging);
    disk_image(out).map(|d| DiskImage {
        source_format: "layers",
        ..d
    })
}

/// Writes `layers` in order into the empty directory `root` (see [`layers_to_squashfs`]).
fn apply_layers(layers: &[PathBuf], root: &Path, limits: ConvertLimits) -> Result<(), ImageError> {
    let mut budget = Budget {
        bytes: 0,
        entries: 0,
        limits,
    };
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", root))?;
    for (i, layer) in layers.iter().enumerate() {
        if i > 0 {
            apply_whiteouts(layer, root)?;
        }
        unpack_checked(layer, root, &mut budget, i > 0)?;
    }
    Ok(())
}

/// What the layers of one conversion may hold together.
struct Budget {
    bytes: u64,
    entries: u64,
    limits: ConvertLimits,
}

/// The prefix of an OCI whiteout file, and the name of the opaque-directory marker.
const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// A layer's whiteouts, applied to what the layers below it left in `root`.
fn apply_whiteouts(layer: &Path, root: &Path) -> Result<(), ImageError> {
    image::read_rootfs(layer, |e| {
        let (dir, name) = match e.path.rsplit_once('/') {
            Some((d, n)) => (Some(d), n),
            None => (None, e.path.as_str()),
        };
        let Some(hidden) = name.strip_prefix(WHITEOUT) else {
            return Ok(());
        };
        let parent = match dir {
            Some(d) => root.join(d),
            None => root.to_owned(),
        };
        check_real_dirs(root, dir.unwrap_or(""), &e.path)?;
        if name == OPAQUE {
            if let Ok(children) = fs::read_dir(&parent) {
                for c in children.flatten() {
                    remove_any(&c.path())?;
                }
            }
            return Ok(());
        }
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            return Err(ImageError::UnsafeEntry {
                entry: e.path.clone(),
                reason: "a whiteout that names no file".into(),
            });
        }
        remove_any(&parent.join(hidden))
    })
}

/// Removes a file, symlink or whole directory (never following a symlink); absent is fine.
fn remove_any(p: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err("remove", p)),
        Ok(_) => fs::remove_file(p).map_err(io_err("remove", p)),
        Err(_) => Ok(()),
    }
}

/// Every component of `rel` (a normalised relative path) under `root` is a real directory
/// or absent: an entry must never be written through a symlink a lower layer made.
fn check_real_dirs(root: &Path, rel: &str, entry: &str) -> Result<(), ImageError> {
    let mut p = root.to_owned();
    for c in rel.split('/').filter(|c| !c.is_empty()) {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(ImageError::UnsafeEntry {
                    entry: entry.to_owned(),
                    reason: format!(
                        "its parent `{c}` is {} in the layers below",
                        if m.file_type().is_symlink() {
                            "a symlink"
                        } else {
                            "not a directory"
                        }
                    ),
                })
            }
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Writes the checked entries of `tar` under `root`. No entry can land outside it: the
/// reader refuses `..`, absolute paths, links out of the root and anything under an
/// earlier symlink, and every file is created `O_NOFOLLOW | O_EXCL`.
fn unpack_checked(
    tar: &Path,
    root: &Path,
    budget: &mut Budget,
    layered: bool,
) -> Result<(), ImageError> {
    let limits = budget.limits;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    // Entries of this layer: a lower layer's file or directory of the same name is
    // replaced, one of this layer's is not.
    let mut mine: std::collections::HashSet<String> = std::collections::HashSet::new();
    image::read_rootfs(tar, |e| {
        budget.entries += 1;
        if budget.entries > limits.max_entries {
            return Err(format_err(
                tar,
                format!("more than {} entries", limits.max_entries),
            ));
        }
        let base = e.path.rsplit('/').next().unwrap_or("");
        if layered && base.starts_with(WHITEOUT) {
            return Ok(()); // applied before this layer's entries
        }
        if layered {
            let parent = e.path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            check_real_dirs(root, parent, &e.path)?;
            if !mine.contains(&e.path) {
                let dest = root.join(&e.path);
                // A directory replaced by a file, or a file by a directory.
                let lower_replaced = fs::symlink_metadata(&dest)
                    .is_ok_and(|m| m.is_dir() != (e.kind == EntryKind::Dir));
                if lower_replaced {
                    remove_any(&dest)?;
                }
            }
            mine.insert(e.path.clone());
        }
        let dest = root.join(&e.path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        match &e.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(ImageError::UnsafeEntry {
                            entry: e.path.clone(),
                            reason: "a directory where the archive already has a file".into(),
                        })
                    }
                    Err(_) => fs::create_dir(&dest).map_err(io_err("create", &dest))?,
                }
                // Modes last: a read-only directory must still take its children.
                dirs.push((dest.clone(), e.mode));
            }
            EntryKind::File => {
                budget.bytes = budget.bytes.saturating_add(e.size);
                if budget.bytes > limits.max_bytes {
                    return Err(format_err(
                        tar,
                        format!("its files hold more than {} bytes", limits.max_bytes),
                    ));
                }
                replace_non_dir(&dest, &e.path)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io_err("create", &dest))?;
                let mut left = e.size;
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = e.data.read(&mut buf[..want]).map_err(io_err("read", tar))?;
                    if n == 0 {
                        return Err(format_err(
                            tar,
                            format!("{}: archive ends inside the file", e.path),
                        ));
                    }
                    f.write_all(&buf[..n]).map_err(io_err("write", &dest))?;
                    left -= n as u64;
                }
                own(&dest, e.uid, e.gid)?;
                fs::set_permissions(&dest, fs::Permissions::from_mode(e.mode))
                    .map_err(io_err("chmod", &dest))?;
            }
            EntryKind::Symlink { target } => {
                replace_non_dir(&dest, &e.path)?;
                std::os::unix::fs::symlink(target, &dest).map_err(io_err("symlink", &dest))?;
                own(&dest, e.uid, e.gid)?;
            }
            EntryKind::HardLink { target } => {
                replace_non_dir(&dest, &e.path)?;
                fs::hard_link(root.join(target), &dest).map_err(io_err("link", &dest))?;
            }
            EntryKind::Fifo => {
                replace_non_dir(&dest, &e.path)?;
                nix::unistd::mkfifo(
                    &dest,
                    nix::sys::stat::Mode::from_bits_truncate(e.mode & 0o777),
                )
                .map_err(|errno| ImageError::Io {
                    action: "mkfifo",
                    path: dest.clone(),
                    source: errno.into(),
                })?;
                own(&dest, e.uid, e.gid)?;
            }
        }
        Ok(())
    })?;
    for (d, mode) in dirs.into_iter().rev() {
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &d))?;
    }
    Ok(())
}

/// A later entry of the same name wins, as when tar unpacks; a directory is never replaced.
fn replace_non_dir(dest: &Path, entry: &str) -> Result<(), ImageError> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => Err(ImageError::UnsafeEntry {
            entry: entry.to_owned(),
            reason: "a file where the archive already has a directory".into(),
        }),
        Ok(_) => fs::remove_file(dest).map_err(io_err("replace", dest)),
        Err(_) => Ok(()),
    }
}

/// Ownership as the archive says, when the host lets us (root); otherwise the files stay
/// the provider's, which only matters to a payload that checks.
fn own(path: &Path, uid: u32, gid: u32) -> Result<(), ImageError> {
    match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        Err(e) => Err(ImageError::Io {
            action: "chown",
            path: path.to_owned(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(compression: u16, bytes_used: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(SQUASHFS_MAGIC);
        b[12..16].copy_from_slice(&131072u32.to_le_bytes());
        b[20..22].copy_from_slice(&compression.to_le_bytes());
        b[28..30].copy_from_slice(&4u16.to_le_bytes());
        b[40..48].copy_from_slice(&bytes_used.to_le_bytes());
        b
    }

    fn trailer(json: &[u8]) -> Vec<u8> {
        let mut h = flate2::Crc::new();
        h.update(json);
        let mut t = h.sum().to_le_bytes().to_vec();
        t.extend_from_slice(json);
        t.extend_from_slice(format!("{:08}", json.len()).as_bytes());
        t
    }

    /// A layer tarball from (path, kind) pairs: `d` directory, `f:TEXT` file, `l:TARGET`
    /// symlink.
    fn layer(path: &Path, entries: &[(&str, &str)]) -> PathBuf {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        for (name, what) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            if *what == "d" {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, name, &[][..]).unwrap();
            } else if let Some(t) = what.strip_prefix("l:") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, t).unwrap();
            } else {
                let text = what.strip_prefix("f:").unwrap();
                h.set_size(text.len() as u64);
                b.append_data(&mut h, name, text.as_bytes()).unwrap();
            }
        }
        b.finish().unwrap();
        path.to_owned()
    }

    fn tree(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(root, &p, out);
                } else if m.file_type().is_symlink() {
                    out.push(format!("{rel} -> {}", fs::read_link(&p).unwrap().display()));
                } else {
                    out.push(format!("{rel} = {}", fs::read_to_string(&p).unwrap()));
                }
            }
        }
        walk(root, root, &mut out);
        out.sort();
        out
    }

    const LIMITS: ConvertLimits = ConvertLimits {
        max_bytes: 1 << 20,
        max_entries: 1000,
    };

    #[test]
    fn layers_apply_in_order_with_whiteouts_and_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let l1 = layer(
            &dir.path().join("1.tar"),
            &[
                ("a", "d"),
                ("a/keep", "f:1"),
                ("a/gone", "f:1"),
                ("b", "d"),
                ("b/old", "f:1"),
                ("c", "d"),
                ("c/x", "f:1"),
                ("d", "f:file"),
                ("e", "f:1"),
            ],
        );
        let l2 = layer(
            &dir.path().join("2.tar"),
            &[
                ("a/.wh.gone", "f:"),
                ("b/.wh..wh..opq", "f:"),
                ("b/new", "f:2"),
                ("c", "f:now a file"),
                ("d", "d"),
                ("d/y", "f:2"),
                ("e", "f:2"),
                (".wh.nothing-there", "f:"),
            ],
        );
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        apply_layers(&[l1, l2], &root, LIMITS).unwrap();
        assert_eq!(
            tree(&root),
            [
                "a/",
                "a/keep = 1",
                "b/",
                "b/new = 2",
                "c = now a file",
                "d/",
                "d/y = 2",
                "e = 2"
            ]
        );
    }

    #[test]
    fn a_layer_cannot_write_through_a_lower_layers_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let l1 = layer(
            &dir.path().join("1.tar"),
            &[("etc", "d"), ("link", "l:etc")],
        );
        for (i, evil) in [("link/passwd", "f:x"), ("link/.wh.hosts", "f:")]
            .into_iter()
            .enumerate()
        {
            let l2 = layer(&dir.path().join(format!("2-{i}.tar")), &[evil]);
            let root = dir.path().join(format!("root-{i}"));
            fs::create_dir(&root).unwrap();
            let e = apply_layers(&[l1.clone(), l2], &root, LIMITS)
                .unwrap_err()
                .to_string();
            assert!(e.contains("symlink in the layers below"), "{e}");
            assert!(!root.join("etc/passwd").exists());
        }
        // The budget is over all layers together.
        let big = layer(&dir.path().join("big.tar"), &[("x", "f:0123456789")]);
        let root = dir.path().join("root-budget");
        fs::create_dir(&root).unwrap();
        let small = ConvertLimits {
            max_bytes: 15,
            max_entries: 10,
        };
        let e = apply_layers(&[big.clone(), big], &root, small)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 15 bytes"), "{e}");
    }

    #[test]
    fn superblock_checks_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i");
        fs::write(&p, sb(2, 4096)).unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.contains("lzma"), "{e}");
        fs::write(&p, sb(6, 9000)).unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("9000"), "{e}");
        fs::write(&p, sb(9, 4096)).unwrap();
        assert!(inspect(&p)
            .unwrap_err()
            .to_string()
            .contains("compression id 9"));
        fs::write(&p, sb(3, 4000)).unwrap();
        assert_eq!(
            inspect(&p).unwrap(),
            ImageKind::Squashfs {
                compression: Compression::Lzo,
                bytes_used: 4000
            }
        );
        fs::write(&p, b"\x7fELF not an image at all, but long enough").unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(e.contains("neither a squashfs"), "{e}");
    }

    #[test]
    fn gvmi_trailer_is_read_from_the_end_and_its_crc_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.gvmi");
        let json = br#"{"Env":["A=1","http_proxy=evil","PATH=/x"],"WorkingDir":"/work/./dir","Volumes":{"/data":{},"/out/":{}},"Cmd":["/bin/sh"],"Labels":{"x":"y"}}"#;
        let mut f = sb(3, 4096);
        f.extend(trailer(json));
        fs::write(&p, &f).unwrap();
        let d = disk_image(&p).unwrap();
        assert_eq!(d.source_format, "gvmi");
        assert_eq!(
            d.config.env,
            [("A".into(), "1".into()), ("PATH".into(), "/x".into())]
        );
        assert_eq!(d.config.working_dir.as_deref(), Some("/work/dir"));
        assert_eq!(d.config.volumes, ["/data", "/out"]);
        assert_eq!(d.config.default_command, ["/bin/sh"]);
        assert_eq!(d.config.dirs(), ["/data", "/out", "/work/dir"]);

        // A flipped byte in the JSON.
        let at = f.len() - 20;
        f[at] ^= 1;
        fs::write(&p, &f).unwrap();
        assert!(disk_image(&p).unwrap_err().to_string().contains("CRC-32"));

        // A length that reaches into the squashfs.
        let mut g = sb(3, 4096);
        g.extend(b"\0\0\0\0{}00999999");
        fs::write(&p, &g).unwrap();
        assert!(disk_image(&p).unwrap_err().to_string().contains("overlaps"));

        // A volume with `..`.
        let mut h = sb(3, 4096);
        h.extend(trailer(br#"{"Volumes":{"/a/../../etc":{}}}"#));
        fs::write(&p, &h).unwrap();
        assert!(disk_image(&p).unwrap_err().to_string().contains("`..`"));

        // A plain squashfs: padding, no trailer.
        fs::write(&p, sb(6, 4000)).unwrap();
        let d = disk_image(&p).unwrap();
        assert_eq!(
            (d.source_format, d.config),
            ("squashfs", ImageConfig::default())
        );
    }
}
