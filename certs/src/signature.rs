//! Manifest signatures: the requestor signs the manifest's base64 text with the app
//! author's key (`openssl dgst -sha256 -sign author.key manifest.json.base64`).

use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKeyRef, Public};
use openssl::sign::Verifier;

use crate::usage::UsageError;

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signature algorithm `{0}` is not supported; use sha256, sha384 or sha512")]
    UnsupportedAlgorithm(String),
    #[error("the signing certificate has a {0} key; only RSA and ECDSA keys are supported")]
    UnsupportedKey(String),
    #[error("the signature does not match the manifest and the signing certificate's key")]
    Invalid,
    /// The signing certificate is not meant for signing (see [`crate::check_signer_usage`]).
    #[error(transparent)]
    CertUsage(#[from] UsageError),
}

/// Digest used with the author's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl SignatureAlgorithm {
    /// Accepts yagna's names (`sha256`, …), case-insensitively.
    pub fn parse(name: &str) -> Result<Self, SignatureError> {
        match name.to_ascii_lowercase().as_str() {
            "sha256" => Ok(Self::Sha256),
            "sha384" => Ok(Self::Sha384),
            "sha512" => Ok(Self::Sha512),
            _ => Err(SignatureError::UnsupportedAlgorithm(name.to_owned())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha384 => "sha384",
            Self::Sha512 => "sha512",
        }
    }

    fn digest(self) -> MessageDigest {
        match self {
            Self::Sha256 => MessageDigest::sha256(),
            Self::Sha384 => MessageDigest::sha384(),
            Self::Sha512 => MessageDigest::sha512(),
        }
    }
}

/// Verifies `signature` (raw bytes: PKCS#1 v1.5 for RSA, DER for ECDSA) over `data` with a
/// bare key. A manifest signature is checked with [`crate::VerifiedChain::verify_signature`],
/// which also checks that the leaf certificate may sign.
pub fn verify_signature(
    key: &PKeyRef<Public>,
    algorithm: SignatureAlgorithm,
    data: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    match key.id() {
        Id::RSA | Id::EC => {}
        other => return Err(SignatureError::UnsupportedKey(format!("{other:?}"))),
    }
    let mut verifier =
        Verifier::new(algorithm.digest(), key).map_err(|_| SignatureError::Invalid)?;
    // A malformed signature makes openssl return an error rather than `false`; both mean
    // the same to the requestor.
    match verifier.verify_oneshot(signature, data) {
        Ok(true) => Ok(()),
        _ => Err(SignatureError::Invalid),
    }
}
