//! Payload images: what can go wrong with one ([`ImageError`], from the fetch and the store
//! in the app crate's `images` to the tarball itself), and the reader of rootfs tarballs
//! (`.tar`, `.tar.gz`) that hands them out entry by entry with the guards that keep every
//! entry inside the root.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

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
    #[error("the provider could not store the image: {0}")]
    Store(String),
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
    /// The image's compatibility artifact has a required rule this host fails or cannot
    /// evaluate (checked before any layer is downloaded).
    #[error("platform-incompatible: {image}: {why}")]
    PlatformIncompatible { image: String, why: String },
    /// The registry wants credentials this provider does not have or refuses the ones it
    /// has.
    #[error("payload-auth-failed: {registry}: {why}")]
    RegistryAuth { registry: String, why: String },
    /// The host's conversion of a good tarball failed (its tool, its disk); the cause is
    /// in the operator's log.
    #[error("convert the image: {0}")]
    Convert(String),
}

impl ImageError {
    /// What a requestor is told: the operator's file system paths and errors stay out.
    pub fn public_message(&self) -> String {
        match self {
            ImageError::Io { .. } | ImageError::Store(_) => {
                "the provider could not store the image (its operator's log has the cause)".into()
            }
            ImageError::Format { message, .. } => {
                format!(
                    "the image is not a usable rootfs (a squashfs, a GVMI or a tarball): {message}"
                )
            }
            ImageError::Convert(_) => {
                "the provider could not convert the image (its operator's log has the cause)".into()
            }
            ImageError::Several(all) => all
                .iter()
                .map(|e| e.public_message())
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    }
}

/// An [`ImageError::Io`] for `action` on `path`.
pub fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A zstd frame's magic number, or a skippable frame's (`0x184D2A5?`), little-endian.
fn is_zstd_magic(head: &[u8]) -> bool {
    match head {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => true,
        [b0, 0x2a, 0x4d, 0x18, ..] => b0 & 0xf0 == 0x50,
        _ => false,
    }
}

/// A zstd stream of one or more frames (an OCI `tar+zstd` layer; `zstd:chunked` layers
/// compress each file as its own frame and append skippable frames of metadata, which are
/// skipped).
struct ZstdFrames<R: io::BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: io::BufRead> ZstdFrames<R> {
    fn new(src: R) -> Self {
        Self {
            src,
            dec: ruzstd::decoding::FrameDecoder::new(),
            in_frame: false,
        }
    }
}

impl<R: io::BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.in_frame {
                while self.dec.can_collect() < buf.len() && !self.dec.is_finished() {
                    let want = buf.len() - self.dec.can_collect();
                    self.dec
                        .decode_blocks(
                            &mut self.src,
                            ruzstd::decoding::BlockDecodingStrategy::UptoBytes(want),
                        )
                        .map_err(io::Error::other)?;
                }
                let n = self.dec.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.dec.is_finished() && self.dec.can_collect() == 0 {
                    self.in_frame = false;
                }
                continue;
            }
            if self.src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            match self.dec.reset(&mut self.src) {
                Ok(()) => self.in_frame = true,
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.src).take(length.into()), &mut io::sink())?;
                    if skipped < u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a zstd skippable frame is cut short",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::other(e)),
            }
        }
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

/// Reads a rootfs tarball (plain, gzip or zstd, detected by its first bytes) and hands each entry
/// to `visit` after the checks: no absolute paths, no `..`, no device nodes, no symlink
/// whose target leaves the root, no entry under an earlier symlink (or file), hard links
/// only to earlier files. The first violation stops the walk with the entry named.
pub fn read_rootfs(
    path: &Path,
    mut visit: impl FnMut(RootfsEntry<'_>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut r = BufReader::new(f);
    let head = io::BufRead::fill_buf(&mut r)
        .map_err(io_err("read", path))?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(r))
    } else if is_zstd_magic(&head) {
        Box::new(ZstdFrames::new(r))
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
    fn zstd_tarballs_of_several_frames_with_skippable_ones_are_read() {
        let t = tarball(&[("./", D, ""), ("./a", F, ""), ("./b", F, "")]);
        let raw = std::fs::read(t.path()).unwrap();
        let (one, two) = raw.split_at(700);
        let z = |b: &[u8]| {
            ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest)
        };
        // Frame, skippable frame (magic 0x184D2A5E, 3 bytes), frame, trailing skippable.
        let mut stream = z(one);
        stream.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        stream.extend(z(two));
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &stream).unwrap();
        assert_eq!(walk(&f).unwrap(), ["a", "b"]);
        // Cut inside the second frame: an error, not a short tree taken as whole.
        std::fs::write(f.path(), &stream[..stream.len() - 20]).unwrap();
        assert!(walk(&f).is_err());
    }

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
}
