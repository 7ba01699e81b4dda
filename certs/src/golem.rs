//! Golem certificates and node descriptors (the `partner` outbound rule's credentials).
//!
//! A Golem certificate is JSON, not X.509:
//!
//! ```json
//! { "$schema": "…/certificate.schema.json",
//!   "certificate": { "validityPeriod": {"notBefore", "notAfter"}, "keyUsage": "all" | ["signCertificate", "signNode", …],
//!                    "permissions": "all" | {"outbound": "unrestricted" | {"urls": […]}} | {},
//!                    "subject": {"displayName", "contact": {"email"}},
//!                    "publicKey": {"algorithm": "EdDSA", "key": "<hex>", "parameters": {"scheme": "Ed25519"}} },
//!   "signature": { "algorithm": {"hash": "sha512", "encryption": "EdDSA"}, "value": "<hex>",
//!                  "signer": "self" | <the parent signed certificate> } }
//! ```
//!
//! A node descriptor has the same shape with `nodeDescriptor` (`nodeId`, `permissions`,
//! `validityPeriod`) in place of `certificate`; its signer is always a certificate. Every
//! signature is plain Ed25519 over the canonical JSON (RFC 8785: sorted keys, no
//! whitespace) of the signed object, and a certificate's id is the lowercase hex SHA-512 of
//! that same canonical JSON, which is how yagna's `rules.json` names partner certificates.
//!
//! Verification walks the embedded chain from the self-signed root down: each signature
//! with the signer's key, the signer's key usage, the child's permissions within the
//! signer's and its validity period within the signer's; then every period must contain
//! "now" (injectable, so tests and replays are deterministic), and a descriptor's `nodeId`
//! must be the requestor's.

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Utc};
use openssl::hash::{hash, MessageDigest};
use openssl::pkey::{Id, PKey};
use openssl::sign::Verifier;
use serde_json::{Map, Value};
use url::Url;

use crate::parse::hex;

/// Why a Golem certificate or node descriptor was not accepted. Every variant names the
/// document it is about (`certificate `Example root cert``, `node descriptor for 0x…`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GolemError {
    #[error("{what}: {detail}")]
    Malformed { what: String, detail: String },
    #[error("{subject}: {detail}; only EdDSA (Ed25519) with sha512 is supported")]
    UnsupportedAlgorithm { subject: String, detail: String },
    #[error("the signature of {subject} does not verify with the key of certificate `{signer}`")]
    SignatureInvalid { subject: String, signer: String },
    #[error("{subject} expired at {not_after}")]
    Expired {
        subject: String,
        not_after: DateTime<Utc>,
    },
    #[error("{subject} is not valid before {not_before}")]
    NotYetValid {
        subject: String,
        not_before: DateTime<Utc>,
    },
    #[error("{subject} is valid {child}, outside its signer `{signer}` ({parent})")]
    ValidityNotNested {
        subject: String,
        signer: String,
        child: ValidityPeriod,
        parent: ValidityPeriod,
    },
    #[error("{subject} has permissions {child}, beyond those of its signer `{signer}` ({parent})")]
    PermissionsExceeded {
        subject: String,
        signer: String,
        child: Permissions,
        parent: Permissions,
    },
    #[error("certificate `{signer}` may not sign {subject}: its keyUsage has neither `all` nor `{needed}`")]
    KeyUsage {
        subject: String,
        signer: String,
        needed: &'static str,
    },
    #[error("the node descriptor is for node {descriptor}, not for the requestor {requestor}")]
    NodeMismatch {
        descriptor: String,
        requestor: String,
    },
}

/// A validity period; both ends are inclusive, as in X.509.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityPeriod {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl ValidityPeriod {
    fn contains_period(&self, inner: &ValidityPeriod) -> bool {
        self.not_before <= inner.not_before && inner.not_after <= self.not_after
    }

    fn check(&self, subject: &str, now: DateTime<Utc>) -> Result<(), GolemError> {
        if now > self.not_after {
            return Err(GolemError::Expired {
                subject: subject.to_owned(),
                not_after: self.not_after,
            });
        }
        if now < self.not_before {
            return Err(GolemError::NotYetValid {
                subject: subject.to_owned(),
                not_before: self.not_before,
            });
        }
        Ok(())
    }
}

impl fmt::Display for ValidityPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.not_before, self.not_after)
    }
}

/// What a key may sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Usage {
    SignCertificate,
    SignManifest,
    SignNode,
}

impl Usage {
    pub fn as_str(self) -> &'static str {
        match self {
            Usage::SignCertificate => "signCertificate",
            Usage::SignManifest => "signManifest",
            Usage::SignNode => "signNode",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUsage {
    All,
    Only(Vec<Usage>),
}

impl KeyUsage {
    pub fn allows(&self, usage: Usage) -> bool {
        match self {
            KeyUsage::All => true,
            KeyUsage::Only(list) => list.contains(&usage),
        }
    }
}

/// The outbound part of a permission set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundPermission {
    /// Any URL.
    Unrestricted,
    /// These URLs (parsed, so `HTTPS://Domain.com` and `https://domain.com/` are one URL).
    Urls(Vec<Url>),
}

/// Permissions of a certificate or node descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    /// Everything, including permissions Golem may define later.
    All,
    /// Only what is listed; `outbound: None` (the JSON `{}`) grants nothing.
    Listed {
        outbound: Option<OutboundPermission>,
    },
}

impl Permissions {
    /// Whether `self` grants at least everything `other` does: `all` covers everything;
    /// outbound `unrestricted` covers `unrestricted` and any URL list; a URL list covers a
    /// URL list whose every URL it contains; nothing covers more than nothing.
    pub fn covers(&self, other: &Permissions) -> bool {
        match (self, other) {
            (Permissions::All, _) => true,
            (Permissions::Listed { .. }, Permissions::All) => false,
            (Permissions::Listed { outbound: mine }, Permissions::Listed { outbound: theirs }) => {
                match (mine, theirs) {
                    (_, None) => true,
                    (None, Some(_)) => false,
                    (Some(OutboundPermission::Unrestricted), Some(_)) => true,
                    (Some(OutboundPermission::Urls(_)), Some(OutboundPermission::Unrestricted)) => {
                        false
                    }
                    (Some(OutboundPermission::Urls(a)), Some(OutboundPermission::Urls(b))) => {
                        b.iter().all(|u| a.contains(u))
                    }
                }
            }
        }
    }

    /// The outbound traffic granted: `all` grants any URL.
    pub fn outbound(&self) -> Option<&OutboundPermission> {
        match self {
            Permissions::All => Some(&OutboundPermission::Unrestricted),
            Permissions::Listed { outbound } => outbound.as_ref(),
        }
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permissions::All => f.write_str("all"),
            Permissions::Listed { outbound: None } => f.write_str("none"),
            Permissions::Listed {
                outbound: Some(OutboundPermission::Unrestricted),
            } => f.write_str("outbound unrestricted"),
            Permissions::Listed {
                outbound: Some(OutboundPermission::Urls(urls)),
            } => {
                let list: Vec<&str> = urls.iter().map(Url::as_str).collect();
                write!(f, "outbound to {}", list.join(", "))
            }
        }
    }
}

/// The `certificate` object of a signed Golem certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Lowercase hex SHA-512 of the canonical JSON of the `certificate` object.
    pub id: String,
    pub display_name: String,
    pub email: Option<String>,
    pub validity: ValidityPeriod,
    pub key_usage: KeyUsage,
    pub permissions: Permissions,
    pub public_key: [u8; 32],
}

impl Certificate {
    fn subject(&self) -> String {
        format!("certificate `{}`", self.display_name)
    }
}

/// An Ed25519 signature and the canonical bytes it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    value: [u8; 64],
    signed_bytes: Vec<u8>,
}

/// A Golem certificate with its signature and, unless self-signed, its signer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCertificate {
    pub certificate: Certificate,
    signature: Signature,
    /// `None` for a self-signed root.
    pub signer: Option<Box<SignedCertificate>>,
}

/// A node descriptor: permissions granted to one node, signed by a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDescriptor {
    pub node_id: String,
    pub permissions: Permissions,
    pub validity: ValidityPeriod,
    signature: Signature,
    pub signer: SignedCertificate,
}

/// Whether `bytes` look like a Golem signed certificate (a JSON object with `certificate`),
/// as opposed to PEM or DER. Says nothing about validity.
pub fn is_golem_certificate(bytes: &[u8]) -> bool {
    top_level_keys(bytes).is_some_and(|m| m.contains_key("certificate"))
}

/// Whether `bytes` look like a node descriptor (a JSON object with `nodeDescriptor`).
pub fn is_node_descriptor(bytes: &[u8]) -> bool {
    top_level_keys(bytes).is_some_and(|m| m.contains_key("nodeDescriptor"))
}

fn top_level_keys(bytes: &[u8]) -> Option<Map<String, Value>> {
    // Cheap pre-check so PEM and DER files are not run through the JSON parser.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The id of a Golem certificate: lowercase hex SHA-512 of the canonical JSON of its
/// `certificate` object.
pub fn certificate_id(certificate: &Value) -> Result<String, GolemError> {
    let canonical = canonical_json(certificate).map_err(|detail| GolemError::Malformed {
        what: "certificate".into(),
        detail,
    })?;
    Ok(sha512_hex(canonical.as_bytes()))
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex(&hash(MessageDigest::sha512(), bytes).expect("SHA-512 of bytes in memory cannot fail"))
}

impl SignedCertificate {
    /// Parses a signed certificate file (structure only: see [`SignedCertificate::verify`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, GolemError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| GolemError::Malformed {
            what: "Golem certificate".into(),
            detail: format!("not JSON: {e}"),
        })?;
        Self::from_value(&value)
    }

    /// Parses the certificate and its embedded signer chain (iteratively: nesting depth is
    /// bounded by serde_json's recursion limit, not by our stack).
    pub fn from_value(value: &Value) -> Result<Self, GolemError> {
        let mut levels = Vec::new();
        let mut current = value;
        loop {
            let (certificate, signature, signer) = parse_signed_certificate(current)?;
            levels.push((certificate, signature));
            match signer {
                None => break,
                Some(parent) => current = parent,
            }
        }
        let mut chain: Option<Box<SignedCertificate>> = None;
        for (certificate, signature) in levels.into_iter().rev() {
            chain = Some(Box::new(SignedCertificate {
                certificate,
                signature,
                signer: chain,
            }));
        }
        Ok(*chain.expect("at least one level was parsed"))
    }

    /// The certificates from this one up to the self-signed root.
    pub fn chain(&self) -> impl Iterator<Item = &Certificate> {
        std::iter::successors(Some(self), |c| c.signer.as_deref()).map(|c| &c.certificate)
    }

    /// The self-signed certificate the chain ends in.
    pub fn root(&self) -> &Certificate {
        self.chain()
            .last()
            .expect("a chain has at least one certificate")
    }

    /// Verifies the whole chain: signatures, key usage, permission and validity nesting,
    /// and that every certificate is valid at `now`.
    pub fn verify(&self, now: DateTime<Utc>) -> Result<(), GolemError> {
        self.verify_structure()?;
        self.check_time(now)
    }

    /// Everything but the time: from the root down, each certificate against its signer.
    fn verify_structure(&self) -> Result<(), GolemError> {
        let levels: Vec<&SignedCertificate> =
            std::iter::successors(Some(self), |c| c.signer.as_deref()).collect();
        for level in levels.iter().rev() {
            let cert = &level.certificate;
            match &level.signer {
                None => verify_ed25519(
                    &cert.public_key,
                    &level.signature,
                    &cert.subject(),
                    &cert.display_name,
                )?,
                Some(parent) => check_signed_by(
                    &cert.subject(),
                    &level.signature,
                    &cert.validity,
                    &cert.permissions,
                    &parent.certificate,
                    Usage::SignCertificate,
                )?,
            }
        }
        Ok(())
    }

    /// Every certificate of the chain is valid at `now`; the first that is not is named,
    /// this one first, so a requestor hears about its own certificate before its CA's.
    fn check_time(&self, now: DateTime<Utc>) -> Result<(), GolemError> {
        for c in self.chain() {
            c.validity.check(&c.subject(), now)?;
        }
        Ok(())
    }
}

impl NodeDescriptor {
    /// Parses a node descriptor file (structure only: see [`NodeDescriptor::verify`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, GolemError> {
        let what = || "node descriptor".to_owned();
        let value: Value = serde_json::from_slice(bytes).map_err(|e| GolemError::Malformed {
            what: what(),
            detail: format!("not JSON: {e}"),
        })?;
        let top = object(&value, &what())?;
        only_keys(top, &["$schema", "nodeDescriptor", "signature"], &what())?;
        let body_value = required(top, "nodeDescriptor", &what())?;
        let body = object(body_value, "nodeDescriptor")?;
        only_keys(
            body,
            &["nodeId", "permissions", "validityPeriod"],
            "nodeDescriptor",
        )?;
        let node_id = string(
            required(body, "nodeId", "nodeDescriptor")?,
            "nodeDescriptor.nodeId",
        )?;
        let permissions = parse_permissions(
            required(body, "permissions", "nodeDescriptor")?,
            "nodeDescriptor.permissions",
        )?;
        let validity = parse_validity(
            required(body, "validityPeriod", "nodeDescriptor")?,
            "nodeDescriptor.validityPeriod",
        )?;
        let subject = format!("node descriptor for {node_id}");
        let (signature, signer) =
            parse_signature(required(top, "signature", &what())?, body_value, &subject)?;
        let signer = match signer {
            Some(s) => SignedCertificate::from_value(s)?,
            None => {
                return Err(GolemError::Malformed {
                    what: subject,
                    detail: "`signature.signer` is `self`; a node descriptor must be signed by a certificate".into(),
                })
            }
        };
        Ok(Self {
            node_id: node_id.to_owned(),
            permissions,
            validity,
            signature,
            signer,
        })
    }

    fn subject(&self) -> String {
        format!("node descriptor for {}", self.node_id)
    }

    /// Verifies the descriptor for the requestor `node_id` at `now`: the signer chain, the
    /// descriptor's signature, the signer's `signNode` usage, permissions and validity
    /// within the signer's, the node id, and every validity period at `now`.
    pub fn verify(&self, node_id: &str, now: DateTime<Utc>) -> Result<(), GolemError> {
        self.signer.verify_structure()?;
        check_signed_by(
            &self.subject(),
            &self.signature,
            &self.validity,
            &self.permissions,
            &self.signer.certificate,
            Usage::SignNode,
        )?;
        if !same_node(&self.node_id, node_id) {
            return Err(GolemError::NodeMismatch {
                descriptor: self.node_id.clone(),
                requestor: node_id.to_owned(),
            });
        }
        self.validity.check(&self.subject(), now)?;
        self.signer.check_time(now)
    }
}

/// Golem node ids are `0x` hex addresses, where case carries no meaning; libp2p peer ids
/// are base58, where it does.
fn same_node(a: &str, b: &str) -> bool {
    let hex_addr = |s: &str| {
        // Byte-wise, so a multi-byte character near the start cannot split a slice.
        let b = s.as_bytes();
        b.len() > 2
            && b[..2].eq_ignore_ascii_case(b"0x")
            && b[2..].iter().all(u8::is_ascii_hexdigit)
    };
    if hex_addr(a) && hex_addr(b) {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// The checks a signer imposes on what it signs (a child certificate or a descriptor).
fn check_signed_by(
    subject: &str,
    signature: &Signature,
    validity: &ValidityPeriod,
    permissions: &Permissions,
    signer: &Certificate,
    needed: Usage,
) -> Result<(), GolemError> {
    // The signature first: if it fails, nothing else the document says can be believed.
    verify_ed25519(&signer.public_key, signature, subject, &signer.display_name)?;
    if !signer.key_usage.allows(needed) {
        return Err(GolemError::KeyUsage {
            subject: subject.to_owned(),
            signer: signer.display_name.clone(),
            needed: needed.as_str(),
        });
    }
    if !signer.validity.contains_period(validity) {
        return Err(GolemError::ValidityNotNested {
            subject: subject.to_owned(),
            signer: signer.display_name.clone(),
            child: *validity,
            parent: signer.validity,
        });
    }
    if !signer.permissions.covers(permissions) {
        return Err(GolemError::PermissionsExceeded {
            subject: subject.to_owned(),
            signer: signer.display_name.clone(),
            child: permissions.clone(),
            parent: signer.permissions.clone(),
        });
    }
    Ok(())
}

fn verify_ed25519(
    key: &[u8; 32],
    signature: &Signature,
    subject: &str,
    signer: &str,
) -> Result<(), GolemError> {
    let invalid = || GolemError::SignatureInvalid {
        subject: subject.to_owned(),
        signer: signer.to_owned(),
    };
    // A key that is not a valid curve point is as bad as a wrong signature.
    let pkey = PKey::public_key_from_raw_bytes(key, Id::ED25519).map_err(|_| invalid())?;
    let mut verifier = Verifier::new_without_digest(&pkey).map_err(|_| invalid())?;
    match verifier.verify_oneshot(&signature.value, &signature.signed_bytes) {
        Ok(true) => Ok(()),
        _ => Err(invalid()),
    }
}

/// Parses one level: the `certificate` object, the signature over it, and the signer's
/// signed certificate (`None` for `self`).
fn parse_signed_certificate(
    value: &Value,
) -> Result<(Certificate, Signature, Option<&Value>), GolemError> {
    let what = "Golem certificate";
    let top = object(value, what)?;
    only_keys(top, &["$schema", "certificate", "signature"], what)?;
    let body_value = required(top, "certificate", what)?;
    let body = object(body_value, "certificate")?;
    only_keys(
        body,
        &[
            "validityPeriod",
            "keyUsage",
            "permissions",
            "subject",
            "publicKey",
        ],
        "certificate",
    )?;
    let subject = object(
        required(body, "subject", "certificate")?,
        "certificate.subject",
    )?;
    let display_name = string(
        required(subject, "displayName", "certificate.subject")?,
        "certificate.subject.displayName",
    )?
    .to_owned();
    // The subject is descriptive only: fields we do not know there cannot grant anything,
    // so they are accepted.
    let email = subject
        .get("contact")
        .and_then(Value::as_object)
        .and_then(|c| c.get("email"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = format!("certificate `{display_name}`");
    let validity = parse_validity(
        required(body, "validityPeriod", &name)?,
        &format!("{name}: validityPeriod"),
    )?;
    let key_usage = parse_key_usage(
        required(body, "keyUsage", &name)?,
        &format!("{name}: keyUsage"),
    )?;
    let permissions = parse_permissions(
        required(body, "permissions", &name)?,
        &format!("{name}: permissions"),
    )?;
    let public_key = parse_public_key(required(body, "publicKey", &name)?, &name)?;
    let id = certificate_id(body_value)?;
    let (signature, signer) =
        parse_signature(required(top, "signature", &name)?, body_value, &name)?;
    Ok((
        Certificate {
            id,
            display_name,
            email,
            validity,
            key_usage,
            permissions,
            public_key,
        },
        signature,
        signer,
    ))
}

fn parse_signature<'v>(
    value: &'v Value,
    signed: &Value,
    subject: &str,
) -> Result<(Signature, Option<&'v Value>), GolemError> {
    let what = format!("{subject}: signature");
    let sig = object(value, &what)?;
    only_keys(sig, &["algorithm", "value", "signer"], &what)?;
    let alg = object(
        required(sig, "algorithm", &what)?,
        &format!("{what}.algorithm"),
    )?;
    only_keys(alg, &["hash", "encryption"], &format!("{what}.algorithm"))?;
    let hash = string(
        required(alg, "hash", &what)?,
        &format!("{what}.algorithm.hash"),
    )?;
    let encryption = string(
        required(alg, "encryption", &what)?,
        &format!("{what}.algorithm.encryption"),
    )?;
    if hash != "sha512" || encryption != "EdDSA" {
        return Err(GolemError::UnsupportedAlgorithm {
            subject: subject.to_owned(),
            detail: format!("signature algorithm {encryption} with {hash}"),
        });
    }
    let value = fixed_hex::<64>(
        string(required(sig, "value", &what)?, &format!("{what}.value"))?,
        &format!("{what}.value"),
    )?;
    let signer = match required(sig, "signer", &what)? {
        Value::String(s) if s == "self" => None,
        v @ Value::Object(_) => Some(v),
        _ => {
            return Err(GolemError::Malformed {
                what: format!("{what}.signer"),
                detail: "expected \"self\" or the signer's signed certificate".into(),
            })
        }
    };
    let signed_bytes = canonical_json(signed)
        .map_err(|detail| GolemError::Malformed {
            what: subject.to_owned(),
            detail,
        })?
        .into_bytes();
    Ok((
        Signature {
            value,
            signed_bytes,
        },
        signer,
    ))
}

fn parse_public_key(value: &Value, subject: &str) -> Result<[u8; 32], GolemError> {
    let what = format!("{subject}: publicKey");
    let key = object(value, &what)?;
    only_keys(key, &["algorithm", "key", "parameters"], &what)?;
    let algorithm = string(
        required(key, "algorithm", &what)?,
        &format!("{what}.algorithm"),
    )?;
    let scheme = required(key, "parameters", &what)?
        .as_object()
        .and_then(|p| p.get("scheme"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if algorithm != "EdDSA" || scheme != "Ed25519" {
        return Err(GolemError::UnsupportedAlgorithm {
            subject: subject.to_owned(),
            detail: format!("public key {algorithm} with scheme `{scheme}`"),
        });
    }
    fixed_hex::<32>(
        string(required(key, "key", &what)?, &format!("{what}.key"))?,
        &format!("{what}.key"),
    )
}

fn parse_validity(value: &Value, what: &str) -> Result<ValidityPeriod, GolemError> {
    let period = object(value, what)?;
    only_keys(period, &["notBefore", "notAfter"], what)?;
    let time = |key: &str| -> Result<DateTime<Utc>, GolemError> {
        let text = string(required(period, key, what)?, &format!("{what}.{key}"))?;
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| GolemError::Malformed {
                what: format!("{what}.{key}"),
                detail: format!("`{text}` is not an RFC 3339 time: {e}"),
            })
    };
    Ok(ValidityPeriod {
        not_before: time("notBefore")?,
        not_after: time("notAfter")?,
    })
}

fn parse_key_usage(value: &Value, what: &str) -> Result<KeyUsage, GolemError> {
    match value {
        Value::String(s) if s == "all" => Ok(KeyUsage::All),
        Value::Array(items) => {
            let mut usages = Vec::new();
            for item in items {
                let usage = match item.as_str() {
                    Some("signCertificate") => Usage::SignCertificate,
                    Some("signManifest") => Usage::SignManifest,
                    Some("signNode") => Usage::SignNode,
                    _ => {
                        return Err(GolemError::Malformed {
                            what: what.to_owned(),
                            detail: format!("unknown key usage {item}; expected signCertificate, signManifest or signNode"),
                        })
                    }
                };
                usages.push(usage);
            }
            Ok(KeyUsage::Only(usages))
        }
        _ => Err(GolemError::Malformed {
            what: what.to_owned(),
            detail: "expected \"all\" or a list of usages".into(),
        }),
    }
}

fn parse_permissions(value: &Value, what: &str) -> Result<Permissions, GolemError> {
    let bad = |detail: String| GolemError::Malformed {
        what: what.to_owned(),
        detail,
    };
    match value {
        Value::String(s) if s == "all" => Ok(Permissions::All),
        Value::Object(map) => {
            // A permission we do not know could widen what a child grants; refuse it.
            only_keys(map, &["outbound"], what)?;
            let outbound = match map.get("outbound") {
                None => None,
                Some(Value::String(s)) if s == "unrestricted" => {
                    Some(OutboundPermission::Unrestricted)
                }
                Some(Value::Object(o)) => {
                    only_keys(o, &["urls"], &format!("{what}.outbound"))?;
                    let Some(Value::Array(list)) = o.get("urls") else {
                        return Err(bad("`outbound.urls` must be a list of URLs".into()));
                    };
                    let mut urls = Vec::new();
                    for item in list {
                        let text = item
                            .as_str()
                            .ok_or_else(|| bad(format!("outbound URL {item} is not a string")))?;
                        let url = Url::parse(text)
                            .map_err(|e| bad(format!("outbound URL `{text}`: {e}")))?;
                        urls.push(url);
                    }
                    Some(OutboundPermission::Urls(urls))
                }
                Some(other) => {
                    return Err(bad(format!(
                        "`outbound` must be \"unrestricted\" or {{\"urls\": […]}}, not {other}"
                    )))
                }
            };
            Ok(Permissions::Listed { outbound })
        }
        other => Err(bad(format!("expected \"all\" or an object, not {other}"))),
    }
}

fn object<'v>(value: &'v Value, what: &str) -> Result<&'v Map<String, Value>, GolemError> {
    value.as_object().ok_or_else(|| GolemError::Malformed {
        what: what.to_owned(),
        detail: "expected a JSON object".into(),
    })
}

fn required<'v>(
    map: &'v Map<String, Value>,
    key: &str,
    what: &str,
) -> Result<&'v Value, GolemError> {
    map.get(key).ok_or_else(|| GolemError::Malformed {
        what: what.to_owned(),
        detail: format!("missing field `{key}`"),
    })
}

fn string<'v>(value: &'v Value, what: &str) -> Result<&'v str, GolemError> {
    value.as_str().ok_or_else(|| GolemError::Malformed {
        what: what.to_owned(),
        detail: "expected a string".into(),
    })
}

/// Unknown fields are refused by name (DESIGN §3: a field we do not understand could carry
/// a constraint we would silently ignore).
fn only_keys(map: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), GolemError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(GolemError::Malformed {
            what: what.to_owned(),
            detail: format!("unknown field `{k}`"),
        }),
    }
}

fn fixed_hex<const N: usize>(text: &str, what: &str) -> Result<[u8; N], GolemError> {
    let bad = || GolemError::Malformed {
        what: what.to_owned(),
        detail: format!("expected {} hexadecimal digits", N * 2),
    };
    if text.len() != N * 2 || !text.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Canonical JSON (RFC 8785, JCS) of a value: object keys sorted by their UTF-16 code
/// units, no whitespace, strings with only the escapes JCS requires. Numbers must be
/// integers (printed as serde_json prints them): Golem documents hold none, and JCS's
/// ECMAScript float formatting is not worth getting subtly wrong in a signature check.
pub fn canonical_json(value: &Value) -> Result<String, String> {
    let mut out = String::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), String> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if n.is_i64() || n.is_u64() {
                out.push_str(&n.to_string());
            } else {
                return Err(format!(
                    "number {n} is not an integer; canonical JSON here supports integers only"
                ));
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| utf16_cmp(a.0, b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(item, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// JCS orders keys by UTF-16 code units, which differs from byte (code point) order only
/// for characters outside the Basic Multilingual Plane against U+E000..U+FFFF.
fn utf16_cmp(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
