//! Keystore, chain and signature behaviour, on yagna's real vectors and on chains made here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Duration, Utc};
use openssl::hash::MessageDigest;

use crate::testpki::{self, KeyKind, Validity};
use crate::*;

fn yagna(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/yagna")
        .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(yagna(rel)).unwrap()
}

fn keystore_of(files: &[&str]) -> Arc<Keystore> {
    Arc::new(
        Keystore::from_files(files.iter().map(|f| (PathBuf::from(f), read(f))).collect()).unwrap(),
    )
}

fn b64(s: &[u8]) -> Vec<u8> {
    use openssl::base64::decode_block;
    decode_block(std::str::from_utf8(s).unwrap().trim()).unwrap()
}

#[test]
fn foo_req_signature_over_base64_text_verifies_and_unknown_signer_does_not() {
    let ks = keystore_of(&["certs/foo_ca.cert.pem", "certs/foo_inter.cert.pem"]);
    let verifier = ChainVerifier::new(ks);
    let chain = verifier
        .verify(&read("certs/foo_req.cert.pem"), Utc::now())
        .unwrap();
    assert_eq!(chain.certs.len(), 3, "foo_req → foo_inter → foo_ca");
    let data = read("signatures/data.json.base64");
    let good = b64(&read(
        "signatures/data.json.base64.foo_req_sign.sha256.base64",
    ));
    let bad = b64(&read(
        "signatures/data.json.base64.unknown_req_sign.sha256.base64",
    ));
    verify_signature(&chain.leaf_key, SignatureAlgorithm::Sha256, &data, &good).unwrap();
    assert_eq!(
        verify_signature(&chain.leaf_key, SignatureAlgorithm::Sha256, &data, &bad),
        Err(SignatureError::Invalid)
    );
    // The same signature under another digest is not valid either.
    assert_eq!(
        verify_signature(&chain.leaf_key, SignatureAlgorithm::Sha512, &data, &good),
        Err(SignatureError::Invalid)
    );
}

#[test]
fn intermediate_first_chain_file_is_accepted_with_only_the_root_in_the_keystore() {
    let verifier = ChainVerifier::new(keystore_of(&["certs/foo_ca.cert.pem"]));
    let chain = verifier
        .verify(&read("certs/foo_inter_req-chain.cert.pem"), Utc::now())
        .unwrap();
    let names: Vec<&str> = chain.certs.iter().map(|c| c.short_name()).collect();
    assert_eq!(names, ["Foo Req", "Foo Inter", "Foo Co"]);
}

#[test]
fn chain_to_a_ca_outside_the_keystore_is_untrusted() {
    let verifier = ChainVerifier::new(keystore_of(&["certs/dummy_inter.cert.pem"]));
    let err = verifier
        .verify(&read("certs/foo_req.cert.pem"), Utc::now())
        .unwrap_err();
    assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
    // An intermediate alone in the keystore is not a trust anchor.
    let verifier = ChainVerifier::new(keystore_of(&["certs/foo_inter.cert.pem"]));
    let err = verifier
        .verify(&read("certs/foo_req.cert.pem"), Utc::now())
        .unwrap_err();
    assert!(matches!(err, ChainError::Untrusted { .. }), "{err}");
}

#[test]
fn yagna_expired_and_not_yet_valid_certs_are_refused_for_the_keystore() {
    for (file, expired) in [
        ("certs/expired.pem", true),
        ("certs/not_yet_valid.pem", false),
    ] {
        let cert = parse_certificates(&read(file)).unwrap().remove(0);
        let err = Keystore::check_validity(&cert, Utc::now()).unwrap_err();
        match (expired, &err) {
            (true, KeystoreError::Expired { .. }) | (false, KeystoreError::NotYetValid { .. }) => {}
            _ => panic!("{file}: {err}"),
        }
    }
}

#[test]
fn cert_id_is_sha512_of_der_and_prefixes_resolve() {
    let ks = keystore_of(&["certs/foo_ca.cert.pem", "certs/foo_inter.cert.pem"]);
    let inter = "55e451bd1a2f43570a25052b863af1d527fe6fd4bfd1482fdb241596432477f20eb2b2f3801fb5c6cd785f1a03c43ccf71fd8cdf0a974d1296be2326b0824673";
    assert!(ks.get(inter).is_some());
    assert_eq!(ks.resolve_prefix("55E4").unwrap().info.id, inter);
    assert!(matches!(
        ks.resolve_prefix("0000"),
        Err(KeystoreError::NoMatch(_))
    ));
    assert!(matches!(
        ks.resolve_prefix("xyz"),
        Err(KeystoreError::BadPrefix(_))
    ));
}

#[test]
fn ambiguous_prefix_lists_candidates() {
    // 17 certificates guarantee two share a first hex digit.
    let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
    let mut files = vec![(PathBuf::from("root.pem"), root.cert.to_pem().unwrap())];
    for i in 0..16 {
        let c = testpki::issue(
            &root,
            &format!("Leaf {i}"),
            KeyKind::EcP256,
            false,
            Validity::current(),
        );
        files.push((PathBuf::from(format!("{i}.pem")), c.cert.to_pem().unwrap()));
    }
    let ks = Keystore::from_files(files).unwrap();
    let mut by_digit = std::collections::HashMap::<char, usize>::new();
    for c in ks.certs() {
        *by_digit
            .entry(c.info.id.chars().next().unwrap())
            .or_default() += 1;
    }
    let digit = by_digit.iter().find(|(_, n)| **n > 1).unwrap().0;
    match ks.resolve_prefix(&digit.to_string()) {
        Err(KeystoreError::Ambiguous { candidates, .. }) => assert!(candidates.len() >= 2),
        other => panic!("expected ambiguity, got {other:?}"),
    }
}

#[test]
fn truncated_pem_is_an_error_not_a_shorter_chain() {
    let chain = read("certs/foo_inter_req-chain.cert.pem");
    let cut = &chain[..chain.len() - 200];
    assert!(matches!(
        parse_certificates(cut),
        Err(ParseError::BadPem { index: 2, .. })
    ));
    let mut corrupt = chain.clone();
    let mid = corrupt.len() / 4;
    corrupt[mid] = b'!';
    assert!(parse_certificates(&corrupt).is_err());
    assert!(matches!(
        parse_certificates(b"  \n"),
        Err(ParseError::Empty)
    ));
    assert!(matches!(
        parse_certificates(b"garbage"),
        Err(ParseError::BadDer(_))
    ));
}

#[test]
fn der_file_is_read() {
    let pem = parse_certificates(&read("certs/foo_ca.cert.pem")).unwrap();
    let der = pem[0].to_der().unwrap();
    let back = parse_certificates(&der).unwrap();
    assert_eq!(cert_id(&back[0]), cert_id(&pem[0]));
}

#[test]
fn generated_chains_of_every_key_kind_verify_with_every_digest() {
    for kind in [KeyKind::Rsa2048, KeyKind::EcP256, KeyKind::EcP384] {
        let root = testpki::root("Root", kind, Validity::current());
        let inter = testpki::issue(&root, "Inter", kind, true, Validity::current());
        let leaf = testpki::issue(&inter, "Author", kind, false, Validity::current());
        let ks = Keystore::from_files(vec![("r".into(), root.cert.to_pem().unwrap())]).unwrap();
        let verifier = ChainVerifier::new(Arc::new(ks));
        let chain = verifier
            .verify(&testpki::pem(&[&leaf.cert, &inter.cert]), Utc::now())
            .unwrap();
        for (alg, md) in [
            (SignatureAlgorithm::Sha256, MessageDigest::sha256()),
            (SignatureAlgorithm::Sha384, MessageDigest::sha384()),
            (SignatureAlgorithm::Sha512, MessageDigest::sha512()),
        ] {
            let sig = testpki::sign(&leaf.key, md, b"bWFuaWZlc3Q=");
            verify_signature(&chain.leaf_key, alg, b"bWFuaWZlc3Q=", &sig)
                .unwrap_or_else(|e| panic!("{kind:?} {alg:?}: {e}"));
            assert_eq!(
                verify_signature(&chain.leaf_key, alg, b"bWFuaWZlc3Q!", &sig),
                Err(SignatureError::Invalid)
            );
        }
    }
}

#[test]
fn validity_is_checked_at_the_injected_time_for_every_chain_member() {
    let long = Validity {
        not_before: Utc::now() - Duration::days(100),
        not_after: Utc::now() + Duration::days(100),
    };
    let root = testpki::root("Root", KeyKind::EcP256, long);
    let inter = testpki::issue(&root, "Inter", KeyKind::EcP256, true, Validity::expired());
    let leaf_validity = Validity {
        not_before: Utc::now() - Duration::days(20),
        not_after: Utc::now() + Duration::days(20),
    };
    let leaf = testpki::issue(&inter, "Author", KeyKind::EcP256, false, leaf_validity);
    let ks = Keystore::from_files(vec![("r".into(), root.cert.to_pem().unwrap())]).unwrap();
    let verifier = ChainVerifier::new(Arc::new(ks));
    let pem = testpki::pem(&[&inter.cert, &leaf.cert]);
    match verifier.verify(&pem, Utc::now()) {
        Err(ChainError::Expired { subject, .. }) => assert!(subject.contains("Inter")),
        other => panic!("{other:?}"),
    }
    // Ten days ago the intermediate was valid: the same (cached) chain passes then.
    verifier
        .verify(&pem, Utc::now() - Duration::days(10))
        .unwrap();
    // Before the leaf's validity begins, the leaf is named.
    match verifier.verify(&pem, Utc::now() - Duration::days(25)) {
        Err(ChainError::NotYetValid { subject, .. }) => assert!(subject.contains("Author")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_chain_with_two_end_entities_is_refused() {
    let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
    let a = testpki::issue(&root, "A", KeyKind::EcP256, false, Validity::current());
    let b = testpki::issue(&root, "B", KeyKind::EcP256, false, Validity::current());
    let ks = Keystore::from_files(vec![("r".into(), root.cert.to_pem().unwrap())]).unwrap();
    let verifier = ChainVerifier::new(Arc::new(ks));
    assert!(matches!(
        verifier.verify(&testpki::pem(&[&a.cert, &b.cert]), Utc::now()),
        Err(ChainError::SeveralLeaves(_))
    ));
}

#[test]
fn a_leaf_certificate_cannot_act_as_a_ca() {
    let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
    let leaf = testpki::issue(&root, "Leaf", KeyKind::EcP256, false, Validity::current());
    let forged = testpki::issue(&leaf, "Forged", KeyKind::EcP256, false, Validity::current());
    let ks = Keystore::from_files(vec![("r".into(), root.cert.to_pem().unwrap())]).unwrap();
    let verifier = ChainVerifier::new(Arc::new(ks));
    match verifier.verify(&testpki::pem(&[&forged.cert, &leaf.cert]), Utc::now()) {
        Err(ChainError::Untrusted { reason, .. }) => assert!(reason.contains("CA"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn keystore_directory_loads_and_skips_hidden_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), read("certs/foo_ca.cert.pem")).unwrap();
    std::fs::write(dir.path().join(".ca.pem.tmp.1"), b"half-writ").unwrap();
    let ks = Keystore::load(dir.path()).unwrap();
    assert_eq!(ks.len(), 1);
    std::fs::write(
        dir.path().join("bad.pem"),
        b"-----BEGIN CERTIFICATE-----\nAAAA",
    )
    .unwrap();
    let err = Keystore::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("bad.pem"), "{err}");
    assert!(Keystore::load(&dir.path().join("missing"))
        .unwrap()
        .is_empty());
}
