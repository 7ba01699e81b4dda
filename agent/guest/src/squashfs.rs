//! The squashfs superblock, read only to say why a payload image did not mount: the
//! kernel's `mount(2)` answers `EINVAL` for every kind of bad image (wrong format,
//! unsupported compression, truncated disk), and its own reason goes to the kernel log,
//! which the console does not show at `loglevel=3`.
//!
//! Layout (little-endian, squashfs 4.0, 96 bytes at offset 0): magic `hsqs` (0), inode
//! count (4), mtime (8), block size (12), fragment count (16), compression id `u16` (20),
//! block log (22), flags (24), id count (26), major (28), minor (30), root inode (32),
//! `bytes_used` `u64` (40), then the table offsets.

/// Bytes of the superblock this module reads.
pub const SUPERBLOCK_LEN: usize = 96;

const MAGIC_LE: &[u8; 4] = b"hsqs";
const MAGIC_BE: &[u8; 4] = b"sqsh";

/// Compression ids of `squashfs_fs.h`.
pub fn compressor_name(id: u16) -> Option<&'static str> {
    Some(match id {
        1 => "gzip",
        2 => "lzma",
        3 => "lzo",
        4 => "xz",
        5 => "lz4",
        6 => "zstd",
        _ => return None,
    })
}

/// What the superblock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub compression: u16,
    pub block_size: u32,
    pub bytes_used: u64,
    pub version: (u16, u16),
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses the superblock at the start of `head`; an error says, in words, what the bytes
/// are instead.
pub fn parse(head: &[u8]) -> Result<Superblock, String> {
    if head.len() < SUPERBLOCK_LEN {
        return Err(format!(
            "the disk is {} bytes long, shorter than a squashfs superblock",
            head.len()
        ));
    }
    let magic = &head[..4];
    if magic == MAGIC_BE {
        return Err(
            "it is a big-endian squashfs (format 3 or older); Linux reads only \
                    little-endian squashfs 4.0"
                .into(),
        );
    }
    if magic != MAGIC_LE {
        let hint = if head[..2] == [0x1f, 0x8b] {
            " (it looks like gzip: a tarball is no disk image)"
        } else if head.len() >= 262 && &head[257..262] == b"ustar" {
            " (it looks like a tar archive)"
        } else {
            ""
        };
        return Err(format!(
            "it is not a squashfs image: it starts with {:02x?}, not `hsqs`{hint}",
            &head[..4]
        ));
    }
    Ok(Superblock {
        block_size: u32_at(head, 12),
        compression: u16_at(head, 20),
        version: (u16_at(head, 28), u16_at(head, 30)),
        bytes_used: u64_at(head, 40),
    })
}

/// Why an image whose first bytes are `head`, on a disk of `disk_bytes`, may not mount:
/// the first problem found in the superblock, or a description of a superblock that
/// looks sound (the kernel's own log line then says more).
pub fn diagnose(head: &[u8], disk_bytes: u64) -> String {
    let sb = match parse(head) {
        Ok(sb) => sb,
        Err(e) => return e,
    };
    if sb.version != (4, 0) {
        return format!(
            "it is squashfs {}.{}; Linux reads only 4.0",
            sb.version.0, sb.version.1
        );
    }
    let name = compressor_name(sb.compression);
    match name {
        None => {
            return format!(
                "it names compression id {}, which no squashfs defines",
                sb.compression
            )
        }
        Some("lzma") => {
            return "it is lzma-compressed (the legacy format before xz), which Linux has \
                    never read; build it with -comp xz, zstd, lzo, lz4 or gzip"
                .into()
        }
        Some(_) => {}
    }
    if sb.bytes_used > disk_bytes {
        return format!(
            "it is truncated: its superblock says {} bytes, the disk has {disk_bytes}",
            sb.bytes_used
        );
    }
    format!(
        "it is squashfs 4.0, {}-compressed, {} bytes, block size {}; if this kernel lacks \
         {} support, the kernel log says so",
        name.unwrap_or("?"),
        sb.bytes_used,
        sb.block_size,
        name.unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(compression: u16, bytes_used: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(b"hsqs");
        b[12..16].copy_from_slice(&131072u32.to_le_bytes());
        b[20..22].copy_from_slice(&compression.to_le_bytes());
        b[28..30].copy_from_slice(&4u16.to_le_bytes());
        b[40..48].copy_from_slice(&bytes_used.to_le_bytes());
        b
    }

    #[test]
    fn a_sound_superblock_is_read_field_by_field() {
        let sb = parse(&superblock(3, 8192)).unwrap();
        assert_eq!(
            sb,
            Superblock {
                compression: 3,
                block_size: 131072,
                bytes_used: 8192,
                version: (4, 0)
            }
        );
        let d = diagnose(&superblock(3, 8192), 8192);
        assert!(d.contains("lzo-compressed, 8192 bytes"), "{d}");
    }

    #[test]
    fn each_problem_is_named() {
        assert!(diagnose(&superblock(2, 4096), 1 << 20).contains("lzma-compressed"));
        assert!(diagnose(&superblock(9, 4096), 1 << 20).contains("compression id 9"));
        let d = diagnose(&superblock(4, 10 << 20), 1 << 20);
        assert!(d.contains("truncated") && d.contains("10485760"), "{d}");
        let mut v3 = superblock(1, 4096);
        v3[28] = 3;
        assert!(diagnose(&v3, 1 << 20).contains("squashfs 3.0"));
        let mut be = superblock(1, 4096);
        be[..4].copy_from_slice(b"sqsh");
        assert!(diagnose(&be, 1 << 20).contains("big-endian"));
        assert!(diagnose(&[0u8; 10], 10).contains("shorter than a squashfs superblock"));
    }

    #[test]
    fn other_formats_are_recognised() {
        let mut gz = vec![0u8; 4096];
        gz[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x00]);
        assert!(diagnose(&gz, 4096).contains("gzip"));
        let mut tar = vec![0u8; 4096];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(diagnose(&tar, 4096).contains("tar archive"));
        let ext4 = vec![0u8; 4096];
        assert!(diagnose(&ext4, 4096).contains("not a squashfs image"));
    }

    #[test]
    fn every_kernel_compressor_id_has_its_name() {
        let names: Vec<_> = (1..=6).map(|i| compressor_name(i).unwrap()).collect();
        assert_eq!(names, ["gzip", "lzma", "lzo", "xz", "lz4", "zstd"]);
        assert_eq!(compressor_name(0), None);
    }
}
