//! The provider's data dir: where it is, how its files are read, and how they are written.
//!
//! Every write is atomic (temp file in the same directory, fsync, rename, fsync of the
//! directory) and happens under an exclusive lock on `<data-dir>/.lock`, so the CLI and a
//! running daemon never see a torn file and two CLI invocations never lose each other's
//! update. Reads need no lock: a rename replaces a file whole.
//!
//! A writer killed between creating its temp file and renaming it leaves the temp behind
//! (`.<name>.tmp.<pid>`). Readers skip hidden files, so litter is never mistaken for data;
//! whoever takes the lock next removes the temps of writers that no longer run.

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
        for dir in [self.root.clone(), self.cert_dir()] {
            remove_stale_temps(&dir);
        }
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

/// The pid in the name of a temp file that [`atomic_write`] (`.<name>.tmp.<pid>`) or the
/// identity file's creation (`.<name>.tmp.<pid>.<peer id>`) leaves when its writer dies
/// before the rename; `None` for any other name.
fn temp_writer_pid(file_name: &str) -> Option<i32> {
    let rest = file_name.strip_prefix('.')?;
    let (target, tail) = rest.rsplit_once(".tmp.")?;
    if target.is_empty() {
        return None;
    }
    let digits = tail.split_once('.').map_or(tail, |(pid, _)| pid);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i32>().ok().filter(|&pid| pid > 0)
}

/// Whether no process has id `pid` (in this pid namespace). A process we may not signal
/// (`EPERM`) exists.
fn process_is_gone(pid: i32) -> bool {
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Removes, from `dir`, the temp files of writers that are no longer running. Called with
/// the data dir's lock held, so no writer that takes the lock is between its create and its
/// rename; a writer that does not (the daemon creating `identity.key`) is alive while its
/// temp exists, and temps of live processes are never touched — nor this process's own. A
/// dead writer's pid reused by an unrelated process only delays the clean-up. Best effort:
/// litter is harmless (readers skip hidden files), so a failure here fails no command.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer_pid) else {
            continue;
        };
        if u32::try_from(pid).is_ok_and(|p| p == own) || !process_is_gone(pid) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), pid, "removed the temp file of a writer that died")
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot remove a stale temp file")
            }
        }
    }
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

    /// A pid above any kernel's `pid_max` (at most 2^22): never a running process.
    const NEVER_A_PID: u32 = 2_000_000_000;

    #[test]
    fn temp_file_names_are_recognised_and_nothing_else() {
        assert_eq!(temp_writer_pid(".abc.pem.tmp.123"), Some(123));
        assert_eq!(temp_writer_pid(".rules.json.tmp.7"), Some(7));
        assert_eq!(
            temp_writer_pid(".identity.key.tmp.42.12D3KooWHk6JmCpT1YgUp1wYm4"),
            Some(42)
        );
        assert_eq!(temp_writer_pid(".a.tmp.pem.tmp.9"), Some(9));
        for name in [
            "abc.pem.tmp.123", // not hidden: an operator's file, never ours
            ".abc.pem",
            ".lock",
            ".tmp.5",
            ".abc.tmp.",
            ".abc.tmp.12x",
            ".abc.tmp.-3",
            ".abc.tmp.0",
            ".abc.tmp.99999999999",
            ".abc.pem.swp",
        ] {
            assert_eq!(temp_writer_pid(name), None, "{name}");
        }
    }

    #[test]
    fn the_lock_holder_removes_temps_of_dead_writers_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let certs = data.cert_dir();
        fs::create_dir_all(&certs).unwrap();
        // A writer that really ran and is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = [
            certs.join(format!(".aa.pem.tmp.{dead}")),
            certs.join(format!(".bb.pem.tmp.{NEVER_A_PID}")),
            dir.path().join(format!(".rules.json.tmp.{NEVER_A_PID}")),
            dir.path()
                .join(format!(".identity.key.tmp.{NEVER_A_PID}.12D3KooWHk6JmCpT")),
        ];
        // Live writers (the process that started this test, and this process itself) and
        // files that are not temps.
        let live = [
            certs.join(format!(
                ".cc.pem.tmp.{}",
                std::os::unix::process::parent_id()
            )),
            certs.join(format!(".dd.pem.tmp.{}", std::process::id())),
            certs.join("ee.pem"),
            certs.join(".hidden-by-the-operator"),
            dir.path().join("rules.json"),
        ];
        for p in stale.iter().chain(&live) {
            fs::write(p, b"x").unwrap();
        }
        fs::create_dir(certs.join(format!(".dir.tmp.{NEVER_A_PID}"))).unwrap();
        let lock = data.lock().unwrap();
        for p in &stale {
            assert!(!p.exists(), "{} was left", p.display());
        }
        for p in &live {
            assert!(p.exists(), "{} was removed", p.display());
        }
        assert!(certs.join(format!(".dir.tmp.{NEVER_A_PID}")).is_dir());
        drop(lock);
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
