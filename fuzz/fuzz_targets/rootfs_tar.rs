//! The rootfs tarball reader (`vm::image::read_rootfs`, plain or gzip) and the initramfs
//! builder on top of it (`vm::initramfs::build`), on an image a requestor supplied.
//!
//! Checked on every entry the reader hands out: the path is relative, normalised and free
//! of `..`; no device node gets through; a symlink's target stays inside the root; a hard
//! link names an earlier file. The builder must either produce an archive or fail cleanly
//! and leave no output behind.
#![no_main]

use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm::image::{read_rootfs, EntryKind};

struct Paths {
    image: PathBuf,
    agent: PathBuf,
    out: PathBuf,
}

fn paths() -> &'static Paths {
    static P: OnceLock<Paths> = OnceLock::new();
    P.get_or_init(|| {
        // One directory per fuzzing process (libFuzzer's -fork/-jobs run several).
        let base = std::env::var_os("FUZZ_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(if std::path::Path::new("/dev/shm").is_dir() {
                    "/dev/shm"
                } else {
                    "/tmp"
                })
            })
            .join(format!("provider-fuzz-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(&base).expect("scratch dir");
        let agent = base.join("agent");
        std::fs::write(&agent, b"\x7fELF not really").expect("agent");
        Paths {
            image: base.join("image.tar"),
            agent,
            out: base.join("initramfs.cpio"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let p = paths();
    std::fs::write(&p.image, data).expect("write the image");
    let mut files = std::collections::HashSet::new();
    let _ = read_rootfs(&p.image, |e| {
        assert!(!e.path.is_empty() && !e.path.starts_with('/'), "{}", e.path);
        assert!(
            e.path
                .split('/')
                .all(|c| !c.is_empty() && c != ".." && c != "."),
            "unnormalised path {}",
            e.path
        );
        match &e.kind {
            EntryKind::Symlink { target } => {
                // Resolve lexically from the link's directory: it must not climb out.
                // An absolute target resolves inside the payload root at run time.
                let mut depth: i64 = e.path.matches('/').count() as i64;
                for c in target.split('/').filter(|_| !target.starts_with('/')) {
                    match c {
                        "" | "." => {}
                        ".." => {
                            depth -= 1;
                            assert!(depth >= 0, "symlink {} -> {target} leaves the root", e.path);
                        }
                        _ => depth += 1,
                    }
                }
            }
            EntryKind::HardLink { target } => {
                assert!(files.contains(target), "hard link {} -> {target}", e.path)
            }
            EntryKind::File => {
                files.insert(e.path.clone());
            }
            _ => {}
        }
        let mut sink = Vec::new();
        let _ = e.data.take(1 << 20).read_to_end(&mut sink);
        Ok(())
    });
    match vm::initramfs::build(&p.out, &p.agent, &p.image) {
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
            assert!(
                !p.out.exists(),
                "a failed build left {} behind",
                p.out.display()
            );
        }
    }
});
