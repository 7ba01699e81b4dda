//! Property tests of the policy (issue 18): one decision per destination, whatever the
//! spelling. A client can write the same host in upper or lower case, with the root's
//! trailing dot, in Unicode or punycode, with percent-escapes (the URL standard's host
//! parser decodes them), and the same path with escapes of unreserved characters in upper
//! or lower case hex; the verdict (the rule that allows it, or the code that refuses it)
//! must be the one its plain spelling gets, in every mode.

use proptest::prelude::*;
use url::Url;

use crate::policy::{Access, Destination, Host};
use crate::{AddressPolicy, EgressPolicy, Limits};
use policies::{DomainPattern, Mode, Outbound, PatternMatch, WhitelistMatcher};

/// Hosts as their owner writes them: ASCII, an internationalised name, a subdomain, and
/// names the manifest does not list.
const HOSTS: &[&str] = &[
    "api.example.com",
    "bücher.example",
    "sub.api.example.com",
    "other.example",
    "unlisted.example",
];
const SEGMENTS: &[&str] = &["v1", "data", "~x", "sock", "v1x", "A-b_c"];

fn policy(mode: Mode) -> EgressPolicy {
    let urls = [
        "https://api.example.com/v1/",
        "http://api.example.com/data",
        "http://xn--bcher-kva.example/~x/",
        "ws://other.example:8080/sock",
        "http://sub.api.example.com/",
    ];
    let whitelist = WhitelistMatcher::new(&[
        DomainPattern {
            domain: "api.example.com".into(),
            match_: PatternMatch::Strict,
        },
        DomainPattern {
            domain: "xn--bcher-kva.example".into(),
            match_: PatternMatch::Strict,
        },
    ])
    .unwrap();
    EgressPolicy::new(
        "props",
        &Outbound::Urls {
            protocols: vec!["http".into(), "https".into(), "ws".into(), "wss".into()],
            urls: urls.iter().map(|u| Url::parse(u).unwrap()).collect(),
        },
        mode,
        &whitelist,
        AddressPolicy::default(),
        Limits::default(),
    )
}

/// One spelling of `host`: each label in Unicode or punycode, each letter in either case
/// (the `XN--` prefix too), some ASCII characters percent-encoded, maybe a trailing dot.
fn spell_host(host: &str, choices: &[u8]) -> String {
    let mut pick = choices.iter().copied().cycle();
    let mut labels = Vec::new();
    for label in host.split('.') {
        let label = if !label.is_ascii() && pick.next().unwrap() % 2 == 0 {
            url::Host::parse(label).unwrap().to_string() // punycode
        } else {
            label.to_owned()
        };
        let mut out = String::new();
        for c in label.chars() {
            let p = pick.next().unwrap();
            let c = if p & 1 == 1 {
                c.to_uppercase().next().unwrap()
            } else {
                c
            };
            if c.is_ascii_alphanumeric() && p & 6 == 6 {
                let hex = format!("%{:02x}", c as u8);
                out.push_str(&if p & 8 == 8 { hex.to_uppercase() } else { hex });
            } else {
                out.push(c);
            }
        }
        labels.push(out);
    }
    let mut s = labels.join(".");
    if pick.next().unwrap() % 3 == 0 {
        s.push('.');
    }
    s
}

/// One spelling of `path`: unreserved characters other than `.` percent-encoded at will,
/// in either hex case.
fn spell_path(path: &str, choices: &[u8]) -> String {
    let mut pick = choices.iter().copied().cycle();
    let mut out = String::new();
    for c in path.chars() {
        let p = pick.next().unwrap();
        if (c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~')) && p % 3 == 0 {
            let hex = format!("%{:02x}", c as u8);
            out.push_str(&if p & 8 == 8 { hex.to_uppercase() } else { hex });
        } else {
            out.push(c);
        }
    }
    out
}

fn access(kind: u8, path: String) -> Access {
    match kind % 3 {
        0 => Access::Http { path },
        1 => Access::WebSocket { path },
        _ => Access::Tunnel,
    }
}

/// What the requestor can observe: the rule that allowed, or the code that refused.
fn verdict(p: &EgressPolicy, host: &str, port: u16, access: Access) -> Result<String, String> {
    let host = Host::parse(host).map_err(|e| format!("bad host: {e}"))?;
    p.check(&Destination { host, port, access })
        .map_err(|d| d.code.as_str().to_owned())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_spelling_of_a_host_and_path_gets_the_same_verdict(
        host in 0..HOSTS.len(),
        segments in prop::collection::vec(0..SEGMENTS.len(), 0..4),
        trailing_slash in any::<bool>(),
        kind in any::<u8>(),
        port in prop::sample::select(vec![80u16, 443, 8080, 81]),
        mode in prop::sample::select(vec![Mode::All, Mode::Whitelist, Mode::None]),
        host_choices in prop::collection::vec(any::<u8>(), 1..32),
        path_choices in prop::collection::vec(any::<u8>(), 1..32),
    ) {
        let policy = policy(mode);
        let mut path = String::from("/");
        path.push_str(&segments.iter().map(|i| SEGMENTS[*i]).collect::<Vec<_>>().join("/"));
        if trailing_slash && !segments.is_empty() {
            path.push('/');
        }
        let plain = verdict(&policy, HOSTS[host], port, access(kind, path.clone()));
        let host_spelled = spell_host(HOSTS[host], &host_choices);
        let path_spelled = spell_path(&path, &path_choices);
        prop_assert_eq!(
            Host::parse(&host_spelled).unwrap(),
            Host::parse(HOSTS[host]).unwrap(),
            "{} spelled {}", HOSTS[host], host_spelled
        );
        let spelled = verdict(&policy, &host_spelled, port, access(kind, path_spelled.clone()));
        prop_assert_eq!(
            &spelled, &plain,
            "{}{} spelled {}{} (port {}, {:?})",
            HOSTS[host], path, host_spelled, path_spelled, port, mode
        );
    }
}

/// The spelling helpers really vary the text (else the property above tests nothing).
#[test]
fn the_spellings_differ_from_the_plain_text() {
    let unicode = spell_host("bücher.example", &[1, 1, 0]);
    assert!(
        unicode.contains(['ü', 'Ü']) && unicode != "bücher.example",
        "{unicode}"
    );
    let puny = spell_host("bücher.example", &[0, 1, 1, 1, 1, 1, 1, 0]);
    assert!(puny.starts_with("XN--BC"), "{puny}");
    assert_eq!(Host::parse(&unicode), Host::parse(&puny));
    let escaped = spell_host("api.example.com", &[7, 0, 0]);
    assert!(escaped.starts_with("%41pi."), "{escaped}");
    assert_eq!(Host::parse(&escaped), Host::parse("api.example.com"));
    let path = spell_path("/v1/~x", &[3, 8]);
    assert!(path.contains('%') && path != "/v1/~x", "{path}");
    assert_eq!(
        verdict(&policy(Mode::All), "API.Example.COM.", 443, Access::Tunnel),
        Ok("https://api.example.com/v1/".into())
    );
    assert_eq!(
        verdict(
            &policy(Mode::All),
            "api.example.com",
            80,
            Access::Http {
                path: "/d%61ta".into()
            }
        ),
        Ok("http://api.example.com/data".into())
    );
}
