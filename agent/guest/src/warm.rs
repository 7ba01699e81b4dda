//! Warm start (`provider.warm=1`, see [`crate::boot`]): the host boots the agent once with
//! placeholder disks on the job disks' slots; the agent unbinds them from `virtio_blk`
//! ([`unbind_disks`]), opens the channel port and *parks* (writes
//! [`channel::msg::PARKED_LINE`] and blocks reading the port); the host snapshots the VM
//! there. Every job restores that snapshot with its own disks on those slots, and its
//! first bytes on the channel are one [`WarmIdentity`] line: from here on this VM is one
//! job's. Only then are the disks bound again ([`bind_disks`]), so the probe reads the
//! job's disks.
//!
//! Before anything else reads randomness, the host's seed is added to the kernel's input
//! pool (`RNDADDENTROPY`, credited) and the CRNG is forced to reseed from it
//! (`RNDRESEEDCRNG`): every restored copy starts from the same CRNG state, and only this
//! makes their random bytes (and the lazily made `/proc/sys/kernel/random/boot_id`, which
//! nothing reads before the snapshot) differ. QEMU's `vmgenid` device also tells the
//! kernel's vmgenid driver that the VM was restored, which reseeds too; the seed does not
//! depend on it. The wall clock is the snapshot's until it is set here from the host's.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use channel::msg::{WarmIdentity, MAX_IDENTITY_LINE, PARKED_LINE};

/// Where the disk driver's devices are listed, bound and unbound.
const DRIVER_DIR: &str = "bus/virtio/drivers/virtio_blk";

/// Unbinds every virtio-blk device from its driver (`sys` is a writable sysfs): the
/// snapshot's placeholder disks go, the driver stays loaded. Returns the devices, for
/// [`bind_disks`] after the restore, which probes them again and so reads the job's
/// disks' sizes. (Loading the module only after the restore worked too, and cost every
/// job its load under TCG: about 50 ms more here.)
pub fn unbind_disks(sys: &std::path::Path) -> io::Result<Vec<String>> {
    let dir = sys.join(DRIVER_DIR);
    let mut devices = Vec::new();
    for e in std::fs::read_dir(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", dir.display())))?
    {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("virtio") {
            devices.push(name);
        }
    }
    devices.sort();
    for d in &devices {
        write_attr(&dir.join("unbind"), d)?;
    }
    Ok(devices)
}

/// Binds `devices` to the disk driver again (a synchronous probe of each).
pub fn bind_disks(sys: &std::path::Path, devices: &[String]) -> io::Result<()> {
    let dir = sys.join(DRIVER_DIR);
    for d in devices {
        write_attr(&dir.join("bind"), d)?;
    }
    Ok(())
}

fn write_attr(path: &std::path::Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("write {value} to {}: {e}", path.display()),
            )
        })
}

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Tells the host the guest is ready to be snapshotted, then waits (across the snapshot
/// and a restore) for the job's identity line.
pub fn park(port: &mut File) -> io::Result<WarmIdentity> {
    port.write_all(PARKED_LINE)?;
    port.flush()?;
    let line = read_line(port)?;
    WarmIdentity::parse(&line).map_err(io::Error::other)
}

/// One `\n`-terminated line, read a byte at a time so that nothing after it (the channel's
/// first frame) is consumed.
fn read_line(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the channel closed before the warm-start identity arrived",
                ))
            }
            Ok(_) if b[0] == b'\n' => return Ok(line),
            Ok(_) => {
                if line.len() >= MAX_IDENTITY_LINE {
                    return Err(io::Error::other(format!(
                        "the warm-start identity line is longer than {MAX_IDENTITY_LINE} bytes"
                    )));
                }
                line.push(b[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Seeds and reseeds the kernel CRNG from the identity and sets the clock. `urandom` is
/// the `/dev/urandom` node (of the early devtmpfs).
pub fn apply(id: &WarmIdentity, urandom: &str) -> io::Result<()> {
    let seed = id.seed_bytes().map_err(io::Error::other)?;
    let dev = OpenOptions::new()
        .write(true)
        .open(urandom)
        .map_err(|e| io::Error::new(e.kind(), format!("open {urandom}: {e}")))?;
    add_entropy(&dev, &seed)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; `dev` is open for the whole call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("RNDRESEEDCRNG: {e}")));
    }
    let secs = (id.unix_nanos / 1_000_000_000) as libc::time_t;
    let nanos = (id.unix_nanos % 1_000_000_000) as libc::c_long;
    let ts = nix::sys::time::TimeSpec::new(secs, nanos);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| io::Error::other(format!("set the clock: {e}")))?;
    Ok(())
}

/// `RNDADDENTROPY`: mixes `seed` into the input pool and credits it fully (it comes from
/// the host's CSPRNG).
fn add_entropy(dev: &File, seed: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a complete `rand_pool_info` (two ints, then `buf_size` bytes) that
    // lives for the whole call; the kernel only reads it. `dev` is open.
    if unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("RNDADDENTROPY: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_line_is_read_without_what_follows() {
        let mut input: &[u8] = b"{\"a\":1}\nPVCH...";
        assert_eq!(read_line(&mut input).unwrap(), b"{\"a\":1}");
        assert_eq!(input, b"PVCH...");
        let mut cut: &[u8] = b"{\"a\":";
        assert!(read_line(&mut cut)
            .unwrap_err()
            .to_string()
            .contains("closed before"));
        let long = vec![b'x'; MAX_IDENTITY_LINE + 1];
        assert!(read_line(&mut &long[..])
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }
}
