//! Registry credentials: the operator's logins (`provider registry login`), kept in
//! `<data-dir>/registry/auth.json` (dir `0700`, file `0600`, written atomically), and the
//! registry's `WWW-Authenticate` challenge (bearer token or basic).
//!
//! The file lives outside every job dir: a job's VM sees its image and its writable layer
//! only, and the image conversion (`mksquashfs`, under Landlock) reads the staging tree
//! only. A login serves the operator's own `provider vm run` pulls; a requestor's pull uses
//! it only if the login was made with `--for-requestors` (otherwise a requestor could have
//! the provider pull the operator's private images and read them from inside a job).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::{DataDir, StoreError};

/// One registry's login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub username: String,
    pub secret: String,
    /// Requestors' pulls may use it too.
    #[serde(default)]
    pub for_requestors: bool,
    /// Token services on another origin than the registry (`host[:port]`, as Docker Hub's
    /// `auth.docker.io`) that may be sent this login. Without one listed, the login goes
    /// only to the registry's own origin: a registry's challenge must not be able to name
    /// any host and have the operator's secret sent there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_realms: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    #[serde(default)]
    pub registries: BTreeMap<String, Credential>,
}

/// What `provider registry auth list` shows: never the secret.
#[derive(Debug, Clone, Serialize)]
pub struct AuthEntry {
    pub registry: String,
    pub username: String,
    pub for_requestors: bool,
    pub token_realms: Vec<String>,
}

pub fn auth_path(data: &DataDir) -> PathBuf {
    data.root().join("registry").join("auth.json")
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

impl AuthFile {
    /// The store, empty when there is none. A store readable by others is refused: its
    /// secrets may already be out, and the operator should know.
    pub fn load(data: &DataDir) -> Result<Self, StoreError> {
        let path = auth_path(data);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io("read", &path)(e)),
        };
        let mode = fs::metadata(&path)
            .map_err(io("stat", &path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(StoreError::Invalid {
                path,
                message: format!(
                    "mode {:o} lets others read registry secrets; `chmod 600` it (and change the passwords it holds)",
                    mode & 0o777
                ),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Invalid {
            path,
            message: format!("not a registry credential store: {e}"),
        })
    }

    /// Writes the store `0600` in a `0700` dir: temp file, fsync, rename, fsync the dir.
    pub fn save(&self, data: &DataDir, _lock: &crate::store::WriteLock) -> Result<(), StoreError> {
        let path = auth_path(data);
        let dir = path.parent().unwrap_or(data.root()).to_owned();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod", &dir))?;
        let tmp = dir.join(format!(".auth.json.tmp.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let result = (|| {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&bytes).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io("rename", &path))?;
            fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync", &dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub fn entries(&self) -> Vec<AuthEntry> {
        self.registries
            .iter()
            .map(|(r, c)| AuthEntry {
                registry: r.clone(),
                username: c.username.clone(),
                for_requestors: c.for_requestors,
                token_realms: c.token_realms.clone(),
            })
            .collect()
    }
}

/// A registry's `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
        /// RFC 6750's `error` (`invalid_token`, `insufficient_scope`), when the challenge
        /// answers a token that was sent.
        error: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"` (RFC 7235 auth-params,
/// quoted or token values).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, value);
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
            error: params.remove("error"),
        }),
        _ => None,
    }
}

/// `Basic base64(user:secret)`.
pub fn basic_header(c: &Credential) -> String {
    let raw = format!("{}:{}", c.username, c.secret);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// A token endpoint's answer (the distribution spec's `token`, OAuth2's `access_token`).
#[derive(Debug, Deserialize)]
pub struct TokenAnswer {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
}

impl TokenAnswer {
    pub fn into_token(self) -> Option<String> {
        self.token
            .or(self.access_token)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:a/b:pull".into()),
                error: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=http://127.0.0.1:1/t, service = "s\"x""#),
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:1/t".into(),
                service: Some("s\"x".into()),
                scope: None,
                error: None,
            })
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="http://a/t",service="s",scope="repository:x:pull",error="insufficient_scope""#
            ),
            Some(Challenge::Bearer {
                realm: "http://a/t".into(),
                service: Some("s".into()),
                scope: Some("repository:x:pull".into()),
                error: Some("insufficient_scope".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=\"x\""), None, "no realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge("Bearer realm=\"unterminated"), None);
    }

    #[test]
    fn the_store_is_private_atomic_and_refused_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let lock = data.lock().unwrap();
        let mut f = AuthFile::load(&data).unwrap();
        assert!(f.registries.is_empty());
        f.registries.insert(
            "127.0.0.1:5000".into(),
            Credential {
                username: "u".into(),
                secret: "s3cret".into(),
                for_requestors: false,
                token_realms: Vec::new(),
            },
        );
        f.save(&data, &lock).unwrap();
        let path = auth_path(&data);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(AuthFile::load(&data).unwrap().registries, f.registries);
        let listed = serde_json::to_string(&f.entries()).unwrap();
        assert!(!listed.contains("s3cret"), "{listed}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = AuthFile::load(&data).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
