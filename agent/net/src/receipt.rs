//! Job receipts: what a job did, signed with the provider's libp2p identity key.
//!
//! The signature is Ed25519 (the identity key's type) over the RFC 8785 canonical JSON
//! of the `receipt` object, so a verifier re-serialising it gets the same bytes whatever
//! its JSON library's key order. The public key travels with the receipt; a verifier
//! checks that it hashes to the `provider_id` the receipt names, so a receipt cannot be
//! re-signed by another key and still claim to come from the same provider.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::codes::{Outcome, Reason};

/// The receipt format's version (2: the `charge` and `runtime_profile`; a version 1
/// receipt, without them, still verifies).
pub const RECEIPT_VERSION: u32 = 2;

/// One command as the receipt records it: the verdict, the exit, and hashes of the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRecord {
    pub batch_id: String,
    pub index: usize,
    pub command: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub reason: Option<Reason>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// Lowercase hex SHA-256 of the whole stdout / stderr (before any truncation).
    pub stdout_sha256: String,
    pub stderr_sha256: String,
}

/// One egress decision of the job's proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRecord {
    pub time: String,
    pub method: String,
    pub destination: String,
    /// `allow` or `deny`.
    pub decision: String,
    pub rule: String,
    pub reason: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// What the job used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub mem_mib: u32,
    pub cpus: u32,
    /// From VM start to teardown.
    pub wall_ms: u64,
    /// Guest boot to agent ready.
    pub boot_ms: u64,
    /// Bytes through the egress proxy, both directions.
    pub egress_bytes: u64,
    pub commands_run: u32,
}

/// What the job owes: the usage vector measured, the preset's linear coefficients, and
/// the amount, `coeffs[n] + Σ coeffs[i] × usage[i]` (yagna's linear model: the last
/// coefficient is the start fee). Numbers are decimal text: the signature is over
/// canonical JSON, which has integers only, and text keeps every digit a requestor checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Charge {
    /// The preset the job was agreed under.
    pub preset: String,
    pub currency: String,
    /// The counters' names (`golem.usage.duration_sec`, `golem.usage.cpu_sec`,
    /// `golem.usage.egress_mib`).
    pub usage_vector: Vec<String>,
    /// The counters' values, in `usage_vector` order (decimal text).
    pub usage: Vec<String>,
    /// One per counter, then the start fee (decimal text).
    pub coeffs: Vec<String>,
    /// The amount due, a decimal with 9 fractional digits.
    pub amount: String,
}

/// `x` with at most `places` fractional digits, trailing zeros dropped (`0.0001`, `12`).
pub fn decimal(x: f64, places: usize) -> String {
    let s = format!("{x:.places$}");
    if !s.contains('.') {
        return s;
    }
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

fn number(field: &str, text: &str) -> Result<f64, ReceiptError> {
    text.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ReceiptError::BadCharge(format!("{field} `{text}` is not a decimal number")))
}

impl Charge {
    /// `coeffs`' last element plus the dot product of the rest with `usage`, as the
    /// decimal text receipts carry (9 fractional digits).
    pub fn amount_of(usage: &[f64], coeffs: &[f64]) -> String {
        let start = coeffs.last().copied().unwrap_or(0.0);
        let sum: f64 = usage.iter().zip(coeffs).map(|(u, c)| u * c).sum();
        format!("{:.9}", start + sum)
    }

    /// Checks the stated amount against the usage and coefficients: a receipt whose
    /// arithmetic is wrong is refused even when its signature holds.
    pub fn check_amount(&self) -> Result<(), ReceiptError> {
        if self.usage.len() != self.usage_vector.len() || self.coeffs.len() != self.usage.len() + 1
        {
            return Err(ReceiptError::BadCharge(format!(
                "{} counters, {} values and {} coefficients (want one value per counter and one coefficient more)",
                self.usage_vector.len(),
                self.usage.len(),
                self.coeffs.len()
            )));
        }
        let usage = self
            .usage
            .iter()
            .map(|u| number("usage", u))
            .collect::<Result<Vec<_>, _>>()?;
        let coeffs = self
            .coeffs
            .iter()
            .map(|c| number("coefficient", c))
            .collect::<Result<Vec<_>, _>>()?;
        let want = Self::amount_of(&usage, &coeffs);
        if want != self.amount {
            return Err(ReceiptError::BadCharge(format!(
                "the amount is {} but the usage and coefficients give {want}",
                self.amount
            )));
        }
        Ok(())
    }
}

/// The receipt body: everything the signature covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub version: u32,
    pub agreement_id: String,
    pub activity_id: String,
    pub provider_id: String,
    pub requestor_id: String,
    /// Lowercase hex SHA-256 of the manifest JSON (the decoded base64 text).
    pub manifest_sha256: String,
    /// The payload image's hash as the manifest gave it (`sha3:<hex>`).
    pub image_hash: String,
    /// `qemu` or `kvm`.
    pub backend: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// Why the job ended: `terminated by requestor`, `agreement expired`, …
    pub termination: String,
    pub commands: Vec<CommandRecord>,
    pub egress: Vec<EgressRecord>,
    pub usage: Usage,
    /// What the job owes (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<Charge>,
    /// The runtime profile the job's VM ran under (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_profile: Option<String>,
}

/// A receipt with its signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    pub receipt: Receipt,
    /// Base64 of the provider's public key (libp2p protobuf encoding).
    pub public_key: String,
    /// Base64 of the Ed25519 signature over the canonical JSON of `receipt`.
    pub signature: String,
}

/// Why a receipt could not be signed or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("the receipt is not valid JSON of the receipt format: {0}")]
    Format(String),
    #[error("the receipt's public key is unreadable: {0}")]
    PublicKey(String),
    #[error("the receipt's public key belongs to peer {actual}, but it claims provider {claimed}")]
    WrongProvider { claimed: String, actual: String },
    #[error("the signature does not match the receipt: it was altered or signed by another key")]
    BadSignature,
    #[error("the receipt's charge does not add up: {0}")]
    BadCharge(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

fn canonical(receipt: &Receipt) -> Result<Vec<u8>, ReceiptError> {
    let value = serde_json::to_value(receipt).map_err(|e| ReceiptError::Format(e.to_string()))?;
    certs::golem::canonical_json(&value)
        .map(String::into_bytes)
        .map_err(ReceiptError::Format)
}

impl SignedReceipt {
    /// Signs `receipt` with the provider's identity key.
    pub fn sign(receipt: Receipt, key: &Keypair) -> Result<Self, ReceiptError> {
        let bytes = canonical(&receipt)?;
        let signature = key
            .sign(&bytes)
            .map_err(|e| ReceiptError::Sign(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Self {
            receipt,
            public_key: b64.encode(key.public().encode_protobuf()),
            signature: b64.encode(signature),
        })
    }

    /// Parses a receipt file's JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ReceiptError> {
        serde_json::from_slice(bytes).map_err(|e| ReceiptError::Format(e.to_string()))
    }

    /// Checks the signature and that the key is the provider's the receipt names.
    pub fn verify(&self) -> Result<(), ReceiptError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key_bytes = b64
            .decode(&self.public_key)
            .map_err(|e| ReceiptError::PublicKey(format!("not base64: {e}")))?;
        let key = PublicKey::try_decode_protobuf(&key_bytes)
            .map_err(|e| ReceiptError::PublicKey(e.to_string()))?;
        let actual = PeerId::from_public_key(&key).to_string();
        if actual != self.receipt.provider_id {
            return Err(ReceiptError::WrongProvider {
                claimed: self.receipt.provider_id.clone(),
                actual,
            });
        }
        let signature = b64
            .decode(&self.signature)
            .map_err(|_| ReceiptError::BadSignature)?;
        if !key.verify(&canonical(&self.receipt)?, &signature) {
            return Err(ReceiptError::BadSignature);
        }
        match &self.receipt.charge {
            Some(c) => c.check_amount(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(provider: &Keypair) -> Receipt {
        let t = DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Receipt {
            version: RECEIPT_VERSION,
            agreement_id: "a1".into(),
            activity_id: "act1".into(),
            provider_id: provider.public().to_peer_id().to_string(),
            requestor_id: Keypair::generate_ed25519()
                .public()
                .to_peer_id()
                .to_string(),
            manifest_sha256: "00".repeat(32),
            image_hash: "sha3:abcd".into(),
            backend: "qemu".into(),
            started_at: t,
            ended_at: t,
            termination: "terminated by requestor".into(),
            commands: vec![CommandRecord {
                batch_id: "b1".into(),
                index: 0,
                command: "run /bin/echo hi".into(),
                outcome: Outcome::Ok,
                exit_code: Some(0),
                reason: None,
                started_at: t,
                ended_at: t,
                stdout_sha256: "11".repeat(32),
                stderr_sha256: "22".repeat(32),
            }],
            egress: vec![],
            usage: Usage::default(),
            charge: Some(Charge {
                preset: "std".into(),
                currency: "GLM".into(),
                usage_vector: vec![
                    "golem.usage.duration_sec".into(),
                    "golem.usage.cpu_sec".into(),
                ],
                usage: vec!["10.5".into(), "4.25".into()],
                coeffs: vec!["0.0001".into(), "0.0005".into(), "0.01".into()],
                amount: Charge::amount_of(&[10.5, 4.25], &[0.0001, 0.0005, 0.01]),
            }),
            runtime_profile: Some("default".into()),
        }
    }

    #[test]
    fn a_signed_receipt_verifies_and_any_change_breaks_it() {
        let key = Keypair::generate_ed25519();
        let signed = SignedReceipt::sign(sample(&key), &key).unwrap();
        let text = serde_json::to_vec_pretty(&signed).unwrap();
        SignedReceipt::from_json(&text).unwrap().verify().unwrap();

        let mut altered = signed.clone();
        altered.receipt.commands[0].exit_code = Some(1);
        assert!(matches!(altered.verify(), Err(ReceiptError::BadSignature)));

        // Re-signed by another key: the key no longer matches the named provider.
        let other = Keypair::generate_ed25519();
        let forged = SignedReceipt::sign(signed.receipt.clone(), &other).unwrap();
        assert!(matches!(
            forged.verify(),
            Err(ReceiptError::WrongProvider { .. })
        ));

        // The amount is covered by the signature.
        let mut cheaper = signed.clone();
        cheaper.receipt.charge.as_mut().unwrap().amount = "0.000000001".into();
        assert!(matches!(cheaper.verify(), Err(ReceiptError::BadSignature)));
        assert_eq!(
            signed.receipt.charge.as_ref().unwrap().amount,
            "0.013175000"
        );
    }

    #[test]
    fn a_signed_amount_that_does_not_add_up_is_refused() {
        let key = Keypair::generate_ed25519();
        let mut r = sample(&key);
        r.charge.as_mut().unwrap().amount = "1.000000000".into();
        let signed = SignedReceipt::sign(r, &key).unwrap();
        let e = signed.verify().unwrap_err();
        assert!(matches!(e, ReceiptError::BadCharge(_)), "{e}");
    }

    #[test]
    fn a_version_1_receipt_still_verifies() {
        let key = Keypair::generate_ed25519();
        let mut r = sample(&key);
        r.version = 1;
        r.charge = None;
        r.runtime_profile = None;
        let text = serde_json::to_string(&SignedReceipt::sign(r, &key).unwrap()).unwrap();
        assert!(!text.contains("charge") && !text.contains("runtime_profile"));
        SignedReceipt::from_json(text.as_bytes())
            .unwrap()
            .verify()
            .unwrap();
    }
}
