//! Which program a `run` starts.
//!
//! The entry point is what the host's gate approved, so the requestor's environment must
//! not change its meaning: a bare name (`date`) is looked up by the agent in the fixed
//! [`DEFAULT_PATH`], never in the `PATH` of the request's `env` (which the command still
//! gets, for its own use), and the absolute path found is executed. Relative paths
//! (`./x`, `bin/sh`), `.`/`..` segments and whitespace are refused: the gate refuses them
//! too, and the agent does not rely on that.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The `PATH` commands get by default, and the only one bare entry points are looked up in.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The absolute path to execute for `program`, as seen inside the payload root.
pub fn resolve(program: &str) -> Result<String, String> {
    resolve_in(Path::new("/"), program)
}

/// [`resolve`] with the payload root at `root` (the agent runs chrooted, so `/`).
fn resolve_in(root: &Path, program: &str) -> Result<String, String> {
    if program.is_empty() {
        return Err("empty entry point".into());
    }
    if program.chars().any(char::is_whitespace) {
        return Err(format!(
            "entry point `{}` contains whitespace",
            program.escape_debug()
        ));
    }
    if program.contains('/') && !program.starts_with('/') {
        return Err(format!(
            "relative entry point `{program}`: give an absolute path or a bare program name"
        ));
    }
    if program.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("entry point `{program}` has a `.` or `..` segment"));
    }
    if program.starts_with('/') {
        return Ok(program.to_owned());
    }
    for dir in DEFAULT_PATH.split(':') {
        let inside = format!("{dir}/{program}");
        let on_disk = root.join(inside.trim_start_matches('/'));
        // Like execvp: the first regular file with an execute bit (symlinks followed).
        if let Ok(m) = std::fs::metadata(&on_disk) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(inside);
            }
        }
    }
    Err(format!(
        "entry point `{program}` is not in the default PATH ({DEFAULT_PATH})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for d in ["bin", "usr/bin", "tmp"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        for (f, mode) in [
            ("bin/date", 0o755),
            ("tmp/date", 0o755),
            ("usr/bin/doc", 0o644),
        ] {
            fs::write(dir.path().join(f), "").unwrap();
            fs::set_permissions(dir.path().join(f), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::create_dir_all(dir.path().join("usr/bin/date")).unwrap();
        std::os::unix::fs::symlink("date", dir.path().join("bin/today")).unwrap();
        dir
    }

    #[test]
    fn bare_names_come_from_the_fixed_path_only() {
        let r = root();
        // /usr/bin/date is a directory: skipped; /tmp is not searched.
        assert_eq!(resolve_in(r.path(), "date").unwrap(), "/bin/date");
        assert_eq!(resolve_in(r.path(), "today").unwrap(), "/bin/today");
        let e = resolve_in(r.path(), "doc").unwrap_err();
        assert!(e.contains("not in the default PATH"), "{e}");
    }

    #[test]
    fn absolute_paths_are_kept_and_the_rest_refused() {
        let r = root();
        assert_eq!(resolve_in(r.path(), "/tmp/date").unwrap(), "/tmp/date");
        for (p, why) in [
            ("./x", "relative entry point"),
            ("bin/sh", "relative entry point"),
            ("x/", "relative entry point"),
            ("/bin/../tmp/date", "`.` or `..`"),
            ("/bin/./date", "`.` or `..`"),
            ("..", "`.` or `..`"),
            (".", "`.` or `..`"),
            ("/bin/echo hi", "whitespace"),
            ("date\n", "whitespace"),
            ("", "empty"),
        ] {
            let e = resolve_in(r.path(), p).unwrap_err();
            assert!(e.contains(why), "{p:?}: {e}");
        }
    }
}
