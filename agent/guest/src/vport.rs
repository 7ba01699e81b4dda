//! The host channel on a virtio-serial port (`provider.channel=NAME`, see [`crate::boot`]):
//! QEMU's `-device virtserialport,name=NAME`. The guest finds it by that name in
//! `/sys/class/virtio-ports/vport*/name`; the node is `/dev/vportNpM` (devtmpfs).
//!
//! What keeps payloads away from it ([`crate::lockdown`]): the driver lets only one
//! process have a port open at a time (a second `open` fails with `EBUSY`, whatever the
//! caller's capabilities), the agent holds it open for the VM's life, and the node is
//! removed. The port's name arrives from the host in a control message some time after
//! the driver has probed, so the agent waits for it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the port may take to be announced with its name.
pub const PORT_WAIT: Duration = Duration::from_secs(10);

/// The port directory names (`vport0p1`…) under `class` (`/sys/class/virtio-ports`) with
/// their names; a port whose name has not arrived yet is left out.
pub fn named_ports(class: &Path) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(class) {
        Ok(e) => e,
        // The class appears with the first port.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries {
        let port = e?.file_name().to_string_lossy().into_owned();
        if let Ok(name) = fs::read_to_string(class.join(&port).join("name")) {
            out.push((port, name.trim_end_matches('\n').to_owned()));
        }
    }
    out.sort();
    Ok(out)
}

/// Waits up to `wait` for the port named `name` and for its node in `dev`, then opens it
/// read-write (close-on-exec, as every std open). Returns the file and the node's path.
pub fn open(
    class: &Path,
    dev: &Path,
    name: &str,
    wait: Duration,
) -> io::Result<(File, std::path::PathBuf)> {
    let deadline = Instant::now() + wait;
    loop {
        let ports = named_ports(class)?;
        if let Some((port, _)) = ports.iter().find(|(_, n)| n == name) {
            let node = dev.join(port);
            if node.exists() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&node)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("open {}: {e}", node.display()))
                    })?;
                return Ok((f, node));
            }
        }
        if Instant::now() >= deadline {
            let found = if ports.is_empty() {
                "no named virtio-serial port exists (is virtio_console loaded, a \
                 virtio-serial-pci device with a virtserialport attached?)"
                    .to_owned()
            } else {
                let list: Vec<String> = ports.iter().map(|(p, n)| format!("{p} `{n}`")).collect();
                format!("found: {}", list.join(", "))
            };
            return Err(io::Error::other(format!(
                "no virtio-serial port named `{name}` after {wait:?}; {found}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_name_and_opened_through_its_node() {
        let sys = tempfile::tempdir().unwrap();
        let dev = tempfile::tempdir().unwrap();
        for (port, name) in [("vport0p1", "other"), ("vport0p2", "provider.channel")] {
            fs::create_dir_all(sys.path().join(port)).unwrap();
            fs::write(sys.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        // A port whose name has not arrived has no `name` file.
        fs::create_dir_all(sys.path().join("vport0p3")).unwrap();
        fs::write(dev.path().join("vport0p2"), b"").unwrap();
        let (_, node) = open(
            sys.path(),
            dev.path(),
            "provider.channel",
            Duration::from_millis(30),
        )
        .unwrap();
        assert_eq!(node, dev.path().join("vport0p2"));

        let e = open(sys.path(), dev.path(), "nope", Duration::from_millis(30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no virtio-serial port named `nope`")
                && e.contains("vport0p1 `other`, vport0p2 `provider.channel`"),
            "{e}"
        );
        let e = open(
            &sys.path().join("absent"),
            dev.path(),
            "x",
            Duration::from_millis(30),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no named virtio-serial port exists"), "{e}");
    }
}
