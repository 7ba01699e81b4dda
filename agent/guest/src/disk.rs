//! The disk-image root (`provider.root` and `provider.upper`, see [`crate::boot`]): the
//! payload image, a squashfs on a read-only virtio disk, is the lower layer of an overlayfs
//! whose upper layer is an ext4 file system on a second, writable virtio disk of the size
//! the offer sells. A payload that fills it gets `ENOSPC`; the host's disk is touched only
//! through that file.
//!
//! ```text
//! /dev/vdX (serial = provider.root)  --squashfs, ro-->  /layers/lower  \
//! /dev/vdY (serial = provider.upper) --ext4------->  /layers/upper/{upper,work} --overlay--> /rootfs
//! ```
//!
//! Once the overlay is mounted, the two layer mounts are detached (the overlay holds its
//! own references) and the disks' device nodes are removed: nothing of them is left for a
//! payload to open. The overlay is `nodev`, so a device node shipped in an image opens
//! nothing; the image cannot bring a node for the channel's device number.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{klog, squashfs};

const LOWER: &str = "/layers/lower";
const UPPER: &str = "/layers/upper";
/// How long the disks may take to appear once `virtio_blk` is loaded (its probe is
/// synchronous; this only covers a slow or asynchronous probe).
const DISK_WAIT: Duration = Duration::from_secs(5);

/// Names (`vda`…) and serials of the virtio disks under `sys_block` (`/sys/block`).
pub fn virtio_disks(sys_block: &Path) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(sys_block)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        // A disk without a serial attribute reads as an empty serial.
        let serial = fs::read_to_string(sys_block.join(&name).join("serial")).unwrap_or_default();
        out.push((name, serial.trim().to_owned()));
    }
    out.sort();
    Ok(out)
}

/// The disk whose serial is `serial`, waiting up to `wait` for it to appear.
pub fn wait_disk(sys_block: &Path, serial: &str, wait: Duration) -> io::Result<String> {
    let deadline = Instant::now() + wait;
    loop {
        let disks = virtio_disks(sys_block)?;
        let mut hits = disks.iter().filter(|(_, s)| s == serial);
        if let Some((name, _)) = hits.next() {
            if let Some((other, _)) = hits.next() {
                return Err(io::Error::other(format!(
                    "two virtio disks have serial `{serial}`: {name} and {other}"
                )));
            }
            return Ok(name.clone());
        }
        if Instant::now() >= deadline {
            let found = if disks.is_empty() {
                "there are no virtio disks (is virtio_blk loaded, a virtio-blk-pci device \
                 attached?)"
                    .to_owned()
            } else {
                let list: Vec<String> = disks.iter().map(|(n, s)| format!("{n} `{s}`")).collect();
                format!("found: {}", list.join(", "))
            };
            return Err(io::Error::other(format!(
                "no virtio disk has serial `{serial}` after {wait:?}; {found}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn disk_bytes(name: &str) -> u64 {
    fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512)
}

fn mount_err(what: &str, e: nix::Error, why: String) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}{why}"))
}

/// Mounts the image and the writable disk, and the overlay of the two on `target`;
/// removes the disks' device nodes from `dev` (the early devtmpfs). Returns the directories
/// the host listed as writable under a read-only root (the image's volumes and working
/// dir: `vm::upper::WRITABLE_LIST` at the writable disk's root).
pub fn mount_root(image: &str, upper: &str, target: &Path, dev: &Path) -> io::Result<Vec<String>> {
    let sys_block = Path::new("/sys/block");
    let img = wait_disk(sys_block, image, DISK_WAIT)?;
    let up = wait_disk(sys_block, upper, DISK_WAIT)?;
    let img_node = dev.join(&img);
    let up_node = dev.join(&up);
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;

    fs::create_dir_all(LOWER)?;
    if let Err(e) = mount(
        Some(&img_node),
        LOWER,
        Some("squashfs"),
        flags | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        let mut head = Vec::with_capacity(4096);
        let read = File::open(&img_node).and_then(|f| f.take(4096).read_to_end(&mut head));
        let why = match read {
            Ok(_) => squashfs::diagnose(&head, disk_bytes(&img)),
            Err(e) => format!("reading its first bytes failed too: {e}"),
        };
        return Err(mount_err(
            &format!(
                "the payload image ({}, serial `{image}`) does not mount as squashfs",
                img_node.display()
            ),
            e,
            format!(
                ": {why}{}",
                klog::tail(&["squashfs", "compression"], &["Lougher"], 2)
            ),
        ));
    }

    fs::create_dir_all(UPPER)?;
    // `noinit_itable`: no background thread zeroing inode tables, which on a fresh (sparse
    // or fallocated) file read as zeros already; it would only burn guest CPU and grow the
    // host's file.
    if let Err(e) = mount(
        Some(&up_node),
        UPPER,
        Some("ext4"),
        flags,
        Some("noinit_itable"),
    ) {
        return Err(mount_err(
            &format!(
                "the writable disk ({}, serial `{upper}`) does not mount as ext4 (the host \
                 formats it with mkfs.ext4)",
                up_node.display()
            ),
            e,
            klog::tail(&["ext4"], &[], 2),
        ));
    }
    let upper_dir = Path::new(UPPER).join("upper");
    let work_dir = Path::new(UPPER).join("work");
    for d in [&upper_dir, &work_dir] {
        fs::create_dir_all(d)
            .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", d.display())))?;
    }
    // The overlay's root takes the upper directory's owner and mode: make them the
    // image's.
    let lower_root = fs::metadata(LOWER)?;
    std::os::unix::fs::chown(&upper_dir, Some(lower_root.uid()), Some(lower_root.gid()))?;
    fs::set_permissions(
        &upper_dir,
        std::os::unix::fs::PermissionsExt::from_mode(lower_root.mode() & 0o7777),
    )?;

    fs::create_dir_all(target)?;
    let data = format!(
        "lowerdir={LOWER},upperdir={},workdir={}",
        upper_dir.display(),
        work_dir.display()
    );
    if let Err(e) = mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(data.as_str()),
    ) {
        return Err(mount_err(
            &format!("mount the overlay ({data}) on {}", target.display()),
            e,
            klog::tail(&["overlay"], &[], 2),
        ));
    }
    let writable = match fs::read_to_string(Path::new(UPPER).join("writable")) {
        Ok(list) => crate::limits::parse_writable(&list)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("read the writable list: {e}"),
            ))
        }
    };
    // The overlay keeps private clones of its layers' mounts: the originals can go, and
    // with them the only paths to the layers' own roots.
    for m in [LOWER, UPPER] {
        umount2(m, MntFlags::MNT_DETACH)
            .map_err(|e| io::Error::other(format!("detach {m}: {e}")))?;
    }
    for node in [&img_node, &up_node] {
        remove(node)?;
    }
    Ok(writable)
}

fn remove(node: &Path) -> io::Result<()> {
    fs::remove_file(node)
        .map_err(|e| io::Error::new(e.kind(), format!("unlink {}: {e}", node.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_disk(root: &Path, name: &str, serial: Option<&str>) {
        let d = root.join(name);
        fs::create_dir_all(&d).unwrap();
        if let Some(s) = serial {
            fs::write(d.join("serial"), format!("{s}\n")).unwrap();
        }
    }

    #[test]
    fn disks_are_found_by_serial_not_by_letter() {
        let sys = tempfile::tempdir().unwrap();
        fake_disk(sys.path(), "vda", Some("upper"));
        fake_disk(sys.path(), "vdb", Some("root"));
        fake_disk(sys.path(), "vdc", None);
        fake_disk(sys.path(), "loop0", Some("root"));
        let short = Duration::from_millis(30);
        assert_eq!(wait_disk(sys.path(), "root", short).unwrap(), "vdb");
        assert_eq!(wait_disk(sys.path(), "upper", short).unwrap(), "vda");
        let e = wait_disk(sys.path(), "nope", short)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no virtio disk has serial `nope`")
                && e.contains("vda `upper`, vdb `root`, vdc ``"),
            "{e}"
        );
        fake_disk(sys.path(), "vdd", Some("root"));
        let e = wait_disk(sys.path(), "root", short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two virtio disks"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = wait_disk(empty.path(), "root", short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("there are no virtio disks"), "{e}");
    }

    #[test]
    fn a_disk_that_appears_late_is_waited_for() {
        let sys = tempfile::tempdir().unwrap();
        let p = sys.path().to_owned();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            fake_disk(&p, "vda", Some("root"));
        });
        assert_eq!(
            wait_disk(sys.path(), "root", Duration::from_secs(5)).unwrap(),
            "vda"
        );
        t.join().unwrap();
    }
}
