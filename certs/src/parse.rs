//! Reading certificates from PEM (one or many) or DER bytes, and naming them.

use chrono::{DateTime, Utc};
use openssl::asn1::Asn1TimeRef;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::x509::{X509NameRef, X509Ref, X509};
use serde::Serialize;

const PEM_BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// Why bytes could not be read as certificates.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error(
        "no certificate found (expected PEM `{}` blocks or one DER certificate)",
        String::from_utf8_lossy(PEM_BEGIN)
    )]
    Empty,
    #[error("PEM certificate #{index} is truncated or corrupt: {detail}")]
    BadPem { index: usize, detail: String },
    #[error("not a PEM or DER certificate: {0}")]
    BadDer(String),
}

/// Certificate id: lowercase hex SHA-512 of the DER encoding (yagna's fingerprint).
pub fn cert_id(cert: &X509Ref) -> String {
    let digest = cert
        .digest(MessageDigest::sha512())
        .expect("SHA-512 over a parsed certificate cannot fail");
    hex(&digest)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// Parses every certificate in `bytes`: a PEM file with one or more `CERTIFICATE` blocks
/// (any other PEM blocks, such as keys, are skipped), or a single DER certificate.
///
/// Every `BEGIN CERTIFICATE` marker must yield a certificate: openssl's stack reader stops
/// quietly at the first damaged block, which would turn a truncated chain file into a
/// shorter chain instead of an error.
pub fn parse_certificates(bytes: &[u8]) -> Result<Vec<X509>, ParseError> {
    if bytes.windows(PEM_BEGIN.len()).any(|w| w == PEM_BEGIN) {
        let mut certs = Vec::new();
        let mut rest = bytes;
        while let Some(start) = find(rest, PEM_BEGIN) {
            let block = &rest[start..];
            let index = certs.len() + 1;
            let end_marker = b"-----END CERTIFICATE-----";
            let end = find(block, end_marker).ok_or_else(|| ParseError::BadPem {
                index,
                detail: "no `-----END CERTIFICATE-----` line".into(),
            })? + end_marker.len();
            let cert = X509::from_pem(&block[..end]).map_err(|e| ParseError::BadPem {
                index,
                detail: first_openssl_reason(&e),
            })?;
            certs.push(cert);
            rest = &block[end..];
        }
        Ok(certs)
    } else {
        let trimmed = bytes.iter().all(|b| b.is_ascii_whitespace());
        if trimmed {
            return Err(ParseError::Empty);
        }
        X509::from_der(bytes)
            .map(|c| vec![c])
            .map_err(|e| ParseError::BadDer(first_openssl_reason(&e)))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub(crate) fn first_openssl_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|e| e.reason().map(str::to_owned))
        .unwrap_or_else(|| e.to_string())
}

/// What the CLI and verdicts show about a certificate.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertInfo {
    pub id: String,
    pub subject: String,
    pub issuer: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl CertInfo {
    pub fn of(cert: &X509Ref) -> Self {
        Self {
            id: cert_id(cert),
            subject: name_to_string(cert.subject_name()),
            issuer: name_to_string(cert.issuer_name()),
            // A time openssl cannot read (it parses the field, but not e.g. month 13)
            // makes the certificate never valid: not yet valid, and already expired.
            not_before: asn1_to_chrono(cert.not_before()).unwrap_or(DateTime::<Utc>::MAX_UTC),
            not_after: asn1_to_chrono(cert.not_after()).unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }

    /// The subject's common name, or the whole subject when it has none.
    pub fn short_name(&self) -> &str {
        self.subject
            .split(", ")
            .find_map(|part| part.strip_prefix("CN="))
            .unwrap_or(&self.subject)
    }
}

/// One-line `CN=…, O=…` rendering of a distinguished name.
pub(crate) fn name_to_string(name: &X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the certificate says it is a CA. For display only: the real CA decision is
/// openssl's during path building.
pub fn is_ca(cert: &X509Ref) -> bool {
    // rust-openssl exposes no basicConstraints accessor, and rendering the text form is
    // slow (it is kept out of chain verification for that reason).
    cert.to_text()
        .map(|t| String::from_utf8_lossy(&t).contains("CA:TRUE"))
        .unwrap_or(false)
}

/// Converts an ASN.1 time to chrono by measuring its distance from the epoch; `None` when
/// the time is malformed (a certificate from a stranger may carry any bytes there).
pub(crate) fn asn1_to_chrono(t: &Asn1TimeRef) -> Option<DateTime<Utc>> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).expect("epoch is representable");
    let diff = epoch.diff(t).ok()?;
    Some(
        DateTime::<Utc>::from_timestamp(i64::from(diff.days) * 86_400 + i64::from(diff.secs), 0)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

/// The common name, for messages.
pub(crate) fn common_name(cert: &X509Ref) -> String {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .unwrap_or_else(|| name_to_string(cert.subject_name()))
}
