//! `rules.json` and `domain_whitelist.json`: yagna's formats, our matching semantics.

use policies::whitelist::{DomainPattern, PatternMatch};
use policies::{Mode, Rules, Whitelist};

use crate::util::yagna;

#[test]
fn yagna_goth_rules_json_loads() {
    let rules =
        Rules::from_json(&std::fs::read(yagna("goth-outbound/rules.json")).unwrap()).unwrap();
    assert!(rules.outbound.enabled);
    assert_eq!(rules.outbound.everyone, Mode::None);
    let inter = "55e451bd1a2f43570a25052b863af1d527fe6fd4bfd1482fdb241596432477f20eb2b2f3801fb5c6cd785f1a03c43ccf71fd8cdf0a974d1296be2326b0824673";
    assert_eq!(rules.outbound.audited_payload[inter].mode, Mode::All);
    assert_eq!(rules.outbound.partner.len(), 2);
    // Lists absent from the file get the defaults, and the file round-trips.
    assert!(rules.blacklist.enabled && rules.blacklist.identity.is_empty());
    assert!(!rules.allow_only.enabled);
    assert_eq!(Rules::from_json(&rules.to_json()).unwrap(), rules);
}

#[test]
fn rules_errors_name_the_field() {
    let e =
        Rules::from_json(br#"{"outbound": {"enabled": true, "everyone": "some"}}"#).unwrap_err();
    assert_eq!(e.field, "outbound.everyone");
    let e = Rules::from_json(
        br#"{"outbound": {"enabled": true, "everyone": "all", "audited-payload": {"abc": {"mode": "all"}}}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "outbound.audited-payload.abc");
    let e = Rules::from_json(br#"{"outbound": {"enabled": true, "everyone": "all", "extra": 1}}"#)
        .unwrap_err();
    assert!(e.message.contains("extra"), "{}", e.message);
}

fn wl(patterns: &[(&str, PatternMatch)]) -> policies::WhitelistMatcher {
    Whitelist {
        patterns: patterns
            .iter()
            .map(|(d, m)| DomainPattern {
                domain: d.to_string(),
                match_: *m,
            })
            .collect(),
    }
    .matcher()
    .unwrap()
}

#[test]
fn strict_means_the_whole_host() {
    let m = wl(&[("api.example.com", PatternMatch::Strict)]);
    assert!(m.matches("api.example.com"));
    assert!(m.matches("API.Example.COM"));
    assert!(m.matches("api.example.com."));
    for evil in [
        "evil-api.example.com",
        "api.example.com.evil.net",
        "xapi.example.com",
        "example.com",
        "api.example.co",
    ] {
        assert!(!m.matches(evil), "{evil}");
    }
}

#[test]
fn regex_is_anchored_to_the_whole_host() {
    let m = wl(&[
        (r".*\.golem\.network", PatternMatch::Regex),
        ("api|www", PatternMatch::Regex),
    ]);
    assert!(m.matches("registry.golem.network"));
    assert!(m.matches("REGISTRY.golem.network"));
    assert!(!m.matches("golem.network"));
    assert!(!m.matches("registry.golem.network.evil.net"));
    assert!(!m.matches("registry.golem-network"));
    // Alternation stays inside the anchors: `api|www` is not `^api` or `www$`.
    assert!(m.matches("api") && m.matches("www"));
    assert!(!m.matches("api.evil.net"));
    assert!(!m.matches("evil.www"));
}

#[test]
fn bad_patterns_are_refused() {
    assert!(DomainPattern {
        domain: "(".into(),
        match_: PatternMatch::Regex
    }
    .validate()
    .is_err());
    assert!(DomainPattern {
        domain: "a b".into(),
        match_: PatternMatch::Strict
    }
    .validate()
    .is_err());
    assert!(DomainPattern {
        domain: "".into(),
        match_: PatternMatch::Strict
    }
    .validate()
    .is_err());
    assert!(Whitelist::from_json(br#"{"patterns": [{"domain": "(", "match": "regex"}]}"#).is_err());
}

#[test]
fn whitelist_reads_both_yagna_spellings() {
    let a =
        Whitelist::from_json(br#"{"patterns": [{"domain": "a.com", "match": "strict"}]}"#).unwrap();
    let b =
        Whitelist::from_json(br#"{"domains": [{"domain": "a.com", "match": "strict"}]}"#).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.patterns[0].id().len(), 8);
}
