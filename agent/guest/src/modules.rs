//! Loading the kernel modules the host put in the initramfs (`/modules`), before anything
//! needs the drivers: `order` names the `.ko` files one a line, dependencies first
//! (`scripts/fetch-guest-kernel.sh` writes it from the kernel package's `modules.dep`);
//! `release`, if present, is the kernel release they were built for. Each is loaded with
//! `finit_module(2)`; one already in the kernel (`EEXIST`) is fine. Module loading is
//! switched off for good later, in [`crate::lockdown::restrict_kernel`].

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Where the modules are in the initramfs.
pub const MODULES_DIR: &str = "/modules";

/// The file names of `order`, checked: plain `.ko` names, no paths, no repeats.
pub fn parse_order(text: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.contains('/') || !name.ends_with(".ko") || name.starts_with('.') {
            return Err(format!(
                "line {}: `{name}` is not the file name of an uncompressed module (`x.ko`)",
                i + 1
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("line {}: `{name}` is listed twice", i + 1));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// Loads every module `dir/order` lists, in order; returns how many were loaded (not
/// counting those already in the kernel).
pub fn load_all(dir: &Path) -> io::Result<usize> {
    let read = |name: &str| {
        fs::read_to_string(dir.join(name))
            .map_err(|e| io::Error::new(e.kind(), format!("read {}/{name}: {e}", dir.display())))
    };
    let order = read("order")?;
    let names = parse_order(&order)
        .map_err(|e| io::Error::other(format!("{}/order: {e}", dir.display())))?;
    let running = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if dir.join("release").exists() {
        let built = read("release")?;
        let built = built.trim();
        if built != running {
            return Err(io::Error::other(format!(
                "the initramfs's modules are for kernel {built}, this kernel is {running}: \
                 the kernel and its modules must come from the same package \
                 (scripts/fetch-guest-kernel.sh --force)"
            )));
        }
    }
    let mut loaded = 0;
    for name in &names {
        let path = dir.join(name);
        let file = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
        // SAFETY: `file` stays open for the whole call; the parameter string is a valid,
        // NUL-terminated empty C string and the flags are 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if r == 0 {
            loaded += 1;
            continue;
        }
        let e = io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::EEXIST) => continue,
            Some(libc::ENOEXEC) => {
                " (not a module for this kernel: wrong release or format, or compressed)"
            }
            Some(libc::ENOENT) => {
                " (an unknown symbol: a module it needs is missing from \
                                   `order` or listed after it)"
            }
            Some(libc::EPERM) => " (module loading is disabled)",
            _ => "",
        };
        let log = crate::klog::tail(&[name.trim_end_matches(".ko")], &[], 3);
        return Err(io::Error::new(
            e.kind(),
            format!("load module {name} on kernel {running}: {e}{why}{log}"),
        ));
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_file_is_read_and_checked() {
        let names =
            parse_order("virtio_ring.ko\nvirtio.ko\n\n# comment\n  squashfs.ko \n").unwrap();
        assert_eq!(names, ["virtio_ring.ko", "virtio.ko", "squashfs.ko"]);
        for (text, want) in [
            ("../x.ko", "not the file name"),
            ("kernel/fs/x.ko", "not the file name"),
            ("x.ko.xz", "not the file name"),
            (".ko", "not the file name"),
            ("a.ko\na.ko", "line 2: `a.ko` is listed twice"),
        ] {
            let e = parse_order(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_release_mismatch_is_named_before_anything_loads() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("order"), "nonexistent_module.ko\n").unwrap();
        fs::write(dir.path().join("release"), "0.0.0-not-this-kernel\n").unwrap();
        let e = load_all(dir.path()).unwrap_err().to_string();
        assert!(e.contains("for kernel 0.0.0-not-this-kernel"), "{e}");
        // Without a release file, a missing module file fails on open (nothing is loaded
        // on the test host).
        fs::remove_file(dir.path().join("release")).unwrap();
        let e = load_all(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("open") && e.contains("nonexistent_module.ko"),
            "{e}"
        );
    }
}
