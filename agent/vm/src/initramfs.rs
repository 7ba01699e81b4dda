//! The per-job initramfs: a newc cpio (uncompressed: the kernel unpacks it fastest) with
//! the guest agent as `/init` and the payload rootfs under `/rootfs`, converted entry by
//! entry from the checked tarball (nothing is unpacked on the host).
//!
//! newc: each entry is the magic `070701`, thirteen 8-digit hex fields (ino, mode, uid,
//! gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check),
//! the NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; the archive
//! ends with the entry `TRAILER!!!`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::image::{self, EntryKind, ImageError};

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;

/// Where the payload's rootfs goes; the guest agent chroots into it.
pub const PAYLOAD_DIR: &str = "rootfs";

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What went into an initramfs.
#[derive(Debug, Clone, Copy)]
pub struct BuildStats {
    pub entries: u64,
    pub bytes: u64,
}

/// A newc writer that tracks where each file's data landed (hard links copy it).
pub struct NewcWriter<W: Write> {
    w: W,
    next_ino: u32,
    offset: u64,
    entries: u64,
}

/// One entry's header fields.
pub struct Header<'a> {
    pub name: &'a str,
    /// Type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub size: u64,
    /// `(major, minor)` of a device node.
    pub rdev: (u32, u32),
}

impl<W: Write> NewcWriter<W> {
    pub fn new(w: W) -> Self {
        Self {
            w,
            next_ino: 1,
            offset: 0,
            entries: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Writes a header; returns the offset its data starts at. The caller writes exactly
    /// `size` bytes with [`NewcWriter::data`] and then calls [`NewcWriter::end_data`].
    pub fn header(&mut self, h: &Header<'_>) -> io::Result<u64> {
        if h.size > u32::MAX as u64 {
            return Err(io::Error::other(format!(
                "{}: {} bytes is over newc's 4 GiB file limit",
                h.name, h.size
            )));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if h.mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            ino,
            h.mode,
            h.uid,
            h.gid,
            nlink,
            h.mtime.min(u32::MAX as u64) as u32,
            h.size as u32,
            0,
            0,
            h.rdev.0,
            h.rdev.1,
            h.name.len() as u32 + 1,
            0,
        ];
        let mut head = String::with_capacity(110);
        head.push_str("070701");
        for f in fields {
            head.push_str(&format!("{f:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.entries += 1;
        Ok(self.offset)
    }

    pub fn data(&mut self, b: &[u8]) -> io::Result<()> {
        self.put(b)
    }

    pub fn end_data(&mut self) -> io::Result<()> {
        self.pad()
    }

    /// A whole entry with in-memory data.
    pub fn entry(&mut self, h: &Header<'_>, data: &[u8]) -> io::Result<u64> {
        let off = self.header(&Header {
            size: data.len() as u64,
            ..*h
        })?;
        self.data(data)?;
        self.end_data()?;
        Ok(off)
    }

    /// The trailer; returns the writer and the archive's statistics.
    pub fn finish(mut self) -> io::Result<(W, BuildStats)> {
        self.entry(
            &Header {
                name: "TRAILER!!!",
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )?;
        self.entries -= 1;
        self.w.flush()?;
        Ok((
            self.w,
            BuildStats {
                entries: self.entries,
                bytes: self.offset,
            },
        ))
    }
}

impl<'a> Clone for Header<'a> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<'a> Copy for Header<'a> {}

fn dir_header(name: &str) -> Header<'_> {
    Header {
        name,
        mode: S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        rdev: (0, 0),
    }
}

/// What every initramfs starts with: the agent as `/init`, `/dev` and `/dev/console` (the
/// kernel opens it for init's stdin, stdout and stderr).
fn agent_head<W: Write>(w: &mut NewcWriter<W>, agent: &[u8]) -> io::Result<()> {
    w.entry(
        &Header {
            name: "init",
            mode: S_IFREG | 0o755,
            ..dir_header("")
        },
        agent,
    )?;
    w.entry(&dir_header("dev"), &[])?;
    w.entry(
        &Header {
            name: "dev/console",
            mode: S_IFCHR | 0o600,
            rdev: (5, 1),
            ..dir_header("")
        },
        &[],
    )?;
    Ok(())
}

/// Ends the archive, flushes it and fsyncs the file.
fn finish_file(w: NewcWriter<BufWriter<File>>, out: &Path) -> Result<BuildStats, InitramfsError> {
    let io_err = |action: &'static str, source: io::Error| InitramfsError::Io {
        action,
        path: out.to_owned(),
        source,
    };
    let (bw, stats) = w.finish().map_err(|e| io_err("write", e))?;
    let f = bw
        .into_inner()
        .map_err(|e| io_err("write", e.into_error()))?;
    f.sync_all().map_err(|e| io_err("fsync", e))?;
    Ok(stats)
}

/// Builds `out`: `/init` = `agent` (the static `provider-guest`), `/dev/console`, and the
/// rootfs tarball `image` under `/rootfs` (every entry checked by
/// [`image::read_rootfs`]; missing parent directories are added).
pub fn build(out: &Path, agent: &Path, image: &Path) -> Result<BuildStats, InitramfsError> {
    let r = build_inner(out, agent, image);
    if r.is_err() {
        let _ = std::fs::remove_file(out);
    }
    r
}

fn build_inner(out: &Path, agent: &Path, image: &Path) -> Result<BuildStats, InitramfsError> {
    let ioe = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| InitramfsError::Io {
            action,
            path,
            source,
        }
    };
    let file = File::create(out).map_err(ioe("create", out))?;
    let mut w = NewcWriter::new(BufWriter::with_capacity(1 << 20, file));
    let write_err = ioe("write", out);

    let agent_bytes = std::fs::read(agent).map_err(ioe("read the guest agent", agent))?;
    (|| -> io::Result<()> {
        agent_head(&mut w, &agent_bytes)?;
        w.entry(&dir_header(PAYLOAD_DIR), &[])?;
        Ok(())
    })()
    .map_err(write_err)?;

    let mut dirs: HashSet<String> = HashSet::new();
    // Where each regular file's data sits in `out`, for hard links.
    let mut files: HashMap<String, (u64, u64)> = HashMap::new();
    // (name, target, mode, uid, gid, mtime) of each hard link.
    let mut links: Vec<(String, String, u32, u32, u32, u64)> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    image::read_rootfs(image, |e| {
        let werr = |source: io::Error| ImageError::Io {
            action: "write",
            path: out.to_owned(),
            source,
        };
        let name = format!("{PAYLOAD_DIR}/{}", e.path);
        // Parents first: the kernel's unpacker does not create them.
        let mut parent = String::new();
        let comps: Vec<&str> = e.path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            if dirs.insert(parent.clone()) {
                w.entry(&dir_header(&format!("{PAYLOAD_DIR}/{parent}")), &[])
                    .map_err(werr)?;
            }
        }
        let base = Header {
            name: &name,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            size: 0,
            rdev: (0, 0),
        };
        match &e.kind {
            EntryKind::Dir => {
                dirs.insert(e.path.clone());
                w.entry(
                    &Header {
                        mode: S_IFDIR | e.mode,
                        ..base
                    },
                    &[],
                )
                .map_err(werr)?;
            }
            EntryKind::File => {
                let off = w
                    .header(&Header {
                        mode: S_IFREG | e.mode,
                        size: e.size,
                        ..base
                    })
                    .map_err(werr)?;
                let mut left = e.size;
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = e
                        .data
                        .read(&mut buf[..want])
                        .map_err(|source| ImageError::Io {
                            action: "read the image entry",
                            path: PathBuf::from(&e.path),
                            source,
                        })?;
                    if n == 0 {
                        return Err(ImageError::Format {
                            path: image.to_owned(),
                            message: format!("{}: archive ends inside the file", e.path),
                        });
                    }
                    w.data(&buf[..n]).map_err(werr)?;
                    left -= n as u64;
                }
                w.end_data().map_err(werr)?;
                files.insert(e.path.clone(), (off, e.size));
            }
            EntryKind::Symlink { target } => {
                w.entry(
                    &Header {
                        mode: S_IFLNK | 0o777,
                        ..base
                    },
                    target.as_bytes(),
                )
                .map_err(werr)?;
            }
            EntryKind::Fifo => {
                w.entry(
                    &Header {
                        mode: S_IFIFO | e.mode,
                        ..base
                    },
                    &[],
                )
                .map_err(werr)?;
            }
            EntryKind::HardLink { target } => {
                links.push((name.clone(), target.clone(), e.mode, e.uid, e.gid, e.mtime));
            }
        }
        Ok(())
    })?;

    // Hard links become copies of their target's bytes, read back from the archive.
    if !links.is_empty() {
        w.w.flush().map_err(ioe("write", out))?;
        let mut back = File::open(out).map_err(ioe("reopen", out))?;
        for (name, target, mode, uid, gid, mtime) in links {
            let (off, size) = files[&target];
            let mut data = vec![0u8; size as usize];
            back.seek(SeekFrom::Start(off))
                .and_then(|_| back.read_exact(&mut data))
                .map_err(ioe("read back", out))?;
            w.entry(
                &Header {
                    name: &name,
                    mode: S_IFREG | mode,
                    uid,
                    gid,
                    mtime,
                    size: 0,
                    rdev: (0, 0),
                },
                &data,
            )
            .map_err(ioe("write", out))?;
        }
    }
    finish_file(w, out)
}

/// Builds `out` for the disk path: `/init` = `agent`, `/dev/console`, and, with
/// `modules` (a directory with `order`, `release` and the `.ko` files `order` names, as
/// `scripts/fetch-guest-kernel.sh` writes it), `/modules/…`. Nothing of the payload goes
/// in: its image is a disk.
pub fn build_agent(
    out: &Path,
    agent: &Path,
    modules: Option<&Path>,
) -> Result<BuildStats, InitramfsError> {
    let r = build_agent_inner(out, agent, modules);
    if r.is_err() {
        let _ = std::fs::remove_file(out);
    }
    r
}

fn build_agent_inner(
    out: &Path,
    agent: &Path,
    modules: Option<&Path>,
) -> Result<BuildStats, InitramfsError> {
    let ioe = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| InitramfsError::Io {
            action,
            path,
            source,
        }
    };
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(dir) = modules {
        let order_path = dir.join("order");
        let order = std::fs::read_to_string(&order_path).map_err(ioe("read", &order_path))?;
        let release_path = dir.join("release");
        let release = std::fs::read(&release_path).map_err(ioe("read", &release_path))?;
        files.push(("modules/order".into(), order.clone().into_bytes()));
        files.push(("modules/release".into(), release));
        for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if name.contains('/') || name.starts_with('.') || !name.ends_with(".ko") {
                return Err(InitramfsError::Io {
                    action: "read the module list",
                    path: order_path.clone(),
                    source: io::Error::other(format!("`{name}` is not a .ko file name")),
                });
            }
            let p = dir.join(name);
            let bytes = std::fs::read(&p).map_err(ioe("read the kernel module", &p))?;
            files.push((format!("modules/{name}"), bytes));
        }
    }
    let agent_bytes = std::fs::read(agent).map_err(ioe("read the guest agent", agent))?;
    let file = File::create(out).map_err(ioe("create", out))?;
    let mut w = NewcWriter::new(BufWriter::with_capacity(1 << 20, file));
    (|| -> io::Result<()> {
        agent_head(&mut w, &agent_bytes)?;
        if !files.is_empty() {
            w.entry(&dir_header("modules"), &[])?;
        }
        for (name, bytes) in &files {
            w.entry(
                &Header {
                    name,
                    mode: S_IFREG | 0o644,
                    ..dir_header("")
                },
                bytes,
            )?;
        }
        Ok(())
    })()
    .map_err(ioe("write", out))?;
    finish_file(w, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a newc archive back into (name, mode, data).
    fn parse(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        let field = |b: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            let h = &bytes[off..off + 110];
            assert_eq!(&h[..6], b"070701");
            let mode = field(h, 1);
            let size = field(h, 6) as usize;
            let namesize = field(h, 11) as usize;
            let name = std::str::from_utf8(&bytes[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            let mut p = off + 110 + namesize;
            p = p.div_ceil(4) * 4;
            let data = bytes[p..p + size].to_vec();
            p = (p + size).div_ceil(4) * 4;
            off = p;
            if name == "TRAILER!!!" {
                assert_eq!(off, bytes.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn agent_is_init_and_the_rootfs_lands_under_rootfs_with_parents_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF agent").unwrap();
        let tar_path = dir.path().join("img.tar");
        {
            let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o755);
            h.set_size(5);
            b.append_data(&mut h, "bin/busybox", &b"hello"[..]).unwrap();
            let mut l = tar::Header::new_gnu();
            l.set_entry_type(tar::EntryType::Symlink);
            l.set_size(0);
            l.set_mode(0o777);
            b.append_link(&mut l, "bin/sh", "busybox").unwrap();
            let mut hl = tar::Header::new_gnu();
            hl.set_entry_type(tar::EntryType::Link);
            hl.set_size(0);
            hl.set_mode(0o755);
            b.append_link(&mut hl, "sbin/init", "bin/busybox").unwrap();
            b.finish().unwrap();
        }
        let out = dir.path().join("initramfs.cpio");
        let stats = build(&out, &agent, &tar_path).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(stats.bytes, bytes.len() as u64);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "dev",
                "dev/console",
                "rootfs",
                "rootfs/bin",
                "rootfs/bin/busybox",
                "rootfs/bin/sh",
                "rootfs/sbin",
                "rootfs/sbin/init"
            ]
        );
        assert_eq!(entries[0].2, b"\x7fELF agent");
        assert_eq!(entries[0].1, S_IFREG | 0o755);
        assert_eq!(entries[2].1, S_IFCHR | 0o600);
        assert_eq!(entries[5].2, b"hello");
        assert_eq!(
            (entries[6].1, entries[6].2.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!(entries[8].2, b"hello", "hard link is a copy of its target");
        assert_eq!(stats.entries, 9);
    }

    #[test]
    fn the_disk_path_initramfs_holds_the_agent_and_the_listed_modules_only() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent").unwrap();
        let m = dir.path().join("modules");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("order"), "b.ko\na.ko\n").unwrap();
        std::fs::write(m.join("release"), "6.1\n").unwrap();
        std::fs::write(m.join("a.ko"), b"A").unwrap();
        std::fs::write(m.join("b.ko"), b"B").unwrap();
        std::fs::write(m.join("unlisted.ko"), b"X").unwrap();
        let out = dir.path().join("i.cpio");
        build_agent(&out, &agent, Some(&m)).unwrap();
        let e = parse(&std::fs::read(&out).unwrap());
        let names: Vec<&str> = e.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "dev",
                "dev/console",
                "modules",
                "modules/order",
                "modules/release",
                "modules/b.ko",
                "modules/a.ko"
            ]
        );
        std::fs::write(m.join("order"), "../../etc/shadow\n").unwrap();
        assert!(build_agent(&out, &agent, Some(&m)).is_err());
        assert!(!out.exists());
    }

    #[test]
    fn an_unsafe_image_is_refused_naming_the_entry_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"a").unwrap();
        let tar_path = dir.path().join("img.tar");
        {
            let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
            let mut l = tar::Header::new_gnu();
            l.set_entry_type(tar::EntryType::Symlink);
            l.set_size(0);
            l.set_mode(0o777);
            b.append_link(&mut l, "escape", "/").unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            let mut h2 = h.clone();
            b.append_data(&mut h, "ok", &b"x"[..]).unwrap();
            // The builder refuses nothing here: the path is plain, the parent a symlink.
            b.append_data(&mut h2, "escape/init", &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let out = dir.path().join("i.cpio");
        let err = build(&out, &agent, &tar_path).unwrap_err();
        assert!(err.to_string().contains("`escape/init` refused"), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!out.exists());
    }
}
