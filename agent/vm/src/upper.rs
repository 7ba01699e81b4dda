//! The job's writable layer: a fresh ext4 file in the job dir, as large as the job's
//! storage (the offer's `golem.inf.storage.gib`), reserved on the host with `fallocate` so
//! a full host disk cannot surprise a running job, and formatted with `mkfs.ext4` (fixed
//! arguments: see `docs/payload-runtime.md`). The directories an image asks for (its
//! `Volumes` and `WorkingDir`) are made on it at format time (`mkfs.ext4 -d`), so they
//! exist before the first command without the guest agent doing anything.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::VmError;

/// The file at the writable disk's root listing the image's volumes and working dir, one
/// absolute path a line (read by the guest agent for a read-only root).
pub const WRITABLE_LIST: &str = "writable";

/// The smallest writable layer (ext4 needs room for its own metadata).
pub const MIN_BYTES: u64 = 16 << 20;

/// `mkfs.ext4` (e2fsprogs), or `$PROVIDER_MKFS_EXT4`.
pub fn mkfs_binary() -> PathBuf {
    std::env::var_os("PROVIDER_MKFS_EXT4")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            [
                "/usr/sbin/mkfs.ext4",
                "/sbin/mkfs.ext4",
                "/usr/bin/mkfs.ext4",
            ]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
        })
}

/// Creates `path` (which must not exist) of `bytes` and formats it, with `dirs` (absolute
/// guest paths, already normalised: see `rootfs::ImageConfig`) made under the overlay's
/// upper directory. On failure nothing is left behind.
pub fn create(path: &Path, bytes: u64, dirs: &[String]) -> Result<(), VmError> {
    let r = create_inner(path, bytes, dirs);
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

fn create_inner(path: &Path, bytes: u64, dirs: &[String]) -> Result<(), VmError> {
    let io = |action: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source: std::io::Error| VmError::Io {
            action,
            path: p,
            source,
        }
    };
    if bytes < MIN_BYTES {
        return Err(VmError::Backend {
            message: format!(
                "a writable layer of {bytes} bytes is too small; at least {MIN_BYTES}"
            ),
        });
    }
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    // Reserve the blocks now: a host that cannot hold the layer refuses the job here, not
    // halfway through it.
    nix::fcntl::fallocate(&f, nix::fcntl::FallocateFlags::empty(), 0, bytes as i64).map_err(
        |e| VmError::Io {
            action: "reserve the writable layer (fallocate)",
            path: path.to_owned(),
            source: e.into(),
        },
    )?;
    drop(f);
    let parent = path.parent().unwrap_or(Path::new("."));
    let seed = tempfile::Builder::new()
        .prefix(".upper-seed-")
        .tempdir_in(parent)
        .map_err(io("create a temp dir in", parent))?;
    for d in dirs {
        let rel = d.trim_start_matches('/');
        if rel.is_empty()
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(VmError::Backend {
                message: format!("the image's directory `{d}` is not a normalised path"),
            });
        }
        let p = seed.path().join("upper").join(rel);
        fs::create_dir_all(&p).map_err(io("create", &p))?;
    }
    if !dirs.is_empty() {
        // Beside the overlay's `upper/`, out of the payload's sight: the directories that
        // stay writable when the runtime profile makes the root read-only (the guest
        // agent bind-mounts each before it remounts `/` read-only).
        let list = seed.path().join(WRITABLE_LIST);
        fs::write(&list, dirs.join("\n") + "\n").map_err(io("write", &list))?;
    }
    let binary = mkfs_binary();
    let mut cmd = Command::new(&binary);
    cmd.args([
        "-q",
        "-F",
        "-m",
        "0",
        "-O",
        "^has_journal",
        "-E",
        "nodiscard",
    ]);
    if !dirs.is_empty() {
        cmd.arg("-d").arg(seed.path());
    }
    let out = cmd
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| VmError::Backend {
            message: format!("cannot run {} (install e2fsprogs): {e}", binary.display()),
        })?;
    if !out.status.success() {
        return Err(VmError::Backend {
            message: format!(
                "{} {} failed ({}): {}",
                binary.display(),
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Bytes the layer really holds on the host (`st_blocks`): what a job used.
pub fn allocated(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_reserved_formatted_and_refused_when_too_small() {
        if !mkfs_binary().is_file() {
            eprintln!("skipped: no mkfs.ext4 (install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("upper.img");
        create(&p, 32 << 20, &["/data".into(), "/work/dir".into()]).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 32 << 20);
        assert!(allocated(&p).unwrap() >= 32 << 20, "fallocate reserved it");
        let sb = fs::read(&p).unwrap();
        assert_eq!(&sb[1024 + 56..1024 + 58], &[0x53, 0xef], "ext4 magic");
        assert!(
            create(&p, 32 << 20, &[]).is_err(),
            "never over an existing file"
        );
        let small = dir.path().join("small.img");
        let e = create(&small, 1 << 20, &[]).unwrap_err().to_string();
        assert!(e.contains("too small"), "{e}");
        assert!(!small.exists());
        let bad = dir.path().join("bad.img");
        assert!(create(&bad, 32 << 20, &["/a/../b".into()]).is_err());
        assert!(!bad.exists());
    }
}
