//! The certificate whose key signed the manifest must be meant for signing: a keyUsage
//! extension must include digitalSignature, an extendedKeyUsage extension codeSigning or
//! anyExtendedKeyUsage.

use certs::testpki::KeyKind;
use certs::testpki::{self, LeafUsage, Validity};
use chrono::Utc;
use policies::rules::CertRule;
use policies::{MatchedRule, Mode, Rules, Whitelist};

use crate::util::{codes, judge, manifest, Pki, Signed, PEER};

/// A judge whose only grant is an audited-payload `all` rule on the test intermediate.
fn audited_judge(pki: &Pki) -> policies::Judge {
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::None;
    rules.outbound.audited_payload.insert(
        Pki::id(&pki.inter),
        CertRule {
            mode: Mode::All,
            description: String::new(),
        },
    );
    judge(rules, &Whitelist::default(), &[&pki.root])
}

fn signed_by(pki: &Pki, usage: &LeafUsage, kind: KeyKind) -> (testpki::Issued, Signed) {
    let leaf = testpki::issue_leaf(&pki.inter, "Usage Author", kind, Validity::current(), usage);
    let s = Signed::new(
        &manifest(&["https://api.example.com"]),
        &leaf,
        testpki::pem(&[&leaf.cert, &pki.inter.cert]),
    );
    (leaf, s)
}

#[test]
fn a_leaf_without_digital_signature_or_code_signing_cannot_sign_a_manifest() {
    let pki = Pki::new(KeyKind::EcP256);
    let j = audited_judge(&pki);
    let refused: &[(LeafUsage, &[&str])] = &[
        // (usage, words the message must contain)
        (
            LeafUsage::key_usage(&["keyAgreement"]),
            &["keyUsage", "digitalSignature", "keyAgreement"],
        ),
        (
            LeafUsage::key_usage(&["keyEncipherment", "dataEncipherment"]),
            &["keyUsage", "digitalSignature", "keyEncipherment"],
        ),
        (
            LeafUsage::key_usage(&["nonRepudiation"]),
            &["keyUsage", "digitalSignature"],
        ),
        (
            LeafUsage::extended_key_usage(&["serverAuth"]),
            &["extendedKeyUsage", "codeSigning", "serverAuth"],
        ),
        (
            LeafUsage::extended_key_usage(&["serverAuth", "clientAuth"]),
            &["extendedKeyUsage", "codeSigning", "clientAuth"],
        ),
        // Purposes openssl does not know are refused too: fail closed.
        (
            LeafUsage::extended_key_usage(&["1.3.6.1.4.1.55555.1"]),
            &["extendedKeyUsage", "codeSigning"],
        ),
        // yagna's foo_req carries exactly this.
        (
            LeafUsage {
                key_usage: Some(vec!["digitalSignature", "keyEncipherment"]),
                extended_key_usage: Some(vec!["serverAuth"]),
            },
            &["extendedKeyUsage", "serverAuth"],
        ),
        (
            LeafUsage {
                key_usage: Some(vec!["keyAgreement"]),
                extended_key_usage: Some(vec!["codeSigning"]),
            },
            &["keyUsage", "digitalSignature"],
        ),
    ];
    for (usage, words) in refused {
        let (_, s) = signed_by(&pki, usage, KeyKind::EcP256);
        let v = j.judge(&s.demand(Some(PEER)), Utc::now());
        assert!(!v.is_accept(), "{usage:?}: {v:?}");
        assert_eq!(v.matched_rule, None, "{usage:?}");
        // The audited-payload rule cannot use the chain; the everyone rule says none.
        assert_eq!(
            codes(&v),
            ["cert-usage-invalid", "outbound-rule-none"],
            "{usage:?}: {v:?}"
        );
        let message = &v.reasons[0].message;
        assert!(message.contains("Usage Author"), "{message}");
        for w in *words {
            assert!(
                message.contains(w),
                "{usage:?}: `{w}` missing in: {message}"
            );
        }
        // The repeat demand (cached chain) gets the same answer.
        assert_eq!(j.judge(&s.demand(Some(PEER)), Utc::now()), v);
    }
}

#[test]
fn a_leaf_meant_for_signing_is_accepted() {
    let pki = Pki::new(KeyKind::EcP256);
    let j = audited_judge(&pki);
    let accepted = [
        LeafUsage::signing(),
        LeafUsage::key_usage(&["digitalSignature", "keyAgreement"]),
        LeafUsage::extended_key_usage(&["codeSigning"]),
        LeafUsage::extended_key_usage(&["serverAuth", "codeSigning"]),
        LeafUsage::extended_key_usage(&["anyExtendedKeyUsage"]),
        LeafUsage {
            key_usage: Some(vec!["digitalSignature"]),
            extended_key_usage: Some(vec!["codeSigning"]),
        },
        LeafUsage::unrestricted(),
    ];
    for usage in &accepted {
        let (_, s) = signed_by(&pki, usage, KeyKind::EcP256);
        let v = j.judge(&s.demand(Some(PEER)), Utc::now());
        assert!(v.is_accept(), "{usage:?}: {v:?}");
        assert!(
            matches!(v.matched_rule, Some(MatchedRule::AuditedPayload { .. })),
            "{usage:?}: {v:?}"
        );
    }
    // RSA keys follow the same rule.
    let pki = Pki::new(KeyKind::Rsa2048);
    let j = audited_judge(&pki);
    let (_, s) = signed_by(
        &pki,
        &LeafUsage::extended_key_usage(&["codeSigning"]),
        KeyKind::Rsa2048,
    );
    assert!(j.judge(&s.demand(None), Utc::now()).is_accept());
    let (_, s) = signed_by(
        &pki,
        &LeafUsage::extended_key_usage(&["serverAuth"]),
        KeyKind::Rsa2048,
    );
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["cert-usage-invalid", "outbound-rule-none"]
    );
}

#[test]
fn a_leaf_that_may_not_sign_does_not_count_for_allow_only_either() {
    let pki = Pki::new(KeyKind::EcP256);
    let mut rules = Rules::default();
    rules.allow_only.enabled = true;
    rules.allow_only.certified.insert(Pki::id(&pki.inter));
    let j = judge(rules, &Whitelist::default(), &[&pki.root]);
    let leaf = testpki::issue_leaf(
        &pki.inter,
        "TLS Server",
        KeyKind::EcP256,
        Validity::current(),
        &LeafUsage::extended_key_usage(&["serverAuth"]),
    );
    let s = Signed::new(
        &manifest(&[]),
        &leaf,
        testpki::pem(&[&leaf.cert, &pki.inter.cert]),
    );
    assert_eq!(
        codes(&j.judge(&s.demand(None), Utc::now())),
        ["cert-usage-invalid", "not-allow-listed"]
    );
}
