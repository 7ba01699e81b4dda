//! The decision engine: every reason code this stage can give, and the accept paths.

use certs::testpki::{self, KeyKind, Validity};
use chrono::{Duration, Utc};
use policies::rules::CertRule;
use policies::whitelist::{DomainPattern, PatternMatch};
use policies::{Demand, MatchedRule, Mode, Platform, Rules, Whitelist};
use serde_json::json;

use crate::util::{b64, codes, judge, manifest, Pki, Signed, PEER};

fn audited(rules: &mut Rules, id: String, mode: Mode) {
    rules.outbound.audited_payload.insert(
        id,
        CertRule {
            mode,
            description: String::new(),
        },
    );
}

fn whitelist(hosts: &[&str]) -> Whitelist {
    Whitelist {
        patterns: hosts
            .iter()
            .map(|h| DomainPattern {
                domain: h.to_string(),
                match_: PatternMatch::Strict,
            })
            .collect(),
    }
}

#[test]
fn audited_payload_accepts_signed_manifests_for_every_key_kind() {
    for kind in [KeyKind::Rsa2048, KeyKind::EcP256, KeyKind::EcP384] {
        let pki = Pki::new(kind);
        let mut rules = Rules::default();
        rules.outbound.everyone = Mode::None;
        audited(&mut rules, Pki::id(&pki.inter), Mode::All);
        let j = judge(rules, &Whitelist::default(), &[&pki.root]);
        let s = Signed::new(
            &manifest(&["https://api.example.com"]),
            &pki.leaf,
            pki.chain(),
        );
        let v = j.judge(&s.demand(Some(PEER)), Utc::now());
        assert!(v.is_accept(), "{kind:?}: {v:?}");
        match &v.matched_rule {
            Some(MatchedRule::AuditedPayload { cert_id, mode, .. }) => {
                assert_eq!(cert_id, &Pki::id(&pki.inter));
                assert_eq!(*mode, Mode::All);
            }
            other => panic!("{other:?}"),
        }
        // The repeat demand hits the caches and gets the same answer.
        assert_eq!(j.judge(&s.demand(Some(PEER)), Utc::now()), v);
    }
}

#[test]
fn the_first_certificate_with_a_rule_decides() {
    let pki = Pki::new(KeyKind::EcP256);
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::None;
    audited(&mut rules, Pki::id(&pki.root), Mode::All);
    audited(&mut rules, Pki::id(&pki.leaf), Mode::None);
    let j = judge(rules, &Whitelist::default(), &[&pki.root]);
    let s = Signed::new(
        &manifest(&["https://api.example.com"]),
        &pki.leaf,
        pki.chain(),
    );
    let v = j.judge(&s.demand(None), Utc::now());
    assert_eq!(
        codes(&v),
        ["outbound-rule-none", "outbound-rule-none"],
        "{v:?}"
    );
    assert!(v.reasons[0].message.contains("Test Author"), "{v:?}");
}

#[test]
fn tampered_manifest_and_wrong_signer_are_signature_invalid() {
    let pki = Pki::new(KeyKind::Rsa2048);
    let j = judge(Rules::default(), &Whitelist::default(), &[&pki.root]);
    let mut s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    s.manifest_b64 = b64(manifest(&["https://evil.example.com"])
        .to_string()
        .as_bytes());
    // The tampered manifest's own request is judged too: the requestor learns both.
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["signature-invalid", "url-not-whitelisted"]
    );

    let other = testpki::issue(
        &pki.inter,
        "Someone Else",
        KeyKind::Rsa2048,
        false,
        Validity::current(),
    );
    let s = Signed::new(&manifest(&[]), &other.key_holder(), pki.chain());
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["signature-invalid"]
    );

    let mut s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    s.sig_b64 = "not base64!".into();
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["signature-invalid"]
    );
}

trait KeyHolder {
    fn key_holder(&self) -> testpki::Issued;
}
impl KeyHolder for testpki::Issued {
    fn key_holder(&self) -> testpki::Issued {
        testpki::Issued {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

#[test]
fn unsupported_algorithm() {
    let pki = Pki::new(KeyKind::EcP256);
    let j = judge(Rules::default(), &Whitelist::default(), &[&pki.root]);
    let mut s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    s.alg = "md5".into();
    let v = j.judge(&s.demand(None), Utc::now());
    assert_eq!(codes(&v), ["unsupported-algorithm"]);
    assert!(v.reasons[0].message.contains("md5"));
    let d = Demand {
        signature_algorithm: None,
        ..s.demand(None)
    };
    assert_eq!(codes(&j.judge(&d, Utc::now())), ["unsupported-algorithm"]);
}

#[test]
fn untrusted_expired_and_future_chains() {
    let pki = Pki::new(KeyKind::EcP256);
    let stranger = testpki::root("Stranger CA", KeyKind::EcP256, Validity::current());
    let j = judge(Rules::default(), &Whitelist::default(), &[&stranger]);
    let s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["cert-chain-untrusted"]
    );

    let j = judge(Rules::default(), &Whitelist::default(), &[&pki.root]);
    let expired_leaf = testpki::issue(
        &pki.inter,
        "Old Author",
        KeyKind::EcP256,
        false,
        Validity::expired(),
    );
    let s = Signed::new(
        &manifest(&[]),
        &expired_leaf,
        testpki::pem(&[&expired_leaf.cert, &pki.inter.cert]),
    );
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["cert-expired"]
    );

    let expired_inter = testpki::issue(
        &pki.root,
        "Old Inter",
        KeyKind::EcP256,
        true,
        Validity::expired(),
    );
    let leaf = testpki::issue(
        &expired_inter,
        "Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let s = Signed::new(
        &manifest(&[]),
        &leaf,
        testpki::pem(&[&leaf.cert, &expired_inter.cert]),
    );
    let v = j.judge(&s.demand(None), Utc::now());
    assert_eq!(codes(&v), ["cert-expired"]);
    assert!(v.reasons[0].message.contains("Old Inter"), "{v:?}");

    let future = testpki::issue(
        &pki.inter,
        "Future Author",
        KeyKind::EcP256,
        false,
        Validity::future(),
    );
    let s = Signed::new(
        &manifest(&[]),
        &future,
        testpki::pem(&[&future.cert, &pki.inter.cert]),
    );
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["cert-not-yet-valid"]
    );
}

#[test]
fn manifest_time_and_structure_codes() {
    let j = judge(Rules::default(), &Whitelist::default(), &[]);
    let m = b64(manifest(&[]).to_string().as_bytes());
    let d = Demand {
        manifest_base64: Some(&m),
        ..Default::default()
    };
    assert!(j.judge(&d, Utc::now()).is_accept());
    let late = chrono::DateTime::parse_from_rfc3339("2100-01-02T00:00:00Z")
        .unwrap()
        .to_utc();
    assert_eq!(codes(&j.judge(&d, late)), ["manifest-expired"]);
    let early = chrono::DateTime::parse_from_rfc3339("2023-12-31T23:00:00Z")
        .unwrap()
        .to_utc();
    assert_eq!(codes(&j.judge(&d, early)), ["manifest-not-yet-valid"]);

    let mut bad = manifest(&[]);
    bad["payload"][0]["hash"] = json!("sha3:1234");
    let bad = b64(bad.to_string().as_bytes());
    let v = j.judge(
        &Demand {
            manifest_base64: Some(&bad),
            ..Default::default()
        },
        Utc::now(),
    );
    assert_eq!(codes(&v), ["manifest-invalid"]);
    assert!(v.reasons[0].message.contains("payload[0].hash"), "{v:?}");
}

#[test]
fn platform_unsupported() {
    let j = judge(Rules::default(), &Whitelist::default(), &[]).with_host_platform(Platform {
        arch: "riscv64".into(),
        os: "linux".into(),
        os_version: None,
    });
    let m = b64(manifest(&[]).to_string().as_bytes());
    let v = j.judge(
        &Demand {
            manifest_base64: Some(&m),
            ..Default::default()
        },
        Utc::now(),
    );
    assert_eq!(codes(&v), ["platform-unsupported"]);
    assert!(v.reasons[0].message.contains("x86_64/linux"), "{v:?}");
}

/// The provider's host fetches payloads for the requestor, so a manifest may not point it
/// at its own files (`file:///etc/…`, `file:///dev/zero`) or at anything but http(s).
#[test]
fn payload_urls_other_than_http_and_https_are_refused() {
    let j = judge(Rules::default(), &Whitelist::default(), &[]);
    for url in [
        "file:///dev/zero",
        "FILE:///etc/hostname",
        "oci://registry/app:1",
    ] {
        let mut m = manifest(&[]);
        m["payload"][0]["urls"] = serde_json::json!(["https://images.example.com/a.tar", url]);
        let m = b64(m.to_string().as_bytes());
        let v = j.judge(
            &Demand {
                manifest_base64: Some(&m),
                ..Default::default()
            },
            Utc::now(),
        );
        assert_eq!(codes(&v), ["payload-url-refused"], "{url}");
        assert!(v.reasons[0].message.contains("payload[0].urls[1]"), "{v:?}");
    }
}

#[test]
fn script_with_a_broken_regex_is_rejected_at_negotiation() {
    let j = judge(Rules::default(), &Whitelist::default(), &[]);
    let mut m = manifest(&[]);
    m["compManifest"]["script"] = json!({"commands": ["run /bin/(date"], "match": "regex"});
    let m = b64(m.to_string().as_bytes());
    let v = j.judge(
        &Demand {
            manifest_base64: Some(&m),
            ..Default::default()
        },
        Utc::now(),
    );
    assert_eq!(codes(&v), ["script-invalid"]);
    assert!(v.reasons[0].message.contains("(date"), "{v:?}");
}

#[test]
fn whitelist_mode_is_strict_about_hosts() {
    let j = judge(Rules::default(), &whitelist(&["api.example.com"]), &[]);
    let ok = b64(
        manifest(&["https://api.example.com/v1", "http://API.example.com:8080"])
            .to_string()
            .as_bytes(),
    );
    let v = j.judge(
        &Demand {
            manifest_base64: Some(&ok),
            ..Default::default()
        },
        Utc::now(),
    );
    assert!(v.is_accept(), "{v:?}");
    assert_eq!(
        v.matched_rule,
        Some(MatchedRule::Everyone {
            mode: Mode::Whitelist
        })
    );
    for evil in [
        "https://evil-api.example.com",
        "https://api.example.com.evil.net",
        "https://example.com",
    ] {
        let m = b64(manifest(&["https://api.example.com", evil])
            .to_string()
            .as_bytes());
        let v = j.judge(
            &Demand {
                manifest_base64: Some(&m),
                ..Default::default()
            },
            Utc::now(),
        );
        assert_eq!(codes(&v), ["url-not-whitelisted"], "{evil}");
        assert!(v.reasons[0].message.contains(evil), "{v:?}");
        assert!(
            !v.reasons[0].message.contains("https://api.example.com/,"),
            "{v:?}"
        );
    }
}

#[test]
fn unrestricted_needs_mode_all() {
    let mut m = manifest(&[]);
    m["compManifest"]["net"] =
        json!({"inet": {"out": {"protocols": ["https"], "unrestricted": {"urls": true}}}});
    let m = b64(m.to_string().as_bytes());
    let d = Demand {
        manifest_base64: Some(&m),
        ..Default::default()
    };
    let j = judge(Rules::default(), &whitelist(&["api.example.com"]), &[]);
    assert_eq!(codes(&j.judge(&d, Utc::now())), ["url-not-whitelisted"]);
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::All;
    assert!(judge(rules, &Whitelist::default(), &[])
        .judge(&d, Utc::now())
        .is_accept());
}

#[test]
fn outbound_disabled_and_rule_none() {
    let m = b64(manifest(&["https://api.example.com"])
        .to_string()
        .as_bytes());
    let d = Demand {
        manifest_base64: Some(&m),
        ..Default::default()
    };
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::All;
    rules.outbound.enabled = false;
    assert_eq!(
        codes(&judge(rules, &Whitelist::default(), &[]).judge(&d, Utc::now())),
        ["outbound-disabled"]
    );
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::None;
    assert_eq!(
        codes(&judge(rules.clone(), &Whitelist::default(), &[]).judge(&d, Utc::now())),
        ["outbound-rule-none"]
    );
    // An unsigned demand under an audited-payload rule learns that a signature would help.
    audited(&mut rules, "a".repeat(128), Mode::All);
    assert_eq!(
        codes(&judge(rules, &Whitelist::default(), &[]).judge(&d, Utc::now())),
        ["signature-missing", "outbound-rule-none"]
    );
    // A manifest without outbound needs no outbound rule at all.
    let mut rules = Rules::default();
    rules.outbound.enabled = false;
    let quiet = b64(manifest(&[]).to_string().as_bytes());
    let v = judge(rules, &Whitelist::default(), &[]).judge(
        &Demand {
            manifest_base64: Some(&quiet),
            ..Default::default()
        },
        Utc::now(),
    );
    assert!(v.is_accept() && v.matched_rule.is_none(), "{v:?}");
}

#[test]
fn half_a_signature_is_signature_missing() {
    let pki = Pki::new(KeyKind::EcP256);
    let j = judge(Rules::default(), &Whitelist::default(), &[&pki.root]);
    let s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    let d = Demand {
        cert_chain_pem: None,
        ..s.demand(None)
    };
    assert_eq!(codes(&j.judge(&d, Utc::now())), ["signature-missing"]);
    let d = Demand {
        signature_base64: None,
        ..s.demand(None)
    };
    assert_eq!(codes(&j.judge(&d, Utc::now())), ["signature-missing"]);
}

#[test]
fn blacklist_and_allow_only_by_identity_and_certificate() {
    let pki = Pki::new(KeyKind::EcP256);
    let s = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    let other_peer = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK";

    let mut rules = Rules::default();
    rules.blacklist.identity.insert(PEER.into());
    let j = judge(rules.clone(), &Whitelist::default(), &[&pki.root]);
    assert_eq!(
        codes(&j.judge(&s.demand(Some(PEER)), Utc::now())),
        ["blacklisted"]
    );
    assert!(j.judge(&s.demand(Some(other_peer)), Utc::now()).is_accept());
    rules.blacklist.enabled = false;
    let j = judge(rules, &Whitelist::default(), &[&pki.root]);
    assert!(j.judge(&s.demand(Some(PEER)), Utc::now()).is_accept());

    let mut rules = Rules::default();
    rules.blacklist.certified.insert(Pki::id(&pki.inter));
    let j = judge(rules, &Whitelist::default(), &[&pki.root]);
    let v = j.judge(&s.demand(Some(other_peer)), Utc::now());
    assert_eq!(codes(&v), ["blacklisted"]);
    assert!(v.reasons[0].message.contains("Test Inter"), "{v:?}");

    let mut rules = Rules::default();
    rules.allow_only.enabled = true;
    rules.allow_only.identity.insert(PEER.into());
    let j = judge(rules.clone(), &Whitelist::default(), &[&pki.root]);
    assert!(j.judge(&s.demand(Some(PEER)), Utc::now()).is_accept());
    assert_eq!(
        codes(&j.judge(&s.demand(Some(other_peer)), Utc::now())),
        ["not-allow-listed"]
    );
    let unsigned = Demand {
        manifest_base64: Some(&s.manifest_b64),
        node_id: Some(other_peer),
        ..Default::default()
    };
    assert_eq!(codes(&j.judge(&unsigned, Utc::now())), ["not-allow-listed"]);

    rules.allow_only.certified.insert(Pki::id(&pki.leaf));
    let j = judge(rules, &Whitelist::default(), &[&pki.root]);
    assert!(j.judge(&s.demand(Some(other_peer)), Utc::now()).is_accept());
    // The certificate counts only when the chain verifies: the same chain sent without a
    // valid signature does not get the requestor in.
    let mut forged = Signed::new(&manifest(&[]), &pki.leaf, pki.chain());
    forged.sig_b64 = b64(b"forged");
    let v = j.judge(&forged.demand(Some(other_peer)), Utc::now());
    assert_eq!(codes(&v), ["signature-invalid", "not-allow-listed"]);
}

#[test]
fn independent_problems_are_all_reported() {
    let mut rules = Rules::default();
    rules.blacklist.identity.insert(PEER.into());
    rules.outbound.everyone = Mode::None;
    let j = judge(rules, &Whitelist::default(), &[]);
    let m = b64(manifest(&["https://api.example.com"])
        .to_string()
        .as_bytes());
    let v = j.judge(
        &Demand {
            manifest_base64: Some(&m),
            node_id: Some(PEER),
            ..Default::default()
        },
        Utc::now() + Duration::days(365 * 100),
    );
    assert_eq!(
        codes(&v),
        ["blacklisted", "manifest-expired", "outbound-rule-none"]
    );
}
