//! Payload images: fetch (for a requestor only `http(s)://` under [`FetchLimits`], see
//! [`super::fetch`]; for the operator's own `provider vm run` also `file://` and a local
//! path), verify the manifest's `sha3:` hash before anything uses the bytes, store by hash
//! in the data dir's `images/`, and read rootfs tarballs (`.tar`, `.tar.gz`) entry by entry
//! with the guards that keep every entry inside the root.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use openssl::hash::{Hasher, MessageDigest};
use policies::manifest::{Payload, PayloadHash, Sha3};
use policies::{Platform, ReceivedManifest};

use super::fetch::{self, FetchLimits};
use crate::store::DataDir;
use net::codes::Code;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("platform-unsupported: no payload for this host ({arch}/{os}); the manifest offers {offered}")]
    PlatformUnsupported {
        arch: String,
        os: String,
        offered: String,
    },
    #[error("invalid payload hash: {0}")]
    BadHash(String),
    #[error("hash mismatch for {source_name}: expected sha3:{expected}, got sha3:{actual}; the image was not used")]
    HashMismatch {
        source_name: String,
        expected: String,
        actual: String,
    },
    #[error("fetch {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("payload-url-refused: {url}: {why}")]
    UrlRefused { url: String, why: String },
    #[error("payload-too-large: {url} is larger than {limit} bytes, {why}")]
    TooLarge {
        url: String,
        limit: u64,
        why: &'static str,
    },
    /// Writing a requestor's image into the store failed; the cause is in the operator's
    /// log, not in what the requestor is told.
    #[error("the provider could not store the image")]
    Store,
    /// Every URL of the payload failed, each for its reason.
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<ImageError>),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("image entry `{entry}` refused: {reason}")]
    UnsafeEntry { entry: String, reason: String },
    #[error("image {path}: {message}")]
    Format { path: PathBuf, message: String },
}

impl ImageError {
    /// The stable code a requestor is told (docs/verdicts.md).
    pub fn code(&self) -> Code {
        match self {
            ImageError::PlatformUnsupported { .. } => policies::Code::PlatformUnsupported.into(),
            ImageError::BadHash(_) => policies::Code::ManifestInvalid.into(),
            ImageError::HashMismatch { .. } => Code::PayloadHashMismatch,
            ImageError::Fetch { .. } => Code::PayloadFetchFailed,
            ImageError::UrlRefused { .. } => policies::Code::PayloadUrlRefused.into(),
            ImageError::TooLarge { .. } => Code::PayloadTooLarge,
            ImageError::Io { .. } | ImageError::Store => Code::PayloadStoreFailed,
            ImageError::UnsafeEntry { .. } | ImageError::Format { .. } => Code::PayloadImageInvalid,
            ImageError::Several(all) => match all.first().map(ImageError::code) {
                Some(first) if all.iter().all(|e| e.code() == first) => first,
                _ => Code::PayloadFetchFailed,
            },
        }
    }

    /// What a requestor is told: the operator's file system paths and errors stay out.
    pub fn public_message(&self) -> String {
        match self {
            ImageError::Io { .. } | ImageError::Store => {
                "the provider could not store the image (its operator's log has the cause)".into()
            }
            ImageError::Format { .. } => "the image is not a readable rootfs tarball".into(),
            ImageError::Several(all) => all
                .iter()
                .map(|e| e.public_message())
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_owned(),
        source,
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
}

impl ImageStore {
    /// The store for the operator's own commands.
    pub fn new(data: &DataDir) -> Self {
        Self {
            dir: data.root().join("images"),
            progress: true,
            requestor: None,
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
                let bar = self.progress_bar();
                let mut progress = |len: Option<u64>, n: u64| {
                    if let Some(b) = &bar {
                        if n == 0 {
                            if let Some(len) = len {
                                b.set_length(len);
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
    /// A download's progress on stderr (hidden when stderr is not a terminal).
    fn progress_bar(&self) -> Option<indicatif::ProgressBar> {
        if !self.progress {
            return None;
        }
        let bar = indicatif::ProgressBar::no_length();
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style);
        }
        bar.set_message("fetching image");
        Some(bar)
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Hasher,
    bytes: u64,
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

/// One checked entry of a rootfs tarball.
pub struct RootfsEntry<'a> {
    /// Relative to the root, normalised (`bin/sh`), never empty.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// The file's bytes (`EntryKind::File` only).
    pub data: &'a mut dyn Read,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// Same content as the earlier regular file `target` (normalised path).
    HardLink {
        target: String,
    },
    Fifo,
}

/// Reads a rootfs tarball (plain or gzip, detected by its first bytes) and hands each entry
/// to `visit` after the checks: no absolute paths, no `..`, no device nodes, no symlink
/// whose target leaves the root, no entry under an earlier symlink (or file), hard links
/// only to earlier files. The first violation stops the walk with the entry named.
pub fn read_rootfs(
    path: &Path,
    mut visit: impl FnMut(RootfsEntry<'_>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut r = BufReader::new(f);
    let gz = {
        let head = io::BufRead::fill_buf(&mut r).map_err(io_err("read", path))?;
        head.starts_with(&[0x1f, 0x8b])
    };
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(r))
    } else {
        Box::new(r)
    };
    let fmt = |message: String| ImageError::Format {
        path: path.to_owned(),
        message,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| fmt(format!("not a tar archive: {e}")))?;
    // What each seen path is: a directory, a symlink, or anything else.
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| fmt(format!("reading the archive: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            entry: raw.clone(),
            reason,
        };
        let Some(path) = normalise(&raw).map_err(unsafe_entry)? else {
            continue; // the root itself
        };
        check_parents(&path, &seen).map_err(unsafe_entry)?;
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| fmt(format!("{raw}: mode: {e}")))?
            & 0o7777;
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let mtime = header.mtime().unwrap_or(0);
        let et = header.entry_type();
        let link = || -> Result<String, ImageError> {
            entry
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .ok_or_else(|| unsafe_entry("a link without a target".into()))
        };
        let kind = if et.is_file() || et == tar::EntryType::Continuous {
            EntryKind::File
        } else if et.is_dir() {
            EntryKind::Dir
        } else if et.is_symlink() {
            let target = link()?;
            check_symlink(&path, &target).map_err(unsafe_entry)?;
            EntryKind::Symlink { target }
        } else if et.is_hard_link() {
            let raw_target = link()?;
            let target = normalise(&raw_target)
                .map_err(|r| unsafe_entry(format!("hard link target: {r}")))?
                .ok_or_else(|| unsafe_entry("hard link to the root".into()))?;
            if seen.get(&target) != Some(&Seen::File) {
                return Err(unsafe_entry(format!(
                    "hard link to `{raw_target}`, which is not an earlier regular file of the archive"
                )));
            }
            EntryKind::HardLink { target }
        } else if et.is_character_special() || et.is_block_special() {
            return Err(unsafe_entry("device nodes are not allowed".into()));
        } else if et.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(unsafe_entry(format!("unsupported entry type {et:?}")));
        };
        let size = if kind == EntryKind::File {
            entry.size()
        } else {
            0
        };
        seen.insert(
            path.clone(),
            match kind {
                EntryKind::Dir => Seen::Dir,
                EntryKind::Symlink { .. } => Seen::Symlink,
                EntryKind::File | EntryKind::HardLink { .. } => Seen::File,
                EntryKind::Fifo => Seen::Other,
            },
        );
        visit(RootfsEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            data: &mut entry,
            size,
        })?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Dir,
    Symlink,
    File,
    Other,
}

/// `./a//b/` → `a/b`; `None` for the root itself; absolute paths and `..` are refused.
fn normalise(raw: &str) -> Result<Option<String>, String> {
    if raw.starts_with('/') {
        return Err("absolute path".into());
    }
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("`..` path component".into()),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// No parent of `path` may be a symlink (the unpacker would follow it out of the root) or a
/// non-directory.
fn check_parents(path: &str, seen: &HashMap<String, Seen>) -> Result<(), String> {
    let mut prefix = String::new();
    let comps: Vec<&str> = path.split('/').collect();
    for c in &comps[..comps.len() - 1] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(c);
        match seen.get(&prefix) {
            Some(Seen::Symlink) => return Err(format!("its parent `{prefix}` is a symlink")),
            Some(Seen::File | Seen::Other) => {
                return Err(format!("its parent `{prefix}` is not a directory"))
            }
            Some(Seen::Dir) | None => {}
        }
    }
    Ok(())
}

/// A symlink's target, resolved from the link's directory (an absolute target from the
/// root, as the chrooted payload sees it), must stay inside the root.
fn check_symlink(path: &str, target: &str) -> Result<(), String> {
    if target.is_empty() {
        return Err("empty symlink target".into());
    }
    if target.starts_with('/') {
        return Ok(()); // resolved inside the payload root at run time
    }
    let mut depth: Vec<&str> = path.split('/').collect();
    depth.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if depth.pop().is_none() {
                    return Err(format!("symlink target `{target}` leaves the root"));
                }
            }
            c => depth.push(c),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(entries: &[(&str, tar::EntryType, &str)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, et, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*et);
            h.set_mode(0o755);
            // Bypass the builder's own path checks: we test what a hostile archive holds.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            let data: &[u8] = if *et == tar::EntryType::Regular {
                b"data"
            } else {
                b""
            };
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    fn walk(f: &tempfile::NamedTempFile) -> Result<Vec<String>, ImageError> {
        let mut names = Vec::new();
        read_rootfs(f.path(), |e| {
            names.push(e.path);
            Ok(())
        })?;
        Ok(names)
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn clean_tree_is_read_with_normalised_paths() {
        let t = tarball(&[
            ("./", D, ""),
            ("./bin/", D, ""),
            ("./bin/busybox", F, ""),
            ("./bin/sh", S, "busybox"),
            ("./usr/bin/env", S, "/bin/busybox"),
            ("./bin/ln", H, "bin/busybox"),
        ]);
        assert_eq!(
            walk(&t).unwrap(),
            ["bin", "bin/busybox", "bin/sh", "usr/bin/env", "bin/ln"]
        );
    }

    fn refused(entries: &[(&str, tar::EntryType, &str)], entry: &str, reason: &str) {
        let err = walk(&tarball(entries)).unwrap_err();
        match &err {
            ImageError::UnsafeEntry {
                entry: e,
                reason: r,
            } => {
                assert_eq!(e, entry, "{err}");
                assert!(r.contains(reason), "{err}");
            }
            other => panic!("expected an unsafe entry, got {other}"),
        }
        assert!(err.to_string().contains(entry));
    }

    #[test]
    fn traversal_absolute_and_symlink_escapes_are_refused_naming_the_entry() {
        refused(&[("ok", F, ""), ("../x", F, "")], "../x", "`..`");
        refused(&[("a/../../x", F, "")], "a/../../x", "`..`");
        refused(&[("/etc/x", F, "")], "/etc/x", "absolute");
        refused(
            &[("link", S, "/"), ("link/x", F, "")],
            "link/x",
            "parent `link` is a symlink",
        );
        refused(
            &[("d/", D, ""), ("d/up", S, "../../etc")],
            "d/up",
            "leaves the root",
        );
        refused(&[("f", F, ""), ("f/x", F, "")], "f/x", "not a directory");
        refused(&[("h", H, "nowhere")], "h", "not an earlier regular file");
        refused(&[("h", H, "../etc/passwd")], "h", "`..`");
    }

    #[test]
    fn device_nodes_are_refused() {
        refused(
            &[("dev/sda", tar::EntryType::Block, "")],
            "dev/sda",
            "device",
        );
        refused(
            &[("dev/mem", tar::EntryType::Char, "")],
            "dev/mem",
            "device",
        );
    }

    #[test]
    fn store_verifies_before_storing_and_skips_a_second_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore {
            dir: dir.path().join("images"),
            progress: false,
            requestor: None,
        };
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
        let store = ImageStore {
            dir: dir.path().join("images"),
            progress: false,
            requestor: None,
        };
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
