//! X.509 keystore, certificate chains and manifest signatures.
//!
//! The provider trusts app authors through certificate authorities its operator put in the
//! keystore (a directory of PEM or DER files). A requestor sends the author's certificate
//! chain with the demand; [`ChainVerifier`] builds a path from the chain's leaf to a
//! keystore root with openssl, checks every certificate's validity at an injectable "now",
//! and [`VerifiedChain::verify_signature`] checks the manifest signature with the leaf's
//! public key once the leaf's key usage says it may sign.
//!
//! [`golem`] verifies Golem's JSON certificates and node descriptors, the credentials of
//! the `partner` outbound rule; the keystore holds both kinds.
#![forbid(unsafe_code)]

mod chain;
pub mod golem;
#[cfg(test)]
mod golem_tests;
mod keystore;
mod parse;
mod signature;
#[cfg(any(test, feature = "test-pki"))]
pub mod testpki;
#[cfg(test)]
mod tests;
mod usage;

pub use chain::{ChainError, ChainVerifier, VerifiedChain};
pub use keystore::{
    file_name_for, golem_file_name_for, normalize_prefix, Entry, Keystore, KeystoreError,
    StoredCert, StoredGolemCert,
};
pub use parse::{cert_id, is_ca, parse_certificates, CertInfo, ParseError};
pub use signature::{verify_signature, SignatureAlgorithm, SignatureError};
pub use usage::{check_signer_usage, UsageError, UsageProblem};
