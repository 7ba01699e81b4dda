//! Certificate input as a requestor or an operator hands it over: PEM or DER bytes through
//! `certs::parse_certificates` (openssl), what is read off each certificate, a keystore
//! built from the bytes (X.509 and Golem's JSON certificates), and chain verification
//! against a keystore holding yagna's test CA.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use certs::{ChainVerifier, Keystore};
use libfuzzer_sys::fuzz_target;

static CA: &[u8] = include_bytes!("../../../shared/vectors/yagna/certs/foo_ca-chain.cert.pem");
static ROOT: &[u8] =
    include_bytes!("../../../shared/vectors/yagna/certs/root-certificate.signed.json");

fn verifier() -> &'static ChainVerifier {
    static V: OnceLock<ChainVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let keystore = Keystore::from_files(vec![
            (PathBuf::from("foo_ca-chain.cert.pem"), CA.to_vec()),
            (PathBuf::from("root-certificate.signed.json"), ROOT.to_vec()),
        ])
        .expect("the test CA loads");
        ChainVerifier::new(Arc::new(keystore))
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(found) = certs::parse_certificates(data) {
        for cert in &found {
            let id = certs::cert_id(cert);
            assert!(!id.is_empty());
            let info = certs::CertInfo::of(cert);
            let _ = info.short_name();
            let _ = certs::is_ca(cert);
            let _ = certs::check_signer_usage(cert);
        }
    }
    let _ = certs::golem::is_golem_certificate(data);
    let _ = certs::golem::is_node_descriptor(data);
    if let Ok(store) = Keystore::from_files(vec![(PathBuf::from("fuzz.pem"), data.to_vec())]) {
        for entry in store.entries() {
            let _ = entry.kind();
        }
    }
    let verifier = verifier();
    if let Ok(chain) = verifier.verify(data, chrono::Utc::now()) {
        assert!(chain.ids().count() > 0);
    }
    // Keep the cache from hiding the parse on a repeated input.
    verifier.clear_cache();
});
