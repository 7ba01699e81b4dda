//! A manifest builder and a PKI + judge fixture shared by the tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use certs::testpki::{self, Issued, KeyKind, Validity};
use certs::{ChainVerifier, Keystore};
use openssl::hash::MessageDigest;
use policies::{Demand, Judge, Rules, Verdict, Whitelist};
use serde_json::{json, Value};

pub fn yagna(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/yagna")
        .join(rel)
}

/// A valid manifest whose outbound URLs are `urls` (none: no `net` section).
pub fn manifest(urls: &[&str]) -> Value {
    let mut m = json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "test", "version": "1.0.0"},
        "payload": [{
            "platform": {"arch": "x86_64", "os": "linux"},
            "urls": ["https://images.example.com/app.tar.gz"],
            "hash": format!("sha3:{}", "ab".repeat(32))
        }],
        "compManifest": {"version": "0.1.0"}
    });
    if !urls.is_empty() {
        m["compManifest"]["net"] =
            json!({"inet": {"out": {"protocols": ["http", "https"], "urls": urls}}});
    }
    m
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A root in the keystore, an intermediate and an author leaf under it.
pub struct Pki {
    pub root: Issued,
    pub inter: Issued,
    pub leaf: Issued,
}

impl Pki {
    pub fn new(kind: KeyKind) -> Self {
        let root = testpki::root("Test Root", kind, Validity::current());
        let inter = testpki::issue(&root, "Test Inter", kind, true, Validity::current());
        let leaf = testpki::issue(&inter, "Test Author", kind, false, Validity::current());
        Self { root, inter, leaf }
    }

    pub fn chain(&self) -> Vec<u8> {
        testpki::pem(&[&self.leaf.cert, &self.inter.cert])
    }

    pub fn id(issued: &Issued) -> String {
        certs::cert_id(&issued.cert)
    }
}

/// Everything a demand carries, owned.
pub struct Signed {
    pub manifest_b64: String,
    pub sig_b64: String,
    pub alg: String,
    pub chain: Vec<u8>,
}

impl Signed {
    pub fn new(manifest: &Value, signer: &Issued, chain: Vec<u8>) -> Self {
        let manifest_b64 = b64(serde_json::to_string_pretty(manifest).unwrap().as_bytes());
        let sig = testpki::sign(
            &signer.key,
            MessageDigest::sha256(),
            manifest_b64.as_bytes(),
        );
        Self {
            manifest_b64,
            sig_b64: b64(&sig),
            alg: "sha256".into(),
            chain,
        }
    }

    pub fn demand<'a>(&'a self, node: Option<&'a str>) -> Demand<'a> {
        Demand {
            manifest_base64: Some(&self.manifest_b64),
            signature_base64: Some(&self.sig_b64),
            signature_algorithm: Some(&self.alg),
            cert_chain_pem: Some(&self.chain),
            node_id: node,
            node_descriptor: None,
        }
    }
}

pub fn judge(rules: Rules, whitelist: &Whitelist, roots: &[&Issued]) -> Judge {
    let files = roots
        .iter()
        .enumerate()
        .map(|(i, r)| (PathBuf::from(format!("{i}.pem")), r.cert.to_pem().unwrap()))
        .collect();
    let ks = Keystore::from_files(files).unwrap();
    Judge::new(
        rules,
        whitelist.matcher().unwrap(),
        Arc::new(ChainVerifier::new(Arc::new(ks))),
    )
}

pub fn codes(v: &Verdict) -> Vec<&'static str> {
    v.reasons.iter().map(|r| r.code.as_str()).collect()
}

pub const PEER: &str = "12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo";
