//! Whether a certificate's key may sign manifests, by its key usage extensions.
//!
//! A certificate restricts what its key is for with `keyUsage` (what kind of operation) and
//! `extendedKeyUsage` (what application). openssl's path building does not look at the
//! leaf's purposes unless told one, and no purpose of openssl's matches "signs a
//! manifest", so the rule is ours:
//!
//! - a `keyUsage` extension must include `digitalSignature`;
//! - an `extendedKeyUsage` extension must include `codeSigning` or `anyExtendedKeyUsage`;
//!   one that lists only other purposes, known or not, is refused (a TLS server
//!   certificate is not an author's signing certificate);
//! - a certificate without either extension may be used for anything, as X.509 says.

use std::fmt;

use openssl::x509::{X509ExtendedKeyUsage, X509KeyUsage, X509Ref};

use crate::parse::common_name;

/// The leaf whose key verifies the manifest signature is not meant for signing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate `{subject}` may not sign manifests: {problem}")]
pub struct UsageError {
    /// The certificate's common name (or whole subject when it has none).
    pub subject: String,
    pub problem: UsageProblem,
}

/// What the certificate's extensions lack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageProblem {
    /// `keyUsage` is present without `digitalSignature`; the values it has, by their
    /// RFC 5280 names (empty when it has none, or when openssl could not read the
    /// certificate's extensions).
    KeyUsage(Vec<&'static str>),
    /// `extendedKeyUsage` is present with neither `codeSigning` nor `anyExtendedKeyUsage`;
    /// the purposes openssl recognised in it (others are not visible).
    ExtendedKeyUsage(Vec<&'static str>),
}

impl fmt::Display for UsageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageProblem::KeyUsage(has) => write!(
                f,
                "its keyUsage lacks digitalSignature (it has {}); issue the author a leaf certificate with keyUsage digitalSignature",
                listed(has)
            ),
            UsageProblem::ExtendedKeyUsage(has) => write!(
                f,
                "its extendedKeyUsage lacks codeSigning (it has {}); issue the author a leaf certificate with extendedKeyUsage codeSigning, or without extendedKeyUsage",
                if has.is_empty() {
                    "only purposes other than codeSigning and anyExtendedKeyUsage".to_owned()
                } else {
                    listed(has)
                }
            ),
        }
    }
}

fn listed(values: &[&str]) -> String {
    if values.is_empty() {
        "none".to_owned()
    } else {
        values.join(", ")
    }
}

const KEY_USAGE_NAMES: [(X509KeyUsage, &str); 9] = [
    (X509KeyUsage::DIGITAL_SIGNATURE, "digitalSignature"),
    (X509KeyUsage::NON_REPUDIATION, "nonRepudiation"),
    (X509KeyUsage::KEY_ENCIPHERMENT, "keyEncipherment"),
    (X509KeyUsage::DATA_ENCIPHERMENT, "dataEncipherment"),
    (X509KeyUsage::KEY_AGREEMENT, "keyAgreement"),
    (X509KeyUsage::KEY_CERT_SIGN, "keyCertSign"),
    (X509KeyUsage::CRL_SIGN, "cRLSign"),
    (X509KeyUsage::ENCIPHER_ONLY, "encipherOnly"),
    (X509KeyUsage::DECIPHER_ONLY, "decipherOnly"),
];

const EXTENDED_KEY_USAGE_NAMES: [(X509ExtendedKeyUsage, &str); 9] = [
    (X509ExtendedKeyUsage::SSL_SERVER, "serverAuth"),
    (X509ExtendedKeyUsage::SSL_CLIENT, "clientAuth"),
    (X509ExtendedKeyUsage::SMIME, "emailProtection"),
    (X509ExtendedKeyUsage::CODE_SIGN, "codeSigning"),
    (X509ExtendedKeyUsage::SGC, "serverGatedCrypto"),
    (X509ExtendedKeyUsage::OCSP_SIGN, "OCSPSigning"),
    (X509ExtendedKeyUsage::TIMESTAMP, "timeStamping"),
    (X509ExtendedKeyUsage::DVCS, "DVCS"),
    (X509ExtendedKeyUsage::ANYEKU, "anyExtendedKeyUsage"),
];

/// Whether `cert`'s key may sign a manifest (see the module documentation for the rule).
/// keyUsage is checked first: it says whether the key may sign at all.
pub fn check_signer_usage(cert: &X509Ref) -> Result<(), UsageError> {
    let refuse = |problem| UsageError {
        subject: common_name(cert),
        problem,
    };
    // openssl reports an extension it could not decode as present and empty, which this
    // refuses: fail closed.
    if let Some(ku) = cert.key_usage() {
        if !ku.contains(X509KeyUsage::DIGITAL_SIGNATURE) {
            let has = KEY_USAGE_NAMES
                .iter()
                .filter(|(f, _)| ku.contains(*f))
                .map(|(_, n)| *n)
                .collect();
            return Err(refuse(UsageProblem::KeyUsage(has)));
        }
    }
    if let Some(eku) = cert.extended_key_usage() {
        if !eku.intersects(X509ExtendedKeyUsage::CODE_SIGN | X509ExtendedKeyUsage::ANYEKU) {
            let has = EXTENDED_KEY_USAGE_NAMES
                .iter()
                .filter(|(f, _)| eku.contains(*f))
                .map(|(_, n)| *n)
                .collect();
            return Err(refuse(UsageProblem::ExtendedKeyUsage(has)));
        }
    }
    Ok(())
}
