//! Chain verification against the keystore, with a cache of chains already verified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use openssl::pkey::{PKey, Public};
use openssl::stack::Stack;
use openssl::x509::{X509StoreContext, X509};

use crate::keystore::Keystore;
use crate::parse::{common_name, parse_certificates, CertInfo, ParseError};
use crate::signature::{SignatureAlgorithm, SignatureError};
use crate::usage::{check_signer_usage, UsageError};

/// Cached chains are small (a few KiB of PEM as key); past this many the cache starts over,
/// which bounds memory against a requestor that sends a new chain with every demand.
const CACHE_CAPACITY: usize = 4096;

/// Why a certificate chain is not trusted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ChainError {
    #[error("certificate chain: {0}")]
    Parse(String),
    #[error(
        "certificate chain has no end-entity certificate (every certificate issued another one)"
    )]
    NoLeaf,
    #[error("certificate chain has several end-entity certificates ({}); send one author certificate and its intermediates", .0.join(", "))]
    SeveralLeaves(Vec<String>),
    #[error("certificate `{subject}` does not lead to a CA in the provider's keystore: {reason}")]
    Untrusted { subject: String, reason: String },
    #[error("certificate `{subject}` expired at {not_after}")]
    Expired {
        subject: String,
        not_after: DateTime<Utc>,
    },
    #[error("certificate `{subject}` is not valid before {not_before}")]
    NotYetValid {
        subject: String,
        not_before: DateTime<Utc>,
    },
}

impl From<ParseError> for ChainError {
    fn from(e: ParseError) -> Self {
        Self::Parse(e.to_string())
    }
}

/// A chain that openssl accepted: certificates from the leaf to the keystore root.
#[derive(Debug)]
pub struct VerifiedChain {
    /// Leaf first, trust anchor last.
    pub certs: Vec<CertInfo>,
    /// Only [`VerifiedChain::verify_signature`] uses it, so no caller can check a
    /// signature without the leaf's key usage.
    pub(crate) leaf_key: PKey<Public>,
    /// Whether the leaf's key usage extensions allow signing manifests; decided once, when
    /// the chain is built (the answer cannot change while the chain is cached).
    signer_usage: Result<(), UsageError>,
}

impl VerifiedChain {
    /// Verifies the manifest signature with the leaf's key. The leaf must be meant for
    /// signing (keyUsage with digitalSignature and extendedKeyUsage with codeSigning or
    /// anyExtendedKeyUsage, where present): a key certified for something else, such as a
    /// TLS server or key agreement, does not vouch for a manifest even when the signature
    /// is mathematically valid. The usage is checked first, because a new certificate
    /// means a new key and a new signature anyway.
    pub fn verify_signature(
        &self,
        algorithm: SignatureAlgorithm,
        data: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        self.signer_usage
            .clone()
            .map_err(SignatureError::CertUsage)?;
        crate::signature::verify_signature(&self.leaf_key, algorithm, data, signature)
    }

    /// Every certificate of the path must be valid at `now`; the first one that is not is
    /// named (leaf first, so the requestor learns about its own certificate before a CA's).
    pub fn check_time(&self, now: DateTime<Utc>) -> Result<(), ChainError> {
        for c in &self.certs {
            if now > c.not_after {
                return Err(ChainError::Expired {
                    subject: c.subject.clone(),
                    not_after: c.not_after,
                });
            }
            if now < c.not_before {
                return Err(ChainError::NotYetValid {
                    subject: c.subject.clone(),
                    not_before: c.not_before,
                });
            }
        }
        Ok(())
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.certs.iter().map(|c| c.id.as_str())
    }
}

/// Verifies requestor chains against one keystore snapshot. A new keystore means a new
/// verifier, so the cache can never outlive a removed CA.
pub struct ChainVerifier {
    keystore: Arc<Keystore>,
    cache: Mutex<HashMap<Box<[u8]>, Arc<VerifiedChain>>>,
}

impl ChainVerifier {
    pub fn new(keystore: Arc<Keystore>) -> Self {
        Self {
            keystore,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn keystore(&self) -> &Arc<Keystore> {
        &self.keystore
    }

    /// Verifies a chain (PEM bytes as the requestor sent them: leaf and intermediates in any
    /// order) and checks validity at `now`. A chain seen before is looked up by its exact
    /// bytes, so a repeat demand costs no parsing and no path building.
    pub fn verify(
        &self,
        chain_pem: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Arc<VerifiedChain>, ChainError> {
        let cached = self.lock_cache().get(chain_pem).cloned();
        let chain = match cached {
            Some(chain) => chain,
            None => {
                let chain = Arc::new(self.build(chain_pem)?);
                let mut cache = self.lock_cache();
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(chain_pem.into(), chain.clone());
                chain
            }
        };
        chain.check_time(now)?;
        Ok(chain)
    }

    /// Forgets every verified chain.
    pub fn clear_cache(&self) {
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, Arc<VerifiedChain>>> {
        // The cache holds only verified results; a panic elsewhere cannot leave it
        // inconsistent, so a poisoned lock is still safe to use.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn build(&self, chain_pem: &[u8]) -> Result<VerifiedChain, ChainError> {
        let certs = parse_certificates(chain_pem)?;
        let leaf_index = find_leaf(&certs)?;
        let leaf = &certs[leaf_index];
        let mut untrusted = Stack::new().map_err(openssl_untrusted(leaf))?;
        for (i, c) in certs.iter().enumerate() {
            if i != leaf_index {
                untrusted.push(c.clone()).map_err(openssl_untrusted(leaf))?;
            }
        }
        let mut ctx = X509StoreContext::new().map_err(openssl_untrusted(leaf))?;
        let outcome = ctx
            .init(self.keystore.store(), leaf, &untrusted, |c| {
                let ok = c.verify_cert()?;
                if !ok {
                    let failing = c
                        .current_cert()
                        .map(common_name)
                        .unwrap_or_else(|| common_name(leaf));
                    return Ok(Err((failing, c.error().error_string().to_owned())));
                }
                let path: Vec<CertInfo> = c
                    .chain()
                    .map(|s| s.iter().map(CertInfo::of).collect())
                    .unwrap_or_default();
                Ok(Ok(path))
            })
            .map_err(openssl_untrusted(leaf))?;
        match outcome {
            Ok(path) if !path.is_empty() => Ok(VerifiedChain {
                certs: path,
                leaf_key: leaf.public_key().map_err(openssl_untrusted(leaf))?,
                signer_usage: check_signer_usage(leaf),
            }),
            Ok(_) => Err(ChainError::Untrusted {
                subject: common_name(leaf),
                reason: "openssl returned an empty path".into(),
            }),
            Err((subject, reason)) => Err(ChainError::Untrusted { subject, reason }),
        }
    }
}

fn openssl_untrusted(leaf: &X509) -> impl Fn(openssl::error::ErrorStack) -> ChainError + '_ {
    move |e| ChainError::Untrusted {
        subject: common_name(leaf),
        reason: crate::parse::first_openssl_reason(&e),
    }
}

/// The leaf is the one certificate whose subject is no other certificate's issuer;
/// requestors send chains in either order (yagna's own chain file lists the intermediate
/// first). Names only: whether an issuer may sign certificates at all is openssl's call
/// during path building, with an error the requestor can act on.
fn find_leaf(certs: &[X509]) -> Result<usize, ChainError> {
    if certs.is_empty() {
        return Err(ChainError::Parse(ParseError::Empty.to_string()));
    }
    let leaves: Vec<usize> = (0..certs.len())
        .filter(|&i| {
            !certs.iter().enumerate().any(|(j, other)| {
                j != i
                    && other
                        .issuer_name()
                        .try_cmp(certs[i].subject_name())
                        .is_ok_and(|o| o.is_eq())
            })
        })
        .collect();
    match leaves.as_slice() {
        [one] => Ok(*one),
        [] => Err(ChainError::NoLeaf),
        many => Err(ChainError::SeveralLeaves(
            many.iter().map(|&i| common_name(&certs[i])).collect(),
        )),
    }
}
