//! Boot-time setup: the payload root (the initramfs's `/rootfs`, or a squashfs image disk
//! under an overlay, per the kernel command line: [`crate::boot`]), mounts, loopback, the
//! channel (ttyS1 or a virtio-serial port, kept from payloads), entering the root; and
//! power-off.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::termios::{self, SetArg};

use crate::boot::{BootConfig, Root};
use crate::{disk, limits, lockdown, modules, vport, warm};

/// Where the payload's rootfs is: a directory of the initramfs, or the overlay's mount.
pub const PAYLOAD_ROOT: &str = "/rootfs";
/// The channel's serial port (the host side owns the other end).
const CHANNEL_TTY: &str = "/dev/ttyS1";

fn ctx<T>(r: Result<T, impl std::fmt::Display>, what: &str) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("{what}: {e}")))
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> io::Result<()> {
    not_a_symlink(Path::new(target))?;
    fs::create_dir_all(target)?;
    ctx(
        mount(Some(fstype), target, Some(fstype), flags, data),
        &format!("mount {fstype} on {target}"),
    )
}

/// A mount point that is a symlink would be followed, before the chroot, to a path the
/// image chose in the agent's own root (an image's `dev -> /` would put devtmpfs over the
/// initramfs). The image's `/proc`, `/sys`, `/dev` and `/tmp` must be directories or
/// absent; deeper mount points lie in file systems the agent mounted itself.
fn not_a_symlink(target: &Path) -> io::Result<()> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symlink in the payload's image; it must be a directory",
            target.display()
        ))),
        _ => Ok(()),
    }
}

/// Mounts in the initramfs itself, needed before the payload root exists (`/proc` for the
/// command line; `/sys` and `/dev` to find the disks). All are gone again, and the
/// directories made for them, before the payload root is set up.
#[derive(Default)]
struct Early {
    mounted: Vec<(&'static str, bool)>,
}

impl Early {
    fn mount(
        &mut self,
        fstype: &str,
        target: &'static str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        let made = !Path::new(target).exists();
        mount_fs(fstype, target, flags, data)?;
        self.mounted.push((target, made));
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        while let Some((target, made)) = self.mounted.pop() {
            ctx(
                umount2(target, MntFlags::MNT_DETACH),
                &format!("unmount {target}"),
            )?;
            if made {
                let _ = fs::remove_dir(target);
            }
        }
        Ok(())
    }
}

/// Reads the command line, loads the initramfs's modules (if it has any), makes the
/// payload root, then does the mounts, `lo`, the channel (hidden from payloads: see
/// [`lockdown`]) and enters the root.
pub fn setup() -> io::Result<File> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut early = Early::default();
    early.mount("proc", "/proc", nosuid, None)?;
    let cmdline = ctx(fs::read_to_string("/proc/cmdline"), "read /proc/cmdline")?;
    let mut boot = BootConfig::parse(&cmdline).map_err(io::Error::other)?;
    let root = boot.root().map_err(io::Error::other)?;
    let mods = Path::new(modules::MODULES_DIR);
    if mods.join("order").exists() {
        modules::load_all(mods)?;
    }
    let mut parked = None;
    let writable = match &root {
        Root::Initramfs => {
            if !Path::new(PAYLOAD_ROOT).is_dir() {
                return Err(io::Error::other(format!(
                    "{PAYLOAD_ROOT} is missing from the initramfs"
                )));
            }
            if boot.read_only {
                // A directory, not a mount: make it one, whose flags can then be changed.
                ctx(
                    mount(
                        Some(PAYLOAD_ROOT),
                        PAYLOAD_ROOT,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    ),
                    "bind the payload root onto itself",
                )?;
            }
            Vec::new()
        }
        Root::Disks { image, upper } => {
            // A warm guest unbinds and binds its disks through sysfs. The first mount sets
            // the superblock's flags, so it is writable here; the payload's own sysfs
            // mount is read-only by its mount flag either way.
            let sys_flags = if boot.warm {
                nosuid
            } else {
                nosuid | MsFlags::MS_RDONLY
            };
            early.mount("sysfs", "/sys", sys_flags, None)?;
            early.mount("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
            if boot.warm {
                // The snapshot is taken while this waits; what follows runs per job.
                // The placeholder disks the snapshot is built with leave before it: a
                // virtio-blk disk's size is read once, at probe, so the job's disks are
                // probed anew after the restore.
                let devices = warm::unbind_disks(Path::new("/sys"))?;
                let sys_block = Path::new("/sys/block");
                if !disk::virtio_disks(sys_block)?.is_empty() {
                    return Err(io::Error::other(
                        "provider.warm=1: a virtio disk is still probed after unbinding the \
                         disk driver's devices",
                    ));
                }
                let name = boot.channel.as_deref().unwrap_or_default();
                let (mut port, node) = vport::open(
                    Path::new("/sys/class/virtio-ports"),
                    Path::new("/dev"),
                    name,
                    vport::PORT_WAIT,
                )?;
                let id = warm::park(&mut port)?;
                let restored = std::time::Instant::now();
                warm::apply(&id, "/dev/urandom")?;
                // The job's profile, which the snapshot's command line cannot carry.
                boot.read_only = id.read_only;
                boot.pids_max = id.pids_max;
                let reseeded = restored.elapsed();
                warm::bind_disks(Path::new("/sys"), &devices)?;
                let driver = restored.elapsed();
                let node_name = node.file_name().map(|n| n.to_owned()).unwrap_or_default();
                parked = Some((port, node_name));
                let writable =
                    disk::mount_root(image, upper, Path::new(PAYLOAD_ROOT), Path::new("/dev"))?;
                // On the console, where the bench and an operator find where a restore's
                // time went (one short line: the UART is slow under TCG).
                eprintln!(
                    "provider-guest: restored for job {}: reseed {} ms, disks probed {} ms, disks mounted {} ms",
                    id.job_id,
                    reseeded.as_millis(),
                    driver.as_millis(),
                    restored.elapsed().as_millis()
                );
                writable
            } else {
                disk::mount_root(image, upper, Path::new(PAYLOAD_ROOT), Path::new("/dev"))?
            }
        }
    };
    early.finish()?;
    if let Some(n) = boot.pids_max {
        limits::pids_cgroup(n)?;
    }
    if boot.read_only {
        limits::bind_writable(Path::new(PAYLOAD_ROOT), &writable)?;
    }
    let channel = payload_mounts(boot.channel.as_deref(), parked)?;
    if boot.read_only {
        // Last, once every mount point below it exists: only the root's own mount turns
        // read-only; /tmp, /dev/shm and the writable binds stay as they are.
        read_only(PAYLOAD_ROOT, MsFlags::MS_NODEV)?;
    }
    enter(&root)?;
    Ok(channel)
}

/// Today's setup of the payload root at [`PAYLOAD_ROOT`], whatever it is made of.
/// `parked`: the channel port a warm guest opened before its snapshot, with its node's
/// name (the node is in the one devtmpfs, so it shows under the payload's `/dev` too).
fn payload_mounts(
    port: Option<&str>,
    parked: Option<(File, std::ffi::OsString)>,
) -> io::Result<File> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/rootfs/proc", nosuid, None)?;
    // Read-only: root may write most sysfs files without any capability (driver bind and
    // unbind, device removal, module parameters).
    mount_fs("sysfs", "/rootfs/sys", nosuid | MsFlags::MS_RDONLY, None)?;
    mount_fs(
        "devtmpfs",
        "/rootfs/dev",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/rootfs/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620"),
    )?;
    // /dev becomes read-only below, so what programs expect to find or create there is
    // made now: POSIX shared memory and the fd links.
    mount_fs("tmpfs", "/rootfs/dev/shm", nosuid, Some("mode=1777"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let at = Path::new("/rootfs/dev").join(link);
        match std::os::unix::fs::symlink(target, &at) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io::Error::other(format!("symlink {}: {e}", at.display())));
            }
            _ => {}
        }
    }
    mount_fs(
        "tmpfs",
        "/rootfs/tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    loopback_up()?;

    // std opens with O_CLOEXEC (and `try_clone` dups with F_DUPFD_CLOEXEC): no payload
    // inherits the channel.
    let channel = match (port, parked) {
        (_, Some((port, node_name))) => {
            lockdown::hide_port(&Path::new("/rootfs/dev").join(node_name))?;
            port
        }
        (None, None) => {
            let node = format!("{PAYLOAD_ROOT}{CHANNEL_TTY}");
            let tty = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&node)
                .map_err(|e| io::Error::other(format!("open {CHANNEL_TTY}: {e}")))?;
            raw_mode(&tty)?;
            lockdown::hide_channel(&tty, Path::new(&node))?;
            tty
        }
        (Some(name), None) => {
            let (port, node) = vport::open(
                Path::new("/rootfs/sys/class/virtio-ports"),
                Path::new("/rootfs/dev"),
                name,
                vport::PORT_WAIT,
            )?;
            lockdown::hide_port(&node)?;
            port
        }
    };
    read_only("/rootfs/dev", MsFlags::MS_NOSUID)?;
    lockdown::non_dumpable()?;
    lockdown::restrict_kernel(Path::new("/rootfs/proc/sys"))?;
    ctx(
        mount(
            Some("/rootfs/proc/sys"),
            "/rootfs/proc/sys",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
        "bind /proc/sys",
    )?;
    read_only("/rootfs/proc/sys", nosuid)?;
    Ok(channel)
}

/// Makes the payload root the agent's root. The initramfs's `/rootfs` is a directory:
/// chroot into it. The overlay is a mount: it is moved over the initramfs's `/` first
/// (what `switch_root` does), so that nothing of the initramfs (the agent's binary, the
/// modules) stays reachable even from a process that escapes a chroot of its own.
fn enter(root: &Root) -> io::Result<()> {
    match root {
        Root::Initramfs => ctx(std::os::unix::fs::chroot(PAYLOAD_ROOT), "chroot")?,
        Root::Disks { .. } => {
            std::env::set_current_dir(PAYLOAD_ROOT)?;
            ctx(
                mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>),
                &format!("move {PAYLOAD_ROOT} to /"),
            )?;
            ctx(std::os::unix::fs::chroot("."), "chroot")?;
        }
    }
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Makes the mount at `target` read-only, keeping `flags`; only CAP_SYS_ADMIN, which no
/// payload has, could make it writable again.
fn read_only(target: &str, flags: MsFlags) -> io::Result<()> {
    ctx(
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
            None::<&str>,
        ),
        &format!("remount {target} read-only"),
    )
}

/// 8-bit clean, no echo, no line discipline, no software or hardware flow control.
fn raw_mode(tty: &File) -> io::Result<()> {
    let mut t = ctx(termios::tcgetattr(tty), "tcgetattr ttyS1")?;
    termios::cfmakeraw(&mut t);
    t.control_flags |= termios::ControlFlags::CLOCAL | termios::ControlFlags::CREAD;
    t.control_flags &= !termios::ControlFlags::CRTSCTS;
    ctx(
        termios::tcsetattr(tty, SetArg::TCSANOW, &t),
        "tcsetattr ttyS1",
    )
}

/// `ip link set lo up`: the kernel then gives it 127.0.0.1/8 and ::1.
fn loopback_up() -> io::Result<()> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `fd` is an open socket owned by `sock` for the whole call and `req` is a
    // valid, NUL-terminated `ifreq` the kernel reads and writes in place.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::other(format!(
            "SIOCGIFFLAGS lo: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; the kernel only reads `req`.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::other(format!(
            "SIOCSIFFLAGS lo: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Kills everything, syncs, powers off. PID 1 must never exit (the kernel would panic).
pub fn poweroff() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached if power-off failed: halt here rather than exit.
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_point_may_be_a_directory_or_absent_but_not_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("dev")).unwrap();
        std::os::unix::fs::symlink("/", d.path().join("proc")).unwrap();
        std::os::unix::fs::symlink("nowhere", d.path().join("tmp")).unwrap();
        assert!(not_a_symlink(&d.path().join("dev")).is_ok());
        assert!(not_a_symlink(&d.path().join("sys")).is_ok());
        for l in ["proc", "tmp"] {
            let e = not_a_symlink(&d.path().join(l)).unwrap_err().to_string();
            assert!(e.contains("is a symlink in the payload's image"), "{e}");
        }
    }
}
