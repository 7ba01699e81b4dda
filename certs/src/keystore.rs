//! The operator's keystore: a directory of trusted certificates (`cert-dir/`).
//!
//! Every regular file in the directory is read as PEM (one or many certificates) or DER.
//! `provider keystore add` writes one file per certificate, named by its id, but operators
//! may also drop chain files in by hand; both are read the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::X509;

use crate::parse::{cert_id, parse_certificates, CertInfo, ParseError};

/// Why the keystore could not be read or a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("cannot read keystore directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: ParseError },
    #[error("no certificate in the keystore has an id starting with `{0}` (see `provider keystore list`)")]
    NoMatch(String),
    #[error("certificate id prefix `{prefix}` is ambiguous: it matches {}; give more characters", .candidates.join(", "))]
    Ambiguous {
        prefix: String,
        candidates: Vec<String>,
    },
    #[error("certificate id prefix `{0}` is not lowercase hexadecimal")]
    BadPrefix(String),
    #[error(
        "certificate `{subject}` expired at {not_after}; an expired certificate cannot be trusted"
    )]
    Expired {
        subject: String,
        not_after: DateTime<Utc>,
    },
    #[error("certificate `{subject}` is not valid before {not_before}; add it once it is valid")]
    NotYetValid {
        subject: String,
        not_before: DateTime<Utc>,
    },
    #[error("cannot build the openssl trust store: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

/// A certificate held by the keystore and the file it came from.
#[derive(Debug, Clone)]
pub struct StoredCert {
    pub info: CertInfo,
    pub is_ca: bool,
    pub cert: X509,
    pub path: PathBuf,
}

/// The trusted certificates, indexed by id, with the openssl store built from them once.
pub struct Keystore {
    certs: BTreeMap<String, StoredCert>,
    store: X509Store,
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystore")
            .field("certs", &self.certs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keystore {
    /// Reads every regular, non-hidden file of `dir`. A missing directory is an empty
    /// keystore (a new data dir has none yet); an unreadable or corrupt file is an error that
    /// names it, because silently skipping it could drop a CA the operator relies on.
    pub fn load(dir: &Path) -> Result<Self, KeystoreError> {
        let mut files = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|source| KeystoreError::ReadDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                    let name = entry.file_name();
                    if name.to_string_lossy().starts_with('.') {
                        continue; // temp files of an atomic write in progress, editor swap files
                    }
                    let path = entry.path();
                    if !path.is_file() {
                        continue;
                    }
                    let bytes = std::fs::read(&path).map_err(|source| KeystoreError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                    files.push((path, bytes));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(KeystoreError::ReadDir {
                    path: dir.to_owned(),
                    source,
                })
            }
        }
        files.sort();
        Self::from_files(files)
    }

    /// Builds a keystore from (path, contents) pairs.
    pub fn from_files(files: Vec<(PathBuf, Vec<u8>)>) -> Result<Self, KeystoreError> {
        let mut certs = BTreeMap::new();
        for (path, bytes) in files {
            let parsed = parse_certificates(&bytes).map_err(|source| KeystoreError::Parse {
                path: path.clone(),
                source,
            })?;
            for cert in parsed {
                let info = CertInfo::of(&cert);
                certs.entry(info.id.clone()).or_insert(StoredCert {
                    info,
                    is_ca: crate::parse::is_ca(&cert),
                    cert,
                    path: path.clone(),
                });
            }
        }
        let mut builder = X509StoreBuilder::new()?;
        for stored in certs.values() {
            builder.add_cert(stored.cert.clone())?;
        }
        // Validity is checked by the chain verifier at its own "now" (so tests and replays
        // can inject a time); openssl would otherwise use the wall clock.
        builder.set_flags(X509VerifyFlags::NO_CHECK_TIME)?;
        Ok(Self {
            certs,
            store: builder.build(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Certificates ordered by id.
    pub fn certs(&self) -> impl Iterator<Item = &StoredCert> {
        self.certs.values()
    }

    pub fn get(&self, id: &str) -> Option<&StoredCert> {
        self.certs.get(id)
    }

    pub(crate) fn store(&self) -> &X509Store {
        &self.store
    }

    /// Finds the one certificate whose id starts with `prefix`.
    pub fn resolve_prefix(&self, prefix: &str) -> Result<&StoredCert, KeystoreError> {
        let prefix_norm = normalize_prefix(prefix)?;
        let mut matches = self
            .certs
            .range(prefix_norm.clone()..)
            .take_while(|(id, _)| id.starts_with(&prefix_norm));
        let first = matches
            .next()
            .ok_or_else(|| KeystoreError::NoMatch(prefix.to_owned()))?;
        let rest: Vec<_> = matches.collect();
        if rest.is_empty() {
            Ok(first.1)
        } else {
            let candidates = std::iter::once(first)
                .chain(rest)
                .map(|(id, c)| format!("{} ({})", &id[..16], c.info.short_name()))
                .collect();
            Err(KeystoreError::Ambiguous {
                prefix: prefix.to_owned(),
                candidates,
            })
        }
    }

    /// Refuses a certificate that is not valid at `now`.
    pub fn check_validity(cert: &X509, now: DateTime<Utc>) -> Result<(), KeystoreError> {
        let info = CertInfo::of(cert);
        if now > info.not_after {
            return Err(KeystoreError::Expired {
                subject: info.subject,
                not_after: info.not_after,
            });
        }
        if now < info.not_before {
            return Err(KeystoreError::NotYetValid {
                subject: info.subject,
                not_before: info.not_before,
            });
        }
        Ok(())
    }
}

/// Ids are lowercase hex; accept upper case input but nothing that is not hex.
pub fn normalize_prefix(prefix: &str) -> Result<String, KeystoreError> {
    let p = prefix.trim().to_ascii_lowercase();
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeystoreError::BadPrefix(prefix.to_owned()));
    }
    Ok(p)
}

/// The file name `keystore add` gives a certificate.
pub fn file_name_for(cert: &X509) -> String {
    format!("{}.pem", cert_id(cert))
}
