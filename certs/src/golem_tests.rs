//! Golem certificates and node descriptors: yagna's vectors and generated chains.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::golem::{
    canonical_json, certificate_id, GolemError, NodeDescriptor, OutboundPermission, Permissions,
    SignedCertificate,
};
use crate::testpki::golem::{certificate, descriptor, key, sign, to_bytes, yagna_key};

const ROOT_ID: &str = "80c84b2701126669966f46c1159cae89c58fb088e8bf94b318358fa4ca33ee56d8948511a397e5aba6aa5b88fff36f2541a91b133cde0fb816e8592b695c04c3";
const ZERO_NODE: &str = "0x0000000000000000000000000000000000000000";
const WIDE: (&str, &str) = ("2020-01-01T00:00:00Z", "2040-01-01T00:00:00Z");

fn vector(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/yagna/certs")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(vector(name)).unwrap()
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn now() -> DateTime<Utc> {
    at("2024-06-01T00:00:00Z")
}

fn cert(bytes: &[u8]) -> SignedCertificate {
    SignedCertificate::from_json(bytes).unwrap()
}

fn desc(bytes: &[u8]) -> NodeDescriptor {
    NodeDescriptor::from_json(bytes).unwrap()
}

#[test]
fn certificate_id_is_sha512_of_canonical_json_as_in_yagna_rules() {
    let root = cert(&read("root-certificate.signed.json"));
    assert_eq!(root.certificate.id, ROOT_ID);
    assert_eq!(root.certificate.display_name, "Example root cert");
    assert_eq!(
        root.certificate.email.as_deref(),
        Some("root-example@golem.network")
    );
    // The partner certificate embeds the same root; its chain ends there.
    let partner = cert(&read("partner-certificate.signed.json"));
    assert_eq!(partner.root().id, ROOT_ID);
    assert_ne!(partner.certificate.id, ROOT_ID);
    assert_eq!(partner.chain().count(), 2);
}

#[test]
fn canonical_json_sorts_keys_by_utf16_and_escapes_like_jcs() {
    let v = json!({"b": [1, -2, true, null], "a": {"z": "x", "y": "é\"\\\n\u{1}\u{7f}/"}});
    assert_eq!(
        canonical_json(&v).unwrap(),
        "{\"a\":{\"y\":\"é\\\"\\\\\\n\\u0001\u{7f}/\",\"z\":\"x\"},\"b\":[1,-2,true,null]}"
    );
    // U+10000 is the surrogate pair D800 DC00 in UTF-16, which sorts before U+E000 there
    // although its UTF-8 bytes sort after.
    let v = json!({"\u{e000}": 1, "\u{10000}": 2});
    assert_eq!(
        canonical_json(&v).unwrap(),
        "{\"\u{10000}\":2,\"\u{e000}\":1}"
    );
    assert!(canonical_json(&json!({"n": 1.5})).is_err());
}

#[test]
fn yagna_certificates_verify_and_expired_ones_are_named() {
    cert(&read("root-certificate.signed.json"))
        .verify(now())
        .unwrap();
    cert(&read("partner-certificate.signed.json"))
        .verify(now())
        .unwrap();
    match cert(&read("golem.cert.expired.signed.json")).verify(now()) {
        Err(GolemError::Expired { subject, .. }) => assert!(subject.contains("Expired cert")),
        other => panic!("{other:?}"),
    }
    match cert(&read("golem.cert.not_yet_valid.signed.json")).verify(now()) {
        Err(GolemError::NotYetValid {
            subject,
            not_before,
        }) => {
            assert!(subject.contains("Not Expired signed by expired"));
            assert_eq!(not_before, at("2187-01-01T00:00:00Z"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn yagna_node_descriptors_behave_as_in_yagna() {
    let happy = desc(&read("node-descriptor-happy-path.signed.json"));
    happy.verify(ZERO_NODE, now()).unwrap();
    // 0x addresses compare without regard to case.
    happy
        .verify("0X0000000000000000000000000000000000000000", now())
        .unwrap();
    assert_eq!(
        happy.permissions,
        Permissions::Listed {
            outbound: Some(OutboundPermission::Urls(vec!["https://domain.com/"
                .parse()
                .unwrap()]))
        }
    );
    assert!(matches!(
        happy.verify(ZERO_NODE, at("2031-01-01T00:00:00Z")),
        Err(GolemError::Expired { .. })
    ));
    assert!(matches!(
        happy.verify(ZERO_NODE, at("2022-01-01T00:00:00Z")),
        Err(GolemError::NotYetValid { .. })
    ));

    match desc(&read("node-descriptor-different-node.signed.json")).verify(ZERO_NODE, now()) {
        Err(GolemError::NodeMismatch { descriptor, .. }) => {
            assert_eq!(descriptor, "0xdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef")
        }
        other => panic!("{other:?}"),
    }
    match desc(&read("node-descriptor-invalid-signature.signed.json")).verify(ZERO_NODE, now()) {
        Err(GolemError::SignatureInvalid { subject, signer }) => {
            assert!(subject.contains("node descriptor"), "{subject}");
            assert_eq!(signer, "Example partner cert");
        }
        other => panic!("{other:?}"),
    }
    // No permissions is a valid descriptor that grants nothing; the rule refuses it.
    let none = desc(&read("node-descriptor-no-permissions.signed.json"));
    none.verify(ZERO_NODE, now()).unwrap();
    assert_eq!(none.permissions, Permissions::Listed { outbound: None });
}

#[test]
fn tampering_with_any_level_breaks_its_signature() {
    let original: Value =
        serde_json::from_slice(&read("node-descriptor-happy-path.signed.json")).unwrap();
    // Widen the partner certificate's permissions: its signature (by the root) fails.
    let mut v = original.clone();
    v["signature"]["signer"]["certificate"]["permissions"] = json!("all");
    match desc(&to_bytes(&v)).verify(ZERO_NODE, now()) {
        Err(GolemError::SignatureInvalid { subject, signer }) => {
            assert_eq!(subject, "certificate `Example partner cert`");
            assert_eq!(signer, "Example root cert");
        }
        other => panic!("{other:?}"),
    }
    // Rebind the descriptor to another node: the descriptor's signature fails.
    let mut v = original.clone();
    v["nodeDescriptor"]["nodeId"] = json!("0x1111111111111111111111111111111111111111");
    assert!(matches!(
        desc(&to_bytes(&v)).verify("0x1111111111111111111111111111111111111111", now()),
        Err(GolemError::SignatureInvalid { .. })
    ));
    // Key order and whitespace are not part of what is signed.
    let compact = serde_json::to_vec(&original).unwrap();
    desc(&compact).verify(ZERO_NODE, now()).unwrap();
}

#[test]
fn yagna_partner_key_signs_descriptors_for_any_node() {
    // The vectors' private keys let us issue a fresh descriptor under the real partner
    // certificate (for a libp2p peer id, as our requestors have).
    let partner: Value = serde_json::from_slice(&read("partner-certificate.signed.json")).unwrap();
    let peer = "12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo";
    let d = sign(
        "nodeDescriptor",
        descriptor(
            peer,
            ("2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            json!({"outbound": "unrestricted"}),
        ),
        &yagna_key(&vector("partner-keypair.key")),
        partner,
    );
    let d = desc(&to_bytes(&d));
    d.verify(peer, now()).unwrap();
    // Peer ids are base58: case matters.
    assert!(matches!(
        d.verify(&peer.to_lowercase(), now()),
        Err(GolemError::NodeMismatch { .. })
    ));
}

/// A root (all/all) and an intermediate with the given usage and permissions.
fn chain(
    inter_usage: Value,
    inter_perms: Value,
    inter_validity: (&str, &str),
) -> (Value, openssl::pkey::PKey<openssl::pkey::Private>) {
    let root_key = key();
    let root = sign(
        "certificate",
        certificate("Gen Root", &root_key, WIDE, json!("all"), json!("all")),
        &root_key,
        json!("self"),
    );
    let inter_key = key();
    let inter = sign(
        "certificate",
        certificate(
            "Gen Inter",
            &inter_key,
            inter_validity,
            inter_usage,
            inter_perms,
        ),
        &root_key,
        root,
    );
    (inter, inter_key)
}

#[test]
fn a_child_cannot_escalate_permissions() {
    let urls = |u: &[&str]| json!({"outbound": {"urls": u}});
    let (inter, inter_key) = chain(
        json!(["signNode", "signCertificate"]),
        urls(&["https://a.example.com/"]),
        WIDE,
    );
    let inter_cert = cert(&to_bytes(&inter));
    inter_cert.verify(now()).unwrap();
    let node = "0x00000000000000000000000000000000000000aa";
    for (perms, ok) in [
        (urls(&["https://a.example.com/"]), true),
        (json!({}), true),
        (
            urls(&["https://a.example.com/", "https://b.example.com/"]),
            false,
        ),
        (json!({"outbound": "unrestricted"}), false),
        (json!("all"), false),
    ] {
        let d = sign(
            "nodeDescriptor",
            descriptor(node, WIDE, perms.clone()),
            &inter_key,
            inter.clone(),
        );
        let result = desc(&to_bytes(&d)).verify(node, now());
        if ok {
            result.unwrap_or_else(|e| panic!("{perms}: {e}"));
        } else {
            match result {
                Err(GolemError::PermissionsExceeded { signer, .. }) => {
                    assert_eq!(signer, "Gen Inter")
                }
                other => panic!("{perms}: {other:?}"),
            }
        }
        // The same escalation in a child certificate.
        let child_key = key();
        let child = sign(
            "certificate",
            certificate("Gen Child", &child_key, WIDE, json!("all"), perms.clone()),
            &inter_key,
            inter.clone(),
        );
        let result = cert(&to_bytes(&child)).verify(now());
        assert_eq!(result.is_ok(), ok, "{perms}: {result:?}");
    }
    // An intermediate with unrestricted outbound may grant any URL list, not `all`.
    let (inter, inter_key) = chain(
        json!(["signNode"]),
        json!({"outbound": "unrestricted"}),
        WIDE,
    );
    let d = sign(
        "nodeDescriptor",
        descriptor(node, WIDE, urls(&["https://x.example.com/"])),
        &inter_key,
        inter.clone(),
    );
    desc(&to_bytes(&d)).verify(node, now()).unwrap();
    let d = sign(
        "nodeDescriptor",
        descriptor(node, WIDE, json!("all")),
        &inter_key,
        inter,
    );
    assert!(matches!(
        desc(&to_bytes(&d)).verify(node, now()),
        Err(GolemError::PermissionsExceeded { .. })
    ));
}

#[test]
fn validity_must_nest_and_key_usage_must_allow_the_signature() {
    let node = "0x00000000000000000000000000000000000000aa";
    // The intermediate outlives the root (2040): refused even though "now" is inside both.
    let (inter, _) = chain(
        json!("all"),
        json!("all"),
        ("2021-01-01T00:00:00Z", "2041-01-01T00:00:00Z"),
    );
    match cert(&to_bytes(&inter)).verify(now()) {
        Err(GolemError::ValidityNotNested {
            subject, signer, ..
        }) => {
            assert_eq!(subject, "certificate `Gen Inter`");
            assert_eq!(signer, "Gen Root");
        }
        other => panic!("{other:?}"),
    }
    // A descriptor valid beyond its signer.
    let (inter, inter_key) = chain(
        json!(["signNode"]),
        json!("all"),
        ("2021-01-01T00:00:00Z", "2030-01-01T00:00:00Z"),
    );
    let d = sign(
        "nodeDescriptor",
        descriptor(
            node,
            ("2022-01-01T00:00:00Z", "2031-01-01T00:00:00Z"),
            json!({}),
        ),
        &inter_key,
        inter,
    );
    assert!(matches!(
        desc(&to_bytes(&d)).verify(node, now()),
        Err(GolemError::ValidityNotNested { .. })
    ));

    // A signer without signNode cannot sign descriptors…
    let (inter, inter_key) = chain(json!(["signCertificate"]), json!("all"), WIDE);
    let d = sign(
        "nodeDescriptor",
        descriptor(node, WIDE, json!({})),
        &inter_key,
        inter,
    );
    match desc(&to_bytes(&d)).verify(node, now()) {
        Err(GolemError::KeyUsage { signer, needed, .. }) => {
            assert_eq!(signer, "Gen Inter");
            assert_eq!(needed, "signNode");
        }
        other => panic!("{other:?}"),
    }
    // …and one without signCertificate cannot sign certificates.
    let (inter, inter_key) = chain(json!(["signNode"]), json!("all"), WIDE);
    let child_key = key();
    let child = sign(
        "certificate",
        certificate(
            "Gen Child",
            &child_key,
            WIDE,
            json!(["signNode"]),
            json!("all"),
        ),
        &inter_key,
        inter,
    );
    assert!(matches!(
        cert(&to_bytes(&child)).verify(now()),
        Err(GolemError::KeyUsage {
            needed: "signCertificate",
            ..
        })
    ));
}

#[test]
fn malformed_documents_name_what_is_wrong() {
    let bad = |bytes: &[u8]| match NodeDescriptor::from_json(bytes) {
        Err(GolemError::Malformed { what, detail }) => format!("{what}: {detail}"),
        other => panic!("{other:?}"),
    };
    assert!(bad(b"{not json").contains("not JSON"));
    let mut v: Value =
        serde_json::from_slice(&read("node-descriptor-happy-path.signed.json")).unwrap();
    v["nodeDescriptor"]["allowAll"] = json!(true);
    assert!(bad(&to_bytes(&v)).contains("unknown field `allowAll`"));
    let mut v: Value =
        serde_json::from_slice(&read("node-descriptor-happy-path.signed.json")).unwrap();
    v["signature"]["signer"] = json!("self");
    assert!(bad(&to_bytes(&v)).contains("must be signed by a certificate"));
    let mut v: Value =
        serde_json::from_slice(&read("node-descriptor-happy-path.signed.json")).unwrap();
    v["signature"]["signer"]["certificate"]["permissions"] = json!({"inbound": "all"});
    assert!(bad(&to_bytes(&v)).contains("unknown field `inbound`"));
    let mut v: Value =
        serde_json::from_slice(&read("node-descriptor-happy-path.signed.json")).unwrap();
    v["signature"]["value"] = json!("abcd");
    assert!(bad(&to_bytes(&v)).contains("128 hexadecimal digits"));
    // Another algorithm is unsupported, not malformed.
    let mut v: Value = serde_json::from_slice(&read("root-certificate.signed.json")).unwrap();
    v["signature"]["algorithm"]["hash"] = json!("sha256");
    assert!(matches!(
        SignedCertificate::from_json(&to_bytes(&v)),
        Err(GolemError::UnsupportedAlgorithm { .. })
    ));
    assert_eq!(
        certificate_id(&v["certificate"]).unwrap(),
        ROOT_ID,
        "the id covers the certificate object only"
    );
}

#[test]
fn keystore_holds_golem_certificates_beside_x509_and_refuses_corrupt_ones() {
    use crate::keystore::{Entry, Keystore, KeystoreError};
    use crate::testpki::{self, KeyKind, Validity};
    let ca = testpki::root("X Root", KeyKind::EcP256, Validity::current());
    let ks = Keystore::from_files(vec![
        (PathBuf::from("ca.pem"), ca.cert.to_pem().unwrap()),
        (
            PathBuf::from("root.signed.json"),
            read("root-certificate.signed.json"),
        ),
        (
            PathBuf::from("partner.signed.json"),
            read("partner-certificate.signed.json"),
        ),
    ])
    .unwrap();
    assert_eq!(ks.len(), 3);
    assert_eq!(
        ks.certs().count(),
        1,
        "golem certificates stay out of the X.509 store"
    );
    let root = ks.resolve_golem_prefix("80C84B").unwrap();
    assert_eq!(root.info.subject, "Example root cert");
    assert!(root.is_ca);
    let partner = ks.golem_certs().find(|c| c.info.id != ROOT_ID).unwrap();
    assert_eq!(partner.info.issuer, "Example root cert");
    assert!(partner.is_ca, "signNode makes it an issuer of descriptors");
    assert!(matches!(
        ks.resolve_any_prefix(ROOT_ID),
        Ok(Entry::Golem(_))
    ));
    let x509_id = crate::cert_id(&ca.cert);
    assert!(matches!(
        ks.resolve_any_prefix(&x509_id[..20]),
        Ok(Entry::X509(_))
    ));
    assert!(matches!(
        ks.resolve_golem_prefix(&x509_id[..20]),
        Err(KeystoreError::NoMatch(_))
    ));

    let mut corrupt: Value = serde_json::from_slice(&read("root-certificate.signed.json")).unwrap();
    corrupt["certificate"]["publicKey"]["key"] = json!("zz");
    match Keystore::from_files(vec![(PathBuf::from("bad.signed.json"), to_bytes(&corrupt))]) {
        Err(e @ KeystoreError::Golem { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("bad.signed.json") && text.contains("publicKey.key"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}
