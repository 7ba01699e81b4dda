//! Signed receipts as a requestor receives them (`net::receipt::SignedReceipt`): parsing
//! and signature verification must not panic on anything, and whatever parses, re-signed
//! with a provider key, verifies — through an encode/decode pass, since the signature
//! covers the canonical JSON of the receipt, not the bytes it came in.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use net::receipt::SignedReceipt;
use net::{Keypair, PeerId};

fn key() -> &'static Keypair {
    static K: OnceLock<Keypair> = OnceLock::new();
    K.get_or_init(|| Keypair::ed25519_from_bytes([7u8; 32]).expect("a fixed ed25519 key"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = SignedReceipt::from_json(data) else {
        return;
    };
    let _ = signed.verify().map_err(|e| e.to_string());
    let mut receipt = signed.receipt;
    receipt.provider_id = PeerId::from_public_key(&key().public()).to_string();
    let Ok(resigned) = SignedReceipt::sign(receipt, key()) else {
        // Canonical JSON refuses what it cannot write exactly; that is a clear error.
        return;
    };
    let bytes = serde_json::to_vec(&resigned).expect("encodes");
    let parsed = SignedReceipt::from_json(&bytes).expect("a signed receipt parses");
    assert_eq!(parsed, resigned);
    parsed
        .verify()
        .unwrap_or_else(|e| panic!("a freshly signed receipt does not verify: {e}"));
});
