//! The image cache: what the store holds (`images/<sha3-N>/<hex>` and the squashfs a tarball
//! was converted into), when each image was last used, which ones a running job holds, and
//! least-recently-used eviction that never takes an image in use.
//!
//! In use means leased: a job holds an [`ImageLease`] (a shared `flock` on the image file)
//! from its fetch to its end; eviction takes the exclusive lock without waiting and skips
//! an image it cannot get. Last use is the image file's mtime, set at each lease (the
//! content never changes once stored, so the mtime is free to mean this).

use std::fs::{self, File};
use std::path::PathBuf;
use std::time::SystemTime;

use fs4::fs_std::FileExt;
use serde::Serialize;

use super::{ImageStore, StoredImage};
use vm::image::{io_err, ImageError};

/// One image of the store.
#[derive(Debug, Clone, Serialize)]
pub struct CachedImage {
    /// `sha3-256:HEX` (the algorithm as the store's directory names it).
    pub hash: String,
    pub path: PathBuf,
    /// The image and its converted squashfs, if any.
    pub bytes: u64,
    /// Unix seconds.
    pub last_used: u64,
    pub in_use: bool,
    /// A squashfs converted from it is kept beside (`images/squashfs/…`).
    pub converted: bool,
}

/// Keeps an image from eviction while it lives (a job's lifetime).
#[derive(Debug)]
pub struct ImageLease {
    _file: File,
}

impl ImageStore {
    /// Takes a lease on a stored image and marks it used now.
    pub fn lease(&self, image: &StoredImage) -> Result<ImageLease, ImageError> {
        let file = File::open(&image.path).map_err(io_err("open", &image.path))?;
        FileExt::lock_shared(&file).map_err(io_err("lock", &image.path))?;
        // The content never changes once stored: the mtime is the last use.
        let _ = file.set_modified(SystemTime::now());
        Ok(ImageLease { _file: file })
    }

    fn converted_path(&self, alg_dir: &str, hex: &str) -> PathBuf {
        self.dir.join("squashfs").join(alg_dir).join(hex)
    }

    /// Every stored image, least recently used first.
    pub fn list(&self) -> Result<Vec<CachedImage>, ImageError> {
        let mut out = Vec::new();
        let Ok(algs) = fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for alg in algs.flatten() {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            if !alg_name.starts_with("sha3-") || !alg.path().is_dir() {
                continue;
            }
            for e in fs::read_dir(alg.path())
                .map_err(io_err("read", &alg.path()))?
                .flatten()
            {
                let hex = e.file_name().to_string_lossy().into_owned();
                if hex.starts_with('.') {
                    continue; // a temp file of a fetch in progress
                }
                let path = e.path();
                let Ok(meta) = fs::metadata(&path) else {
                    continue;
                };
                let converted = self.converted_path(&alg_name, &hex);
                let converted_bytes = fs::metadata(&converted).map(|m| m.len()).ok();
                // Taking the exclusive lock fails only while a job holds its lease.
                let in_use = File::open(&path)
                    .and_then(|f| FileExt::try_lock_exclusive(&f))
                    .map(|got| !got)
                    .unwrap_or(false);
                out.push(CachedImage {
                    hash: format!("{alg_name}:{hex}"),
                    path,
                    bytes: meta.len() + converted_bytes.unwrap_or(0),
                    last_used: unix_secs(meta.modified().ok()),
                    in_use,
                    converted: converted_bytes.is_some(),
                });
            }
        }
        out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.hash.cmp(&b.hash)));
        Ok(out)
    }

    /// Evicts least-recently-used images not in use until the store holds at most
    /// `keep_bytes`; returns what it removed. An image in use is never removed, so the
    /// store can stay above the limit while jobs hold it.
    pub fn prune(&self, keep_bytes: u64) -> Result<Vec<CachedImage>, ImageError> {
        let all = self.list()?;
        let mut total: u64 = all.iter().map(|i| i.bytes).sum();
        let mut removed = Vec::new();
        for img in all {
            if total <= keep_bytes {
                break;
            }
            let Ok(f) = File::open(&img.path) else {
                continue;
            };
            // Held exclusively while it is removed: a job cannot lease it halfway.
            if !FileExt::try_lock_exclusive(&f).unwrap_or(false) {
                continue;
            }
            let (alg, hex) = img.hash.split_once(':').unwrap_or_default();
            let converted = self.converted_path(alg, hex);
            fs::remove_file(&img.path).map_err(io_err("remove", &img.path))?;
            let _ = fs::remove_file(&converted);
            drop(f);
            total = total.saturating_sub(img.bytes);
            tracing::info!(hash = %img.hash, bytes = img.bytes, "evicted an image from the cache");
            removed.push(img);
        }
        Ok(removed)
    }
}

fn unix_secs(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// A path's size for the operator's table.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DataDir;
    use std::path::Path;

    fn stored(store: &ImageStore, dir: &Path, name: &str, bytes: &[u8]) -> StoredImage {
        let src = dir.join(name);
        fs::write(&src, bytes).unwrap();
        store.fetch(src.to_str().unwrap(), None).unwrap()
    }

    #[test]
    fn eviction_is_least_recently_used_and_never_takes_a_leased_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(&DataDir::new(dir.path().join("data")));
        let a = stored(&store, dir.path(), "a", &[1u8; 1000]);
        let b = stored(&store, dir.path(), "b", &[2u8; 1000]);
        let c = stored(&store, dir.path(), "c", &[3u8; 1000]);
        let at = |img: &StoredImage, secs: u64| {
            File::options()
                .write(true)
                .open(&img.path)
                .unwrap()
                .set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        };
        at(&a, 100);
        at(&b, 200);
        at(&c, 300);
        let list = store.list().unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].path, a.path, "least recently used first");
        assert!(list.iter().all(|i| !i.in_use && i.bytes == 1000));

        // `a` is oldest but leased (its mtime moves to now): `b` goes, then `c`.
        let lease = store.lease(&a).unwrap();
        let listed = store.list().unwrap();
        assert!(listed.iter().find(|i| i.path == a.path).unwrap().in_use);
        let removed = store.prune(1500).unwrap();
        assert_eq!(
            removed.iter().map(|i| i.path.clone()).collect::<Vec<_>>(),
            [b.path.clone(), c.path.clone()]
        );
        assert!(a.path.exists() && !b.path.exists() && !c.path.exists());
        // Even a limit of zero leaves the leased image.
        assert!(store.prune(0).unwrap().is_empty());
        drop(lease);
        assert_eq!(store.prune(0).unwrap().len(), 1);
        assert!(store.list().unwrap().is_empty());
    }
}
