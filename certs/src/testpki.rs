//! Test PKI: CA chains, keys and signatures made with openssl, for this workspace's tests
//! and benchmarks (feature `test-pki`). Never used by the product.

use chrono::{DateTime, Duration, Utc};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

/// Key types the product must accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa2048,
    EcP256,
    EcP384,
}

impl KeyKind {
    pub fn generate(self) -> PKey<Private> {
        match self {
            KeyKind::Rsa2048 => PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap(),
            KeyKind::EcP256 | KeyKind::EcP384 => {
                let nid = if self == KeyKind::EcP256 {
                    Nid::X9_62_PRIME256V1
                } else {
                    Nid::SECP384R1
                };
                let group = EcGroup::from_curve_name(nid).unwrap();
                PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
            }
        }
    }
}

/// A certificate and its private key.
pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// Validity window of a test certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl Validity {
    /// From a day ago for ten years.
    pub fn current() -> Self {
        let now = Utc::now();
        Self {
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(3650),
        }
    }
    pub fn expired() -> Self {
        let now = Utc::now();
        Self {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
    pub fn future() -> Self {
        let now = Utc::now();
        Self {
            not_before: now + Duration::days(30),
            not_after: now + Duration::days(60),
        }
    }
}

/// The key usage extensions of an author's (leaf) certificate, by openssl's configuration
/// names: `keyUsage` values such as `digitalSignature` or `keyAgreement`, and
/// `extendedKeyUsage` values such as `codeSigning`, `serverAuth`, `anyExtendedKeyUsage` or
/// a dotted OID. `None` leaves the extension out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafUsage {
    pub key_usage: Option<Vec<&'static str>>,
    pub extended_key_usage: Option<Vec<&'static str>>,
}

impl LeafUsage {
    /// What [`issue`] gives a leaf: `keyUsage=critical,digitalSignature`, no EKU.
    pub fn signing() -> Self {
        Self {
            key_usage: Some(vec!["digitalSignature"]),
            extended_key_usage: None,
        }
    }

    /// Neither extension: the leaf's key may be used for anything.
    pub fn unrestricted() -> Self {
        Self::default()
    }

    pub fn key_usage(values: &[&'static str]) -> Self {
        Self {
            key_usage: Some(values.to_vec()),
            extended_key_usage: None,
        }
    }

    pub fn extended_key_usage(values: &[&'static str]) -> Self {
        Self {
            key_usage: None,
            extended_key_usage: Some(values.to_vec()),
        }
    }
}

fn key_usage_extension(values: &[&str]) -> openssl::x509::X509Extension {
    let mut ku = KeyUsage::new();
    ku.critical();
    for v in values {
        match *v {
            "digitalSignature" => ku.digital_signature(),
            "nonRepudiation" => ku.non_repudiation(),
            "keyEncipherment" => ku.key_encipherment(),
            "dataEncipherment" => ku.data_encipherment(),
            "keyAgreement" => ku.key_agreement(),
            "keyCertSign" => ku.key_cert_sign(),
            "cRLSign" => ku.crl_sign(),
            "encipherOnly" => ku.encipher_only(),
            "decipherOnly" => ku.decipher_only(),
            other => panic!("unknown keyUsage value `{other}`"),
        };
    }
    ku.build().unwrap()
}

fn extended_key_usage_extension(values: &[&str]) -> openssl::x509::X509Extension {
    let mut eku = ExtendedKeyUsage::new();
    for v in values {
        // openssl takes its short names (`codeSigning`, `anyExtendedKeyUsage`) and dotted
        // OIDs alike.
        eku.other(v);
    }
    eku.build().unwrap()
}

/// What a test certificate is for.
enum Profile<'a> {
    Ca,
    Leaf(&'a LeafUsage),
}

fn build(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<&Issued>,
    profile: Profile<'_>,
    validity: Validity,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "Provider Tests")
        .unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial
        .rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&serial).unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&name, |i| i.cert.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::from_unix(validity.not_before.timestamp()).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(validity.not_after.timestamp()).unwrap())
        .unwrap();
    match profile {
        Profile::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            b.append_extension(key_usage_extension(&["keyCertSign", "cRLSign"]))
                .unwrap();
        }
        Profile::Leaf(usage) => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap())
                .unwrap();
            if let Some(values) = &usage.key_usage {
                b.append_extension(key_usage_extension(values)).unwrap();
            }
            if let Some(values) = &usage.extended_key_usage {
                b.append_extension(extended_key_usage_extension(values))
                    .unwrap();
            }
        }
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(issuer.map(|i| i.cert.as_ref()), None))
        .unwrap();
    b.append_extension(ski).unwrap();
    let signing_key = issuer.map_or(key, |i| &i.key);
    b.sign(signing_key, MessageDigest::sha256()).unwrap();
    b.build()
}

/// A self-signed root CA.
pub fn root(cn: &str, kind: KeyKind, validity: Validity) -> Issued {
    let key = kind.generate();
    let cert = build(cn, &key, None, Profile::Ca, validity);
    Issued { cert, key }
}

/// A certificate issued by `issuer`: an intermediate CA when `ca`, else an author's leaf
/// with [`LeafUsage::signing`].
pub fn issue(issuer: &Issued, cn: &str, kind: KeyKind, ca: bool, validity: Validity) -> Issued {
    if ca {
        let key = kind.generate();
        let cert = build(cn, &key, Some(issuer), Profile::Ca, validity);
        Issued { cert, key }
    } else {
        issue_leaf(issuer, cn, kind, validity, &LeafUsage::signing())
    }
}

/// An author's leaf issued by `issuer` with the given key usage extensions.
pub fn issue_leaf(
    issuer: &Issued,
    cn: &str,
    kind: KeyKind,
    validity: Validity,
    usage: &LeafUsage,
) -> Issued {
    let key = kind.generate();
    let cert = build(cn, &key, Some(issuer), Profile::Leaf(usage), validity);
    Issued { cert, key }
}

/// PEM of several certificates, in the order given.
pub fn pem(certs: &[&X509]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.to_pem().unwrap()).collect()
}

/// Signs `data` as `openssl dgst -<alg> -sign key` does.
pub fn sign(key: &PKey<Private>, digest: MessageDigest, data: &[u8]) -> Vec<u8> {
    let mut s = Signer::new(digest, key).unwrap();
    s.sign_oneshot_to_vec(data).unwrap()
}

/// Golem JSON certificates and node descriptors signed with Ed25519 keys.
pub mod golem {
    use std::path::Path;

    use openssl::pkey::{Id, PKey, Private};
    use openssl::sign::Signer;
    use serde_json::{json, Value};

    use crate::golem::canonical_json;

    pub fn key() -> PKey<Private> {
        PKey::generate_ed25519().unwrap()
    }

    /// A yagna key file (`{"algorithm":"EdDSA","key":"<hex seed>",…}`) as a private key.
    pub fn yagna_key(path: &Path) -> PKey<Private> {
        let v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let seed = unhex(v["key"].as_str().unwrap());
        PKey::private_key_from_raw_bytes(&seed, Id::ED25519).unwrap()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    pub fn public_key(key: &PKey<Private>) -> Value {
        let raw = key.raw_public_key().unwrap();
        json!({"algorithm": "EdDSA", "key": crate::parse::hex(&raw), "parameters": {"scheme": "Ed25519"}})
    }

    /// The `certificate` object of a certificate for `key`.
    pub fn certificate(
        name: &str,
        key: &PKey<Private>,
        validity: (&str, &str),
        key_usage: Value,
        permissions: Value,
    ) -> Value {
        json!({
            "validityPeriod": {"notBefore": validity.0, "notAfter": validity.1},
            "keyUsage": key_usage,
            "permissions": permissions,
            "subject": {"displayName": name, "contact": {"email": "test@example.com"}},
            "publicKey": public_key(key),
        })
    }

    /// The `nodeDescriptor` object.
    pub fn descriptor(node_id: &str, validity: (&str, &str), permissions: Value) -> Value {
        json!({
            "nodeId": node_id,
            "permissions": permissions,
            "validityPeriod": {"notBefore": validity.0, "notAfter": validity.1},
        })
    }

    /// Signs `body` (a `certificate` or `nodeDescriptor` object, per `kind`) with `key`;
    /// `signer` is `"self"` or the signer's signed certificate.
    pub fn sign(kind: &str, body: Value, key: &PKey<Private>, signer: Value) -> Value {
        let canonical = canonical_json(&body).unwrap();
        let mut s = Signer::new_without_digest(key).unwrap();
        let sig = s.sign_oneshot_to_vec(canonical.as_bytes()).unwrap();
        json!({
            kind: body,
            "signature": {
                "algorithm": {"hash": "sha512", "encryption": "EdDSA"},
                "value": crate::parse::hex(&sig),
                "signer": signer,
            }
        })
    }

    pub fn to_bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec_pretty(v).unwrap()
    }
}
