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
    // The signature format and the chain are yagna's; the key check below is the bare
    // one, because foo_req is a TLS server certificate and may not sign manifests here
    // (see `yagna_foo_req_is_a_tls_certificate_and_may_not_sign_manifests`).
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
fn yagna_foo_req_is_a_tls_certificate_and_may_not_sign_manifests() {
    let verifier = ChainVerifier::new(keystore_of(&["certs/foo_ca.cert.pem"]));
    let data = read("signatures/data.json.base64");
    let good = b64(&read(
        "signatures/data.json.base64.foo_req_sign.sha256.base64",
    ));
    for (file, with_inter) in [
        ("certs/foo_inter_req-chain.cert.pem", false),
        ("goth-outbound/outbound_certificate.cert", true),
    ] {
        let mut pem = read(file);
        if with_inter {
            pem.extend(read("certs/foo_inter.cert.pem"));
        }
        let chain = verifier.verify(&pem, Utc::now()).unwrap();
        assert_eq!(chain.certs[0].short_name(), "Foo Req", "{file}");
        let err = chain
            .verify_signature(SignatureAlgorithm::Sha256, &data, &good)
            .unwrap_err();
        assert_eq!(
            err,
            SignatureError::CertUsage(UsageError {
                subject: "Foo Req".into(),
                problem: UsageProblem::ExtendedKeyUsage(vec!["serverAuth"]),
            }),
            "{file}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with("certificate `Foo Req` may not sign manifests: its extendedKeyUsage lacks codeSigning (it has serverAuth); issue the author a leaf certificate with extendedKeyUsage codeSigning"),
            "{message}"
        );
    }
    // Its keyUsage alone would do (digitalSignature, keyEncipherment); yagna's CAs carry
    // keyUsage digitalSignature, keyCertSign, cRLSign and no extendedKeyUsage.
    for file in [
        "certs/foo_ca.cert.pem",
        "certs/foo_inter.cert.pem",
        "certs/dummy_inter.cert.pem",
    ] {
        let cert = parse_certificates(&read(file)).unwrap().remove(0);
        check_signer_usage(&cert).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[test]
fn signer_usage_rule_on_generated_leaves() {
    use crate::testpki::LeafUsage;
    let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
    let leaf = |usage: LeafUsage| {
        testpki::issue_leaf(
            &root,
            "Author",
            KeyKind::EcP256,
            Validity::current(),
            &usage,
        )
        .cert
    };
    let ok = [
        LeafUsage::unrestricted(),
        LeafUsage::signing(),
        LeafUsage::key_usage(&["digitalSignature", "keyAgreement"]),
        LeafUsage::extended_key_usage(&["codeSigning"]),
        LeafUsage::extended_key_usage(&["anyExtendedKeyUsage"]),
        LeafUsage::extended_key_usage(&["1.3.6.1.4.1.55555.1", "codeSigning"]),
    ];
    for usage in ok {
        check_signer_usage(&leaf(usage.clone())).unwrap_or_else(|e| panic!("{usage:?}: {e}"));
    }
    let refused = [
        (
            LeafUsage::key_usage(&["keyAgreement"]),
            UsageProblem::KeyUsage(vec!["keyAgreement"]),
        ),
        (
            LeafUsage::key_usage(&["nonRepudiation", "keyEncipherment"]),
            UsageProblem::KeyUsage(vec!["nonRepudiation", "keyEncipherment"]),
        ),
        (
            LeafUsage::extended_key_usage(&["serverAuth"]),
            UsageProblem::ExtendedKeyUsage(vec!["serverAuth"]),
        ),
        (
            LeafUsage::extended_key_usage(&["clientAuth", "emailProtection"]),
            UsageProblem::ExtendedKeyUsage(vec!["clientAuth", "emailProtection"]),
        ),
        (
            LeafUsage::extended_key_usage(&["1.3.6.1.4.1.55555.1"]),
            UsageProblem::ExtendedKeyUsage(vec![]),
        ),
        (
            LeafUsage {
                key_usage: Some(vec!["keyAgreement"]),
                extended_key_usage: Some(vec!["serverAuth"]),
            },
            UsageProblem::KeyUsage(vec!["keyAgreement"]),
        ),
    ];
    for (usage, problem) in refused {
        let err = check_signer_usage(&leaf(usage.clone())).unwrap_err();
        assert_eq!(err.subject, "Author", "{usage:?}");
        assert_eq!(err.problem, problem, "{usage:?}");
    }
    let unknown = check_signer_usage(&leaf(LeafUsage::extended_key_usage(&[
        "1.3.6.1.4.1.55555.1",
    ])))
    .unwrap_err()
    .to_string();
    assert!(
        unknown.contains("it has only purposes other than codeSigning and anyExtendedKeyUsage"),
        "{unknown}"
    );
}

#[test]
fn a_chain_verifies_but_its_signature_does_not_count_when_the_leaf_may_not_sign() {
    use crate::testpki::LeafUsage;
    let root = testpki::root("Root", KeyKind::EcP256, Validity::current());
    let ks = Keystore::from_files(vec![("r".into(), root.cert.to_pem().unwrap())]).unwrap();
    let verifier = ChainVerifier::new(Arc::new(ks));
    let ecdh = testpki::issue_leaf(
        &root,
        "ECDH Key",
        KeyKind::EcP256,
        Validity::current(),
        &LeafUsage::key_usage(&["keyAgreement"]),
    );
    let sig = testpki::sign(&ecdh.key, MessageDigest::sha256(), b"bWFuaWZlc3Q=");
    let chain = verifier
        .verify(&testpki::pem(&[&ecdh.cert]), Utc::now())
        .unwrap();
    // The signature is mathematically valid, and still refused, on every (cached) call.
    verify_signature(
        &chain.leaf_key,
        SignatureAlgorithm::Sha256,
        b"bWFuaWZlc3Q=",
        &sig,
    )
    .unwrap();
    for _ in 0..2 {
        let chain = verifier
            .verify(&testpki::pem(&[&ecdh.cert]), Utc::now())
            .unwrap();
        match chain.verify_signature(SignatureAlgorithm::Sha256, b"bWFuaWZlc3Q=", &sig) {
            Err(SignatureError::CertUsage(e)) => {
                assert_eq!(e.problem, UsageProblem::KeyUsage(vec!["keyAgreement"]));
                assert_eq!(
                    e.to_string(),
                    "certificate `ECDH Key` may not sign manifests: its keyUsage lacks digitalSignature (it has keyAgreement); issue the author a leaf certificate with keyUsage digitalSignature"
                );
            }
            other => panic!("{other:?}"),
        }
    }
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
            chain
                .verify_signature(alg, b"bWFuaWZlc3Q=", &sig)
                .unwrap_or_else(|e| panic!("{kind:?} {alg:?}: {e}"));
            assert_eq!(
                chain.verify_signature(alg, b"bWFuaWZlc3Q!", &sig),
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
    // A temp whose writer died after writing it whole, before the rename: still not a
    // certificate of the keystore.
    std::fs::write(
        dir.path().join(".inter.pem.tmp.4242"),
        read("certs/foo_inter.cert.pem"),
    )
    .unwrap();
    let ks = Keystore::load(dir.path()).unwrap();
    assert_eq!(ks.len(), 1);
    assert_eq!(ks.certs().next().unwrap().info.short_name(), "Foo Co");
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

/// Found by fuzzing (`fuzz/`, target `certs`): a certificate whose `notBefore` openssl
/// parses but cannot compare (a UTCTime with a `+` in the month) panicked while its dates
/// were read, in the keystore and in chain verification alike. Such a certificate is now
/// never valid, and a chain with it is refused with an error, not a panic.
#[test]
fn a_malformed_validity_time_is_never_valid_and_does_not_panic() {
    let pem = parse_certificates(&read("certs/foo_req.cert.pem")).unwrap();
    let mut der = pem[0].to_der().unwrap();
    let at = der
        .windows(15)
        .position(|w| w[0] == 0x17 && w[1] == 0x0d && w[14] == b'Z')
        .expect("a UTCTime notBefore");
    der[2 + at + 2] = b'+'; // YY+M: the month's first digit
    let certs = parse_certificates(&der).expect("openssl still parses the certificate");
    let info = CertInfo::of(&certs[0]);
    assert_eq!(info.not_before, chrono::DateTime::<Utc>::MAX_UTC);
    assert!(!info.id.is_empty());

    assert!(matches!(
        Keystore::check_validity(&certs[0], Utc::now()),
        Err(KeystoreError::NotYetValid { .. })
    ));
    Keystore::from_files(vec![(PathBuf::from("bad.der"), der.clone())])
        .expect("loading does not judge validity, and must not panic either");

    let ks = keystore_of(&["certs/foo_ca.cert.pem", "certs/foo_inter.cert.pem"]);
    let verifier = ChainVerifier::new(ks);
    assert!(verifier.verify(&der, Utc::now()).is_err());
}
