//! The job's runtime profile inside the guest (see [`crate::boot`]): a pids cgroup around
//! every payload process (`provider.pids=N`) and a read-only payload root
//! (`provider.ro=1`) that keeps the image's volumes and working dir writable.
//!
//! The cgroup: cgroup2 is mounted on a directory of the initramfs, the `pids` controller
//! enabled for the root's children, `payload` made with `pids.max = N`, its `cgroup.procs`
//! opened (close-on-exec), and the mount detached again. The payload therefore has no path
//! to any cgroup file (it cannot raise its own limit, and without CAP_SYS_ADMIN it cannot
//! mount cgroup2 itself); each payload process joins by writing `0` to the kept fd between
//! `fork` and `exec`, so its children are counted from the first. The agent stays outside,
//! so a payload at its limit cannot stop the agent from starting the next command.
//! The count is the kernel's: tasks, so threads count as well as processes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where cgroup2 is mounted while the payload's group is made (then detached).
const CGROUP_MOUNT: &str = "/.cgroup";

static PAYLOAD_PROCS: OnceLock<File> = OnceLock::new();

fn ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Makes the payload's pids group of `max` tasks (see the module docs).
pub fn pids_cgroup(max: u32) -> io::Result<()> {
    let at = Path::new(CGROUP_MOUNT);
    fs::create_dir_all(at)?;
    mount(
        Some("cgroup2"),
        at,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| {
        io::Error::other(format!(
            "the runtime profile's pids_max needs cgroup2 in the guest kernel: mount: {e}"
        ))
    })?;
    let made = (|| -> io::Result<File> {
        let controllers = fs::read_to_string(at.join("cgroup.controllers"))?;
        if !controllers.split_whitespace().any(|c| c == "pids") {
            return Err(io::Error::other(format!(
                "the runtime profile's pids_max needs the guest kernel's pids cgroup controller; it has: {}",
                controllers.trim()
            )));
        }
        write(&at.join("cgroup.subtree_control"), "+pids")?;
        let group = at.join("payload");
        fs::create_dir(&group).map_err(ctx(format!("mkdir {}", group.display())))?;
        write(&group.join("pids.max"), &max.to_string())?;
        let procs = group.join("cgroup.procs");
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&procs)
            .map_err(ctx(format!("open {}", procs.display())))
    })();
    let detached = umount2(at, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(at);
    let procs = made?;
    detached.map_err(|e| io::Error::other(format!("detach {CGROUP_MOUNT}: {e}")))?;
    let _ = PAYLOAD_PROCS.set(procs);
    Ok(())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(ctx(format!("write `{value}` to {}", path.display())))
}

/// For a payload process between `fork` and `exec` (async-signal-safe: one `write`):
/// joins the payload's pids group, when there is one.
pub fn join_payload_cgroup() -> io::Result<()> {
    if let Some(f) = PAYLOAD_PROCS.get() {
        // SAFETY: writes one byte from a static buffer to an fd the agent keeps open for
        // its whole life.
        if unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The directories that stay writable under a read-only root, from the writable disk's
/// list (one absolute path a line): each must be a plain absolute path without `.`, `..`
/// or empty components.
pub fn parse_writable(list: &str) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for line in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let ok = line.starts_with('/')
            && line[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !ok {
            return Err(io::Error::other(format!(
                "the writable disk lists `{line}`, which is not a normalised absolute path"
            )));
        }
        out.push(line.to_owned());
    }
    Ok(out)
}

/// Bind-mounts each of `dirs` (paths in the payload's root `root`) onto itself, so it stays
/// writable once the root's own mount is made read-only. Every component must be a real
/// directory: a symlink would carry the bind somewhere the image chose.
pub fn bind_writable(root: &Path, dirs: &[String]) -> io::Result<()> {
    for d in dirs {
        let mut at = root.to_owned();
        for c in d.trim_start_matches('/').split('/') {
            at.push(c);
            let m = fs::symlink_metadata(&at).map_err(ctx(format!(
                "the writable directory {d} ({})",
                at.display()
            )))?;
            if !m.file_type().is_dir() {
                return Err(io::Error::other(format!(
                    "the writable directory {d}: {} is not a directory",
                    at.display()
                )));
            }
        }
        mount(Some(&at), &at, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| io::Error::other(format!("bind {} onto itself: {e}", at.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writable_list_takes_normalised_absolute_paths_only() {
        assert_eq!(
            parse_writable("/data\n\n/srv/app\n").unwrap(),
            vec!["/data".to_owned(), "/srv/app".to_owned()]
        );
        for bad in ["data", "/a/../b", "/a//b", "/./a", "/a/"] {
            assert!(parse_writable(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_writable_path_through_a_symlink_is_refused_before_any_mount() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", d.path().join("link")).unwrap();
        let e = bind_writable(d.path(), &["/link".into()]).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        let e = bind_writable(d.path(), &["/missing".into()]).unwrap_err();
        assert!(e.to_string().contains("/missing"), "{e}");
    }
}
