//! The provider's data dir: where it is, how its files are read, and how they are written.
//!
//! Every write is atomic (temp file in the same directory, fsync, rename, fsync of the
//! directory) and happens under an exclusive lock on `<data-dir>/.lock`, so the CLI and a
//! running daemon never see a torn file and two CLI invocations never lose each other's
//! update. Reads need no lock: a rename replaces a file whole.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use certs::{ChainVerifier, Keystore};
use fs4::fs_std::FileExt;
use policies::{Judge, Rules, Whitelist};

/// Why the data dir could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no data dir given and neither XDG_DATA_HOME nor HOME is set; pass --data-dir")]
    NoDefault,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The data dir and the paths of its files.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Held while a command reads, changes and writes files; released on drop.
#[derive(Debug)]
pub struct WriteLock {
    _file: File,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `--data-dir` / `PROVIDER_DATA_DIR` if given, else `$XDG_DATA_HOME/provider`, else
    /// `~/.local/share/provider`.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, StoreError> {
        if let Some(p) = explicit {
            return Ok(Self::new(p));
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::new(PathBuf::from(x).join("provider")));
        }
        if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::new(PathBuf::from(h).join(".local/share/provider")));
        }
        Err(StoreError::NoDefault)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn rules_path(&self) -> PathBuf {
        self.root.join("rules.json")
    }
    pub fn whitelist_path(&self) -> PathBuf {
        self.root.join("domain_whitelist.json")
    }
    pub fn cert_dir(&self) -> PathBuf {
        self.root.join("cert-dir")
    }
    pub fn audit_path(&self) -> PathBuf {
        self.root.join("audit.jsonl")
    }

    /// Takes the data dir's write lock, creating the directory if needed.
    pub fn lock(&self) -> Result<WriteLock, StoreError> {
        fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        let path = self.root.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        file.lock_exclusive().map_err(io("lock", &path))?;
        Ok(WriteLock { _file: file })
    }

    /// `rules.json`, or the defaults for a new data dir.
    pub fn load_rules(&self) -> Result<Rules, StoreError> {
        let path = self.rules_path();
        match read_optional(&path)? {
            None => Ok(Rules::default()),
            Some(bytes) => Rules::from_json(&bytes).map_err(|e| StoreError::Invalid {
                path,
                message: e.to_string(),
            }),
        }
    }

    /// `domain_whitelist.json`, or an empty whitelist.
    pub fn load_whitelist(&self) -> Result<Whitelist, StoreError> {
        let path = self.whitelist_path();
        match read_optional(&path)? {
            None => Ok(Whitelist::default()),
            Some(bytes) => Whitelist::from_json(&bytes).map_err(|e| StoreError::Invalid {
                path,
                message: e.to_string(),
            }),
        }
    }

    pub fn load_keystore(&self) -> Result<Keystore, StoreError> {
        Keystore::load(&self.cert_dir()).map_err(|e| StoreError::Invalid {
            path: self.cert_dir(),
            message: e.to_string(),
        })
    }

    /// The decision engine over the current rules, whitelist and keystore.
    pub fn load_judge(&self) -> Result<Judge, StoreError> {
        let rules = self.load_rules()?;
        let whitelist = self
            .load_whitelist()?
            .matcher()
            .map_err(|e| StoreError::Invalid {
                path: self.whitelist_path(),
                message: e.to_string(),
            })?;
        let verifier = ChainVerifier::new(Arc::new(self.load_keystore()?));
        Ok(Judge::new(rules, whitelist, Arc::new(verifier)))
    }

    pub fn save_rules(&self, _lock: &WriteLock, rules: &Rules) -> Result<(), StoreError> {
        atomic_write(&self.rules_path(), &rules.to_json())
    }

    pub fn save_whitelist(&self, _lock: &WriteLock, list: &Whitelist) -> Result<(), StoreError> {
        atomic_write(&self.whitelist_path(), &list.to_json())
    }

    /// Writes a file into `cert-dir/`.
    pub fn save_cert_file(
        &self,
        _lock: &WriteLock,
        name: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let dir = self.cert_dir();
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        atomic_write(&dir.join(name), bytes)
    }

    /// Replaces or removes a file of `cert-dir/` (removing one certificate of a chain file
    /// rewrites the file with the rest).
    pub fn replace_cert_file(
        &self,
        _lock: &WriteLock,
        path: &Path,
        remaining: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        match remaining {
            Some(bytes) => atomic_write(path, bytes),
            None => {
                fs::remove_file(path).map_err(io("remove", path))?;
                sync_dir(path.parent().unwrap_or(Path::new(".")))
            }
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Temp file beside the target, fsync, rename over the target, fsync the directory: after a
/// crash the file is either the old or the new version, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    // A bare file name has the empty path as its parent: that is the current directory.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.json");
        atomic_write(&path, b"first version, longer").unwrap();
        atomic_write(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rules.json")]);
    }

    #[test]
    fn new_data_dir_has_documented_defaults_and_no_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("provider"));
        let rules = data.load_rules().unwrap();
        assert!(rules.outbound.enabled);
        assert_eq!(rules.outbound.everyone, policies::Mode::Whitelist);
        assert!(data.load_whitelist().unwrap().patterns.is_empty());
        assert!(data.load_keystore().unwrap().is_empty());
        assert!(
            !data.root().exists(),
            "reading must not create the data dir"
        );
    }

    #[test]
    fn corrupt_rules_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        fs::write(data.rules_path(), b"{\"outbound\": {\"enabled\": tru").unwrap();
        let err = data.load_rules().unwrap_err().to_string();
        assert!(err.contains("rules.json"), "{err}");
    }
}
