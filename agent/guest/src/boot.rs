//! What the host asked for, read from the kernel command line (`/proc/cmdline`).
//!
//! | parameter | meaning | without it |
//! |---|---|---|
//! | `provider.root=SERIAL` | the payload image is the read-only virtio disk with this serial (squashfs) | the rootfs is `/rootfs` in the initramfs |
//! | `provider.upper=SERIAL` | the overlay's writable layer is the virtio disk with this serial (ext4) | (required with `provider.root`) |
//! | `provider.channel=NAME` | the host channel is the virtio-serial port named `NAME` | the channel is `/dev/ttyS1` |
//! | `provider.ro=1` | the payload's `/` is read-only (the runtime profile's `read_only_rootfs`) | `/` is writable |
//! | `provider.pids=N` | the payload's processes are in a pids cgroup of `N` tasks | no pids limit |
//! | `provider.warm=1` | boot into a warm-start snapshot: open the channel, unbind the placeholder disks from `virtio_blk`, park until the host sends a [`channel::msg::WarmIdentity`] (after a restore), then bind them again, which probes the job's disks on those slots | a cold boot |
//!
//! Disks are named by their virtio serial (`-device virtio-blk-pci,serial=…`, read from
//! `/sys/block/vd*/serial`), not by `vda`/`vdb`, whose letters follow probe order.
//! Dotted parameters are not passed to init by the kernel (it takes them for module
//! options), so they reach the agent only through `/proc/cmdline`. Any other `provider.`
//! parameter is refused: a misspelt one would otherwise fall back to the initramfs path
//! silently.

/// The longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL: usize = 20;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// Serial of the payload image disk.
    pub root: Option<String>,
    /// Serial of the writable disk.
    pub upper: Option<String>,
    /// Name of the virtio-serial port of the channel.
    pub channel: Option<String>,
    /// The payload's root is read-only.
    pub read_only: bool,
    /// Tasks the payload may have at once.
    pub pids_max: Option<u32>,
    /// `provider.warm=1`: park for a snapshot (see [`crate::warm`]).
    pub warm: bool,
}

/// Where the payload's root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// `/rootfs` in the initramfs (today's path).
    Initramfs,
    /// A squashfs image disk under an overlay whose upper layer is an ext4 disk.
    Disks { image: String, upper: String },
}

impl BootConfig {
    pub fn parse(cmdline: &str) -> Result<Self, String> {
        let mut c = BootConfig::default();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("provider.") else {
                continue;
            };
            let Some((key, value)) = rest.split_once('=') else {
                return Err(format!("kernel parameter `{word}` has no value"));
            };
            let value = value.trim_matches('"');
            match key {
                "ro" => {
                    c.read_only = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(format!("kernel parameter `provider.ro={value}`: 0 or 1")),
                    };
                    continue;
                }
                "pids" => {
                    let n = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            format!("kernel parameter `provider.pids={value}`: a number from 1")
                        })?;
                    if c.pids_max.replace(n).is_some() {
                        return Err("kernel parameter `provider.pids` is given twice".into());
                    }
                    continue;
                }
                "warm" => {
                    if value != "1" {
                        return Err(format!(
                            "kernel parameter `provider.warm`: `{value}` is not `1`"
                        ));
                    }
                    if c.warm {
                        return Err("kernel parameter `provider.warm` is given twice".into());
                    }
                    c.warm = true;
                    continue;
                }
                _ => {}
            }
            let (slot, max) = match key {
                "root" => (&mut c.root, MAX_SERIAL),
                "upper" => (&mut c.upper, MAX_SERIAL),
                "channel" => (&mut c.channel, 255),
                _ => {
                    return Err(format!(
                        "unknown kernel parameter `provider.{key}` (known: provider.root, \
                         provider.upper, provider.channel, provider.ro, provider.pids, \
                         provider.warm)"
                    ))
                }
            };
            if value.is_empty()
                || value.len() > max
                || !value.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
            {
                return Err(format!(
                    "kernel parameter `provider.{key}`: `{value}` is not a name of 1 to {max} \
                     printable characters without `/`"
                ));
            }
            if slot.replace(value.to_owned()).is_some() {
                return Err(format!("kernel parameter `provider.{key}` is given twice"));
            }
        }
        if let (Some(a), Some(b)) = (&c.root, &c.upper) {
            if a == b {
                return Err(format!(
                    "provider.root and provider.upper name the same disk `{a}`"
                ));
            }
        }
        if c.warm && (c.channel.is_none() || c.root.is_none()) {
            return Err(
                "provider.warm needs provider.channel and the disks (provider.root, \
                 provider.upper): a warm guest gets its identity on the virtio-serial port \
                 and reads the job's disks after the restore"
                    .into(),
            );
        }
        Ok(c)
    }

    pub fn root(&self) -> Result<Root, String> {
        match (&self.root, &self.upper) {
            (None, None) => Ok(Root::Initramfs),
            (Some(image), Some(upper)) => Ok(Root::Disks {
                image: image.clone(),
                upper: upper.clone(),
            }),
            (Some(_), None) => Err("provider.root needs provider.upper (the writable disk)".into()),
            (None, Some(_)) => Err("provider.upper needs provider.root (the image disk)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn todays_command_line_keeps_todays_path() {
        let c =
            BootConfig::parse("console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3\n").unwrap();
        assert_eq!(c, BootConfig::default());
        assert_eq!(c.root().unwrap(), Root::Initramfs);
    }

    #[test]
    fn the_disk_path_and_the_port_are_read() {
        let c = BootConfig::parse(
            "console=ttyS0 provider.root=root provider.upper=\"upper\" \
             provider.channel=provider.channel quiet",
        )
        .unwrap();
        assert_eq!(c.channel.as_deref(), Some("provider.channel"));
        assert_eq!(
            c.root().unwrap(),
            Root::Disks {
                image: "root".into(),
                upper: "upper".into()
            }
        );
        let c = BootConfig::parse("quiet provider.ro=1 provider.pids=64").unwrap();
        assert!(c.read_only);
        assert_eq!(c.pids_max, Some(64));
        // The channel alone keeps the initramfs rootfs.
        let c = BootConfig::parse("provider.channel=ch").unwrap();
        assert_eq!(c.root().unwrap(), Root::Initramfs);
    }

    #[test]
    fn mistakes_are_refused_with_their_name() {
        for (line, want) in [
            ("provider.rot=x", "unknown kernel parameter `provider.rot`"),
            ("provider.root", "has no value"),
            ("provider.root=", "not a name"),
            ("provider.root=a/b", "not a name"),
            ("provider.root=abcdefghijklmnopqrstu", "1 to 20"),
            ("provider.root=a provider.root=b", "given twice"),
            ("provider.root=a provider.upper=a", "the same disk"),
        ] {
            let e = BootConfig::parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        for (line, want) in [
            ("provider.ro=yes", "0 or 1"),
            ("provider.pids=0", "a number from 1"),
            ("provider.pids=x", "a number from 1"),
            ("provider.pids=3 provider.pids=4", "given twice"),
            ("provider.warm=0", "is not `1`"),
            ("provider.warm=1 provider.channel=c", "needs provider.channel and the disks"),
            (
                "provider.warm=1 provider.warm=1 provider.channel=c provider.root=a provider.upper=b",
                "given twice",
            ),
        ] {
            let e = BootConfig::parse(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        let warm = BootConfig::parse(
            "provider.warm=1 provider.channel=c provider.root=a provider.upper=b",
        )
        .unwrap();
        assert!(warm.warm);
        let half = BootConfig::parse("provider.root=a").unwrap();
        assert!(half.root().unwrap_err().contains("needs provider.upper"));
        let half = BootConfig::parse("provider.upper=a").unwrap();
        assert!(half.root().unwrap_err().contains("needs provider.root"));
    }
}
