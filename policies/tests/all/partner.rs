//! The partner outbound rule: Golem node descriptors bound to the requestor's node id.

use certs::testpki::golem::{certificate, descriptor, key, sign, to_bytes, yagna_key};
use chrono::{DateTime, Utc};
use policies::rules::CertRule;
use policies::verdict::url_covers;
use policies::whitelist::{DomainPattern, PatternMatch};
use policies::{Demand, Judge, MatchedRule, Mode, Rules, Verdict, Whitelist};
use serde_json::{json, Value};

use crate::util::{b64, codes, judge, manifest, yagna, PEER};

const ROOT_ID: &str = "80c84b2701126669966f46c1159cae89c58fb088e8bf94b318358fa4ca33ee56d8948511a397e5aba6aa5b88fff36f2541a91b133cde0fb816e8592b695c04c3";
const ZERO_NODE: &str = "0x0000000000000000000000000000000000000000";

fn now() -> DateTime<Utc> {
    at("2024-06-01T00:00:00Z")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn vector(name: &str) -> Vec<u8> {
    std::fs::read(yagna(&format!("certs/{name}"))).unwrap()
}

fn partner_id() -> String {
    let v: Value = serde_json::from_slice(&vector("partner-certificate.signed.json")).unwrap();
    certs::golem::certificate_id(&v["certificate"]).unwrap()
}

/// `everyone` refuses everything, so only a partner rule can grant outbound.
fn rules_with(partners: &[(&str, Mode)]) -> Rules {
    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::None;
    for (id, mode) in partners {
        rules.outbound.partner.insert(
            id.to_string(),
            CertRule {
                mode: *mode,
                description: String::new(),
            },
        );
    }
    rules
}

fn judge_with(rules: Rules, whitelist: &Whitelist) -> Judge {
    judge(rules, whitelist, &[])
}

fn check(
    j: &Judge,
    manifest: &Value,
    node: Option<&str>,
    descriptor: Option<&[u8]>,
    at: DateTime<Utc>,
) -> Verdict {
    let m = b64(manifest.to_string().as_bytes());
    j.judge(
        &Demand {
            manifest_base64: Some(&m),
            node_id: node,
            node_descriptor: descriptor,
            ..Default::default()
        },
        at,
    )
}

/// Created early enough for the not-yet-valid case at 2022.
fn wants_domain() -> Value {
    let mut m = manifest(&["https://domain.com/"]);
    m["createdAt"] = json!("2020-01-01T00:00:00Z");
    m
}

#[test]
fn yagna_happy_path_descriptor_is_accepted_under_a_rule_on_the_root_or_the_partner() {
    let happy = vector("node-descriptor-happy-path.signed.json");
    let j = judge_with(rules_with(&[(ROOT_ID, Mode::All)]), &Whitelist::default());
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    assert!(v.is_accept(), "{v:?}");
    assert_eq!(
        v.matched_rule,
        Some(MatchedRule::Partner {
            cert_id: ROOT_ID.into(),
            subject: "Example root cert".into(),
            mode: Mode::All
        })
    );
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["matched_rule"]["rule"], "partner");

    // The signer's certificate comes first in the chain: its rule decides over the root's.
    let partner = partner_id();
    let j = judge_with(
        rules_with(&[(ROOT_ID, Mode::All), (&partner, Mode::None)]),
        &Whitelist::default(),
    );
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    assert_eq!(
        codes(&v),
        ["outbound-rule-none", "outbound-rule-none"],
        "{v:?}"
    );
    assert!(
        v.reasons[0].message.contains("Example partner cert"),
        "{v:?}"
    );
    let j = judge_with(rules_with(&[(&partner, Mode::All)]), &Whitelist::default());
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    match &v.matched_rule {
        Some(MatchedRule::Partner {
            cert_id, subject, ..
        }) => {
            assert_eq!(cert_id, &partner);
            assert_eq!(subject, "Example partner cert");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn yagna_refused_descriptors_get_their_codes() {
    let j = judge_with(rules_with(&[(ROOT_ID, Mode::All)]), &Whitelist::default());
    let refused = |name: &str, at: DateTime<Utc>| {
        let v = check(
            &j,
            &wants_domain(),
            Some(ZERO_NODE),
            Some(&vector(name)),
            at,
        );
        assert!(!v.is_accept(), "{name}: {v:?}");
        // The partner rule's reason, then the everyone rule's.
        assert_eq!(v.reasons[1].code.as_str(), "outbound-rule-none", "{v:?}");
        assert!(v.reasons[0].message.starts_with("partner rule"), "{v:?}");
        (v.reasons[0].code.as_str(), v.reasons[0].message.clone())
    };
    let (code, msg) = refused("node-descriptor-different-node.signed.json", now());
    assert_eq!(code, "node-id-mismatch");
    assert!(msg.contains("0xdeadbeef"), "{msg}");
    let (code, msg) = refused("node-descriptor-invalid-signature.signed.json", now());
    assert_eq!(code, "signature-invalid");
    assert!(msg.contains("Example partner cert"), "{msg}");
    let (code, msg) = refused("node-descriptor-no-permissions.signed.json", now());
    assert_eq!(code, "outbound-rule-none");
    assert!(msg.contains("grants no outbound"), "{msg}");
    // The happy path outside its validity (the descriptor and partner certificate end at
    // 2030, start at 2023).
    let (code, msg) = refused(
        "node-descriptor-happy-path.signed.json",
        at("2030-06-01T00:00:00Z"),
    );
    assert_eq!(code, "cert-expired");
    assert!(msg.contains("node descriptor for 0x0000"), "{msg}");
    let (code, _) = refused(
        "node-descriptor-happy-path.signed.json",
        at("2022-06-01T00:00:00Z"),
    );
    assert_eq!(code, "cert-not-yet-valid");

    // A descriptor that grants nothing is fine for a manifest that wants no outbound.
    let v = check(
        &j,
        &manifest(&[]),
        Some(ZERO_NODE),
        Some(&vector("node-descriptor-no-permissions.signed.json")),
        now(),
    );
    assert!(v.is_accept() && v.matched_rule.is_none(), "{v:?}");
}

#[test]
fn a_missing_descriptor_or_node_id_and_a_corrupt_descriptor_are_refused() {
    let j = judge_with(rules_with(&[(ROOT_ID, Mode::All)]), &Whitelist::default());
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), None, now());
    assert_eq!(codes(&v), ["signature-missing", "outbound-rule-none"]);
    let happy = vector("node-descriptor-happy-path.signed.json");
    let v = check(&j, &wants_domain(), None, Some(&happy), now());
    assert_eq!(codes(&v), ["node-id-mismatch", "outbound-rule-none"]);
    let v = check(
        &j,
        &wants_domain(),
        Some(ZERO_NODE),
        Some(b"{\"nodeDescriptor\": 1}"),
        now(),
    );
    assert_eq!(codes(&v), ["cert-chain-untrusted", "outbound-rule-none"]);

    // Without partner rules the descriptor is not consulted at all.
    let j = judge_with(rules_with(&[]), &Whitelist::default());
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    assert_eq!(codes(&v), ["outbound-rule-none"]);
    // Any rule that grants is enough: a broken descriptor does not undo `everyone all`.
    let mut rules = rules_with(&[(ROOT_ID, Mode::All)]);
    rules.outbound.everyone = Mode::All;
    let j = judge_with(rules, &Whitelist::default());
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(b"{}"), now());
    assert_eq!(
        v.matched_rule,
        Some(MatchedRule::Everyone { mode: Mode::All })
    );
}

#[test]
fn the_rule_mode_and_the_descriptor_permissions_must_both_allow_the_urls() {
    let happy = vector("node-descriptor-happy-path.signed.json");
    let whitelist = Whitelist {
        patterns: vec![DomainPattern {
            domain: "domain.com".into(),
            match_: PatternMatch::Strict,
        }],
    };
    // whitelist mode: the host must be on the whitelist too.
    let j = judge_with(
        rules_with(&[(ROOT_ID, Mode::Whitelist)]),
        &Whitelist::default(),
    );
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    assert_eq!(codes(&v), ["url-not-whitelisted", "outbound-rule-none"]);
    let j = judge_with(rules_with(&[(ROOT_ID, Mode::Whitelist)]), &whitelist);
    let v = check(&j, &wants_domain(), Some(ZERO_NODE), Some(&happy), now());
    assert!(v.is_accept(), "{v:?}");

    let j = judge_with(rules_with(&[(ROOT_ID, Mode::All)]), &whitelist);
    // Within the granted `https://domain.com/`: any path, the default port spelled out.
    let v = check(
        &j,
        &manifest(&["https://DOMAIN.com:443/api/v1?x=1"]),
        Some(ZERO_NODE),
        Some(&happy),
        now(),
    );
    assert!(v.is_accept(), "{v:?}");
    // Mode `all` does not widen the descriptor: other hosts, schemes and ports stay out.
    for url in [
        "https://other.com/",
        "http://domain.com/",
        "https://domain.com:8443/",
        "https://sub.domain.com/",
    ] {
        let v = check(&j, &manifest(&[url]), Some(ZERO_NODE), Some(&happy), now());
        assert_eq!(
            codes(&v),
            ["url-not-whitelisted", "outbound-rule-none"],
            "{url}"
        );
        assert!(v.reasons[0].message.contains(url), "{url}: {v:?}");
    }
    let mut unrestricted = manifest(&[]);
    unrestricted["compManifest"]["net"] =
        json!({"inet": {"out": {"unrestricted": {"urls": true}}}});
    let v = check(&j, &unrestricted, Some(ZERO_NODE), Some(&happy), now());
    assert_eq!(codes(&v), ["url-not-whitelisted", "outbound-rule-none"]);

    // A descriptor with unrestricted outbound, issued with the vectors' partner key.
    let partner: Value =
        serde_json::from_slice(&vector("partner-certificate.signed.json")).unwrap();
    let d = sign(
        "nodeDescriptor",
        descriptor(
            PEER,
            ("2024-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            json!({"outbound": "unrestricted"}),
        ),
        &yagna_key(&yagna("certs/partner-keypair.key")),
        partner,
    );
    let v = check(&j, &unrestricted, Some(PEER), Some(&to_bytes(&d)), now());
    assert!(v.is_accept(), "{v:?}");
}

#[test]
fn url_coverage_is_scheme_host_port_and_path_prefix() {
    let covers = |g: &str, w: &str| url_covers(&g.parse().unwrap(), &w.parse().unwrap());
    assert!(covers("https://a.com/", "https://a.com/x/y"));
    assert!(covers("https://a.com", "https://A.COM:443/"));
    assert!(covers("https://a.com/api", "https://a.com/api"));
    assert!(covers("https://a.com/api", "https://a.com/api/v1"));
    assert!(covers("https://a.com/api/", "https://a.com/api/v1"));
    assert!(!covers("https://a.com/api", "https://a.com/apiv1"));
    assert!(!covers("https://a.com/api/v1", "https://a.com/api"));
    assert!(!covers("https://a.com/", "http://a.com/"));
    assert!(!covers("https://a.com/", "https://a.com:444/"));
    assert!(!covers("https://a.com/", "https://a.com.evil.net/"));
    assert!(!covers("https://a.com/", "https://user@a.com/"));
    assert!(covers("https://a.com/q?x=1", "https://a.com/q?x=1"));
    assert!(!covers("https://a.com/q?x=1", "https://a.com/q?x=2"));
    assert!(!covers("https://a.com/q?x=1", "https://a.com/q/r"));
}

#[test]
fn generated_chains_that_break_the_rules_are_untrusted() {
    const WIDE: (&str, &str) = ("2020-01-01T00:00:00Z", "2040-01-01T00:00:00Z");
    let root_key = key();
    let root = sign(
        "certificate",
        certificate("Gen Root", &root_key, WIDE, json!("all"), json!("all")),
        &root_key,
        json!("self"),
    );
    let root_id = certs::golem::certificate_id(&root["certificate"]).unwrap();
    let j = judge_with(rules_with(&[(&root_id, Mode::All)]), &Whitelist::default());
    let urls = json!({"outbound": {"urls": ["https://domain.com/"]}});
    let inter = |usage: Value, perms: Value, validity| {
        let k = key();
        let c = sign(
            "certificate",
            certificate("Gen Partner", &k, validity, usage, perms),
            &root_key,
            root.clone(),
        );
        (c, k)
    };
    let judged =
        |signer: &(Value, openssl::pkey::PKey<openssl::pkey::Private>), perms: Value, validity| {
            let d = sign(
                "nodeDescriptor",
                descriptor(PEER, validity, perms),
                &signer.1,
                signer.0.clone(),
            );
            check(&j, &wants_domain(), Some(PEER), Some(&to_bytes(&d)), now())
        };

    // The well-formed case is accepted, so each refusal below is caused by its one change.
    let good = inter(json!(["signNode"]), urls.clone(), WIDE);
    assert!(judged(&good, urls.clone(), WIDE).is_accept());

    // The descriptor claims unrestricted outbound where its signer only has one URL.
    let v = judged(&good, json!({"outbound": "unrestricted"}), WIDE);
    assert_eq!(codes(&v), ["cert-chain-untrusted", "outbound-rule-none"]);
    assert!(
        v.reasons[0]
            .message
            .contains("beyond those of its signer `Gen Partner`"),
        "{v:?}"
    );
    // A partner certificate valid beyond its root.
    let long = inter(
        json!(["signNode"]),
        urls.clone(),
        ("2020-01-01T00:00:00Z", "2041-01-01T00:00:00Z"),
    );
    let v = judged(&long, urls.clone(), WIDE);
    assert_eq!(codes(&v), ["cert-chain-untrusted", "outbound-rule-none"]);
    assert!(
        v.reasons[0]
            .message
            .contains("outside its signer `Gen Root`"),
        "{v:?}"
    );
    // A signer without signNode.
    let no_node = inter(json!(["signCertificate"]), urls.clone(), WIDE);
    let v = judged(&no_node, urls.clone(), WIDE);
    assert_eq!(codes(&v), ["cert-chain-untrusted", "outbound-rule-none"]);
    assert!(v.reasons[0].message.contains("signNode"), "{v:?}");

    // A valid chain that no rule names.
    let other_key = key();
    let other_root = sign(
        "certificate",
        certificate("Other Root", &other_key, WIDE, json!("all"), json!("all")),
        &other_key,
        json!("self"),
    );
    let d = sign(
        "nodeDescriptor",
        descriptor(PEER, WIDE, urls),
        &other_key,
        other_root,
    );
    let v = check(&j, &wants_domain(), Some(PEER), Some(&to_bytes(&d)), now());
    assert_eq!(codes(&v), ["outbound-rule-none", "outbound-rule-none"]);
    assert!(v.reasons[0].message.contains("(Other Root)"), "{v:?}");
}
