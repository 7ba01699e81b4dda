//! Keeping payload processes away from the host channel.
//!
//! Payloads run as root in the VM, and the channel (`ttyS1` or a virtio-serial port)
//! carries the results the provider signs: a payload that could write frames could forge
//! them. So the agent, once it holds the channel, makes it unreachable for every other
//! process: the tty (or port) is exclusive and its node is gone, PID 1 is not dumpable (its fds cannot be reopened
//! through `/proc/1/fd`), kernel helper processes get no more capabilities than a payload,
//! and each payload process loses, before its `exec`, the capabilities that would undo any
//! of that. `docs/vm.md` ("What a payload cannot reach") gives the reasoning per step.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Capabilities no payload process has (bit numbers of `linux/capability.h`), and why.
/// They leave the bounding set, so no later `exec` (root's, or a file with file
/// capabilities) gets them back.
pub const DROPPED_CAPS: [(u32, &str); 8] = [
    // Loading a module is running code in the kernel.
    (16, "CAP_SYS_MODULE"),
    // /dev/mem, /dev/port, iopl/ioperm: the UART's I/O ports directly.
    (17, "CAP_SYS_RAWIO"),
    // ptrace, /proc/1/fd, /proc/1/mem, pidfd_getfd on the non-dumpable PID 1.
    (19, "CAP_SYS_PTRACE"),
    // Bypasses TIOCEXCL; mounts that undo the read-only /dev, /sys and /proc/sys;
    // bpf_probe_write_user into PID 1's buffers; TIOCSSERIAL to move a spare UART.
    (21, "CAP_SYS_ADMIN"),
    // kexec: a kernel of the payload's own would own the UART.
    (22, "CAP_SYS_BOOT"),
    // A new node for the channel's device number.
    (27, "CAP_MKNOD"),
    // The parts of CAP_SYS_ADMIN for tracing the kernel and loading BPF programs.
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

fn dropped_mask() -> u64 {
    DROPPED_CAPS.iter().fold(0, |m, (bit, _)| m | (1u64 << bit))
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Sets the channel tty exclusive (a second open fails with `EBUSY` without
/// CAP_SYS_ADMIN) and removes its node. devtmpfs is one instance for the whole kernel, so
/// a fresh devtmpfs mount does not show the node either; the kernel only makes a node when
/// a device is added, which no payload can cause for `ttyS1`.
pub fn hide_channel(tty: &File, node: &Path) -> io::Result<()> {
    // SAFETY: `tty` is an open tty for the whole call; TIOCEXCL takes no argument.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCEXCL) } < 0 {
        return Err(os_err("TIOCEXCL on the channel tty"));
    }
    fs::remove_file(node)
        .map_err(|e| io::Error::new(e.kind(), format!("unlink {}: {e}", node.display())))
}

/// The same for a virtio-serial port, which is no tty: its driver already refuses a
/// second open of a port that is open (`EBUSY`, checked here, so a kernel that behaved
/// otherwise would stop the boot instead of exposing the channel), and the node goes.
pub fn hide_port(node: &Path) -> io::Result<()> {
    match fs::OpenOptions::new().read(true).write(true).open(node) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "a second open of {} failed with {e}, not EBUSY",
                    node.display()
                ),
            ))
        }
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{} opens a second time while the agent holds it: the channel would not \
                 be the agent's alone",
                node.display()
            )))
        }
    }
    fs::remove_file(node)
        .map_err(|e| io::Error::new(e.kind(), format!("unlink {}: {e}", node.display())))
}

/// Makes PID 1 non-dumpable: `/proc/1/fd/*`, `/proc/1/mem`, ptrace and `pidfd_getfd` then
/// need CAP_SYS_PTRACE, which payloads lack. Nothing resets it: the agent never execs and
/// never changes its credentials.
pub fn non_dumpable() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(os_err("PR_SET_DUMPABLE"));
    }
    Ok(())
}

/// Kernel settings under `proc_sys` (`/proc/sys` before the chroot), before it is made
/// read-only for payloads:
///
/// - helper processes the kernel starts itself (`modprobe` for `request_module`,
///   `request-key`, core-dump pipes) get the payload's bounding and inheritable sets.
///   Without this they run with every capability, and a payload picks what they run: the
///   helpers resolve their fixed paths (`/sbin/modprobe`, `/sbin/request-key`) in the
///   payload's root, since kernel threads share PID 1's root;
/// - module autoloading off (`modprobe` empty) and module loading off for good
///   (`modules_disabled`): the kernel needs no modules;
/// - `kexec_load_disabled`, also for good.
///
/// A setting the kernel lacks (built without modules or kexec) is skipped.
pub fn restrict_kernel(proc_sys: &Path) -> io::Result<()> {
    let mask = dropped_mask();
    for name in ["bset", "inheritable"] {
        let path = proc_sys.join("kernel/usermodehelper").join(name);
        let Some(now) = read_setting(&path)? else {
            continue;
        };
        let words: Vec<u64> = now
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| io::Error::other(format!("{}: {now:?}: {e}", path.display())))?;
        let [lo, hi] = words[..] else {
            return Err(io::Error::other(format!(
                "{}: expected two words, got {now:?}",
                path.display()
            )));
        };
        let caps = (lo | (hi << 32)) & !mask;
        write_setting(&path, &format!("{}\t{}\n", caps & 0xffff_ffff, caps >> 32))?;
    }
    write_setting(&proc_sys.join("kernel/modprobe"), "\n")?;
    write_setting(&proc_sys.join("kernel/modules_disabled"), "1\n")?;
    write_setting(&proc_sys.join("kernel/kexec_load_disabled"), "1\n")?;
    Ok(())
}

fn read_setting(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("read {}: {e}", path.display()),
        )),
    }
}

/// Writes an existing setting; one that does not exist is skipped (never created).
fn write_setting(path: &Path, value: &str) -> io::Result<()> {
    let written = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("write {value:?} to {}: {e}", path.display()),
        )),
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// For a payload process between `fork` and `exec` (async-signal-safe: syscalls only, no
/// allocation): drops [`DROPPED_CAPS`] from the bounding set, clears the ambient set, and
/// removes them from the effective, permitted and inheritable sets. After `exec`, root's
/// permitted set is the bounding set plus the inheritable one, so both must lose them.
/// A capability this kernel does not know is skipped.
pub fn drop_payload_caps() -> io::Result<()> {
    for (cap, _) in DROPPED_CAPS {
        let cap = libc::c_ulong::from(cap);
        // SAFETY: plain prctls with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            continue;
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: as above.
    let clear = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if clear != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version 3 of capget fills two `CapData`; both structs outlive the call.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mask = dropped_mask();
    for (i, d) in data.iter_mut().enumerate() {
        let keep = !((mask >> (32 * i)) as u32);
        d.effective &= keep;
        d.permitted &= keep;
        d.inheritable &= keep;
    }
    // SAFETY: as above; the kernel only reads them.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_covers_every_dropped_capability() {
        let m = dropped_mask();
        assert_eq!(m.count_ones() as usize, DROPPED_CAPS.len());
        assert_eq!(m & (1 << 21), 1 << 21, "CAP_SYS_ADMIN");
        assert_eq!(m & 1, 0, "CAP_CHOWN stays");
    }

    #[test]
    fn kernel_settings_a_kernel_lacks_are_skipped_and_the_rest_written() {
        let dir = tempfile::tempdir().unwrap();
        let umh = dir.path().join("kernel/usermodehelper");
        fs::create_dir_all(&umh).unwrap();
        fs::write(umh.join("bset"), "4294967295\t511\n").unwrap();
        fs::write(umh.join("inheritable"), "4294967295\t511\n").unwrap();
        fs::write(dir.path().join("kernel/modprobe"), "/sbin/modprobe\n").unwrap();
        restrict_kernel(dir.path()).unwrap();
        let want = 0x1ff_ffff_ffffu64 & !dropped_mask();
        let got = fs::read_to_string(umh.join("bset")).unwrap();
        assert_eq!(got, format!("{}\t{}\n", want & 0xffff_ffff, want >> 32));
        assert_eq!(
            fs::read_to_string(dir.path().join("kernel/modprobe")).unwrap(),
            "\n"
        );
        // The settings this "kernel" lacks are not created.
        assert!(!dir.path().join("kernel/kexec_load_disabled").exists());
    }
}
