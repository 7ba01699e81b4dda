//! Boot-time setup: mounts, loopback, the channel's serial port (kept from payloads), the
//! chroot; and power-off.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::termios::{self, SetArg};

use crate::lockdown;

/// Where the host put the payload's rootfs in the initramfs.
pub const PAYLOAD_ROOT: &str = "/rootfs";
/// The channel's serial port (the host side owns the other end).
const CHANNEL_TTY: &str = "/dev/ttyS1";

fn ctx<T>(r: Result<T, impl std::fmt::Display>, what: &str) -> io::Result<T> {
    r.map_err(|e| io::Error::other(format!("{what}: {e}")))
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> io::Result<()> {
    fs::create_dir_all(target)?;
    ctx(
        mount(Some(fstype), target, Some(fstype), flags, data),
        &format!("mount {fstype} on {target}"),
    )
}

/// Mounts, `lo`, the raw channel tty (then hidden from payloads: see [`lockdown`]), then
/// chroot into the payload root.
pub fn setup() -> io::Result<File> {
    let root = Path::new(PAYLOAD_ROOT);
    if !root.is_dir() {
        return Err(io::Error::other(format!(
            "{PAYLOAD_ROOT} is missing from the initramfs"
        )));
    }
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
    let channel = format!("{PAYLOAD_ROOT}{CHANNEL_TTY}");
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&channel)
        .map_err(|e| io::Error::other(format!("open {CHANNEL_TTY}: {e}")))?;
    raw_mode(&tty)?;
    lockdown::hide_channel(&tty, Path::new(&channel))?;
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

    ctx(std::os::unix::fs::chroot(PAYLOAD_ROOT), "chroot")?;
    std::env::set_current_dir("/")?;
    Ok(tty)
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
