//! The operator's keystore: a directory of trusted certificates (`cert-dir/`).
//!
//! Every regular file in the directory is read as a Golem certificate when its content is a
//! JSON object with `certificate` (the partner rule's credentials), otherwise as PEM (one
//! or many X.509 certificates) or DER. `provider keystore add` writes one file per
//! certificate, named by its id (`<id>.pem`, `<id>.signed.json`), but operators may also
//! drop files in by hand; both are read the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::X509;

use crate::golem::{GolemError, SignedCertificate};
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
    #[error("{path}: {source}")]
    Golem {
        path: PathBuf,
        // Boxed: its chain-check variants are large and this error is returned often.
        source: Box<GolemError>,
    },
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

/// A Golem certificate held by the keystore. `info.subject` is its display name and
/// `info.issuer` its signer's (its own when self-signed).
#[derive(Debug, Clone)]
pub struct StoredGolemCert {
    pub info: CertInfo,
    /// Whether its key usage lets it sign certificates or node descriptors.
    pub is_ca: bool,
    pub cert: SignedCertificate,
    pub path: PathBuf,
}

impl StoredGolemCert {
    fn new(cert: SignedCertificate, path: PathBuf) -> Self {
        let c = &cert.certificate;
        let info = CertInfo {
            id: c.id.clone(),
            subject: c.display_name.clone(),
            issuer: cert.signer.as_ref().map_or_else(
                || c.display_name.clone(),
                |s| s.certificate.display_name.clone(),
            ),
            not_before: c.validity.not_before,
            not_after: c.validity.not_after,
        };
        let is_ca = c.key_usage.allows(crate::golem::Usage::SignCertificate)
            || c.key_usage.allows(crate::golem::Usage::SignNode);
        Self {
            info,
            is_ca,
            cert,
            path,
        }
    }
}

/// One keystore entry of either kind.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    X509(&'a StoredCert),
    Golem(&'a StoredGolemCert),
}

impl<'a> Entry<'a> {
    pub fn info(&self) -> &'a CertInfo {
        match self {
            Entry::X509(c) => &c.info,
            Entry::Golem(c) => &c.info,
        }
    }

    pub fn path(&self) -> &'a Path {
        match self {
            Entry::X509(c) => &c.path,
            Entry::Golem(c) => &c.path,
        }
    }

    pub fn is_ca(&self) -> bool {
        match self {
            Entry::X509(c) => c.is_ca,
            Entry::Golem(c) => c.is_ca,
        }
    }

    /// `x509` or `golem`, as `keystore list` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Entry::X509(_) => "x509",
            Entry::Golem(_) => "golem",
        }
    }
}

/// The trusted certificates, indexed by id, with the openssl store built from them once.
pub struct Keystore {
    certs: BTreeMap<String, StoredCert>,
    golem: BTreeMap<String, StoredGolemCert>,
    store: X509Store,
}

impl std::fmt::Debug for Keystore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keystore")
            .field("certs", &self.certs.keys().collect::<Vec<_>>())
            .field("golem", &self.golem.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keystore {
    /// Reads every regular, non-hidden file of `dir`: hidden files, such as the temps of
    /// atomic writes, are skipped (the writer that next takes the data dir's lock removes
    /// stale ones). A missing directory is an empty keystore (a new data dir has none yet);
    /// an unreadable or corrupt file is an error that names it, because silently skipping it
    /// could drop a CA the operator relies on.
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
                        // Temp files of an atomic write in progress or of a writer killed
                        // before its rename (`.<name>.tmp.<pid>`, even when complete),
                        // editor swap files: never certificates.
                        continue;
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
        let mut golem = BTreeMap::new();
        for (path, bytes) in files {
            if crate::golem::is_golem_certificate(&bytes) {
                // Parsed, not verified: a stored certificate may expire; the partner rule
                // verifies the chain a requestor sends at the time of the demand.
                let cert = SignedCertificate::from_json(&bytes).map_err(|source| {
                    KeystoreError::Golem {
                        path: path.clone(),
                        source: Box::new(source),
                    }
                })?;
                let stored = StoredGolemCert::new(cert, path);
                golem.entry(stored.info.id.clone()).or_insert(stored);
                continue;
            }
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
            golem,
            store: builder.build(),
        })
    }

    /// No certificate of either kind.
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty() && self.golem.is_empty()
    }

    /// Certificates of both kinds.
    pub fn len(&self) -> usize {
        self.certs.len() + self.golem.len()
    }

    /// X.509 certificates ordered by id.
    pub fn certs(&self) -> impl Iterator<Item = &StoredCert> {
        self.certs.values()
    }

    pub fn get(&self, id: &str) -> Option<&StoredCert> {
        self.certs.get(id)
    }

    /// Golem certificates ordered by id.
    pub fn golem_certs(&self) -> impl Iterator<Item = &StoredGolemCert> {
        self.golem.values()
    }

    pub fn get_golem(&self, id: &str) -> Option<&StoredGolemCert> {
        self.golem.get(id)
    }

    /// Every certificate of both kinds, ordered by id.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        let mut all: Vec<Entry<'_>> = self
            .certs
            .values()
            .map(Entry::X509)
            .chain(self.golem.values().map(Entry::Golem))
            .collect();
        all.sort_by(|a, b| a.info().id.cmp(&b.info().id));
        all
    }

    /// Finds the one Golem certificate whose id starts with `prefix`.
    pub fn resolve_golem_prefix(&self, prefix: &str) -> Result<&StoredGolemCert, KeystoreError> {
        let norm = normalize_prefix(prefix)?;
        let found = one_match(
            prefix,
            self.golem
                .range(norm.clone()..)
                .take_while(|(id, _)| id.starts_with(&norm))
                .map(|(id, c)| (id.as_str(), c.info.short_name(), c)),
        )?;
        Ok(found)
    }

    /// Finds the one certificate of either kind whose id starts with `prefix`.
    pub fn resolve_any_prefix(&self, prefix: &str) -> Result<Entry<'_>, KeystoreError> {
        let norm = normalize_prefix(prefix)?;
        let entries = self.entries();
        one_match(
            prefix,
            entries
                .iter()
                .filter(|e| e.info().id.starts_with(&norm))
                .map(|e| (e.info().id.as_str(), e.info().short_name(), *e)),
        )
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

/// The one candidate, or the error naming none or all of them.
fn one_match<'a, T>(
    prefix: &str,
    mut matches: impl Iterator<Item = (&'a str, &'a str, T)>,
) -> Result<T, KeystoreError> {
    let (first_id, first_name, first) = matches
        .next()
        .ok_or_else(|| KeystoreError::NoMatch(prefix.to_owned()))?;
    let rest: Vec<_> = matches.collect();
    if rest.is_empty() {
        return Ok(first);
    }
    let candidates = std::iter::once((first_id, first_name))
        .chain(rest.iter().map(|(id, name, _)| (*id, *name)))
        .map(|(id, name)| format!("{} ({name})", &id[..16]))
        .collect();
    Err(KeystoreError::Ambiguous {
        prefix: prefix.to_owned(),
        candidates,
    })
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

/// The file name `keystore add` gives a Golem certificate.
pub fn golem_file_name_for(cert: &SignedCertificate) -> String {
    format!("{}.signed.json", cert.certificate.id)
}
