//! The Computation Payload Manifest: what parses, what is refused and how errors name it.

use chrono::{DateTime, Duration, Utc};
use policies::manifest::{PayloadHash, Sha3};
use policies::{ManifestError, Outbound, Platform, ReceivedManifest};
use serde_json::json;

use crate::util::{manifest, yagna};

fn parse(v: &serde_json::Value) -> Result<ReceivedManifest, ManifestError> {
    ReceivedManifest::from_json(v.to_string().as_bytes())
}

fn field_error(v: &serde_json::Value) -> (String, String) {
    match parse(v) {
        Err(ManifestError::Field { field, message }) => (field, message),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn yagna_goth_manifests_parse() {
    let m = ReceivedManifest::from_file_bytes(
        &std::fs::read(yagna("goth-outbound/outbound_manifest.json")).unwrap(),
    )
    .unwrap();
    match &m.outbound {
        Outbound::Urls { protocols, urls } => {
            assert_eq!(protocols, &["https"]);
            assert_eq!(urls.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.script().unwrap().commands.len(), 3);
    let u = ReceivedManifest::from_file_bytes(
        &std::fs::read(yagna("goth-outbound/outbound_manifest_unrestricted.json")).unwrap(),
    )
    .unwrap();
    assert!(matches!(u.outbound, Outbound::Unrestricted { .. }));
}

#[test]
fn golem_schema_optional_forms_parse() {
    let m = json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00.000000Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "n", "version": "1", "description": null,
                     "authors": ["a <a@example.com>"], "homepage": "https://example.com"},
        "payload": [
            {"urls": ["http://x.example.com/a.tar"], "hash": format!("sha3:{}", "0".repeat(56))},
            {"platform": {"arch": "aarch64", "os": "linux", "osVersion": "6.1"},
             "urls": ["file:///images/b.tar"], "hash": format!("sha3:{}", "A".repeat(128))},
            {"platform": null, "urls": ["https://x/c"], "hash": format!("sha3:{}", "1".repeat(96))}
        ],
        "compManifest": {"version": "0.1.0",
            "script": {"commands": ["run /bin/date", {"run": {"args": "/bin/ls"}}]},
            "net": {"inet": {"out": {"urls": ["wss://ws.example.com"]}}}}
    });
    let r = parse(&m).unwrap();
    assert_eq!(r.script().unwrap().match_, exescript::Match::Strict);
    match &r.outbound {
        Outbound::Urls { protocols, .. } => assert_eq!(protocols, &["http", "https", "ws", "wss"]),
        other => panic!("{other:?}"),
    }
    for nulls in [
        json!({"metadata": null, "compManifest": null}),
        json!({"compManifest": {"version": "1", "script": null, "net": null}}),
        json!({"compManifest": {"version": "1", "net": {"inet": null}}}),
        json!({"compManifest": {"version": "1", "net": {"inet": {"out": null}}}}),
        json!({"compManifest": {"version": "1", "net": {"inet": {"out": {"urls": null}}}}}),
    ] {
        let mut v = manifest(&[]);
        for (k, val) in nulls.as_object().unwrap() {
            v[k] = val.clone();
        }
        let r = parse(&v).unwrap_or_else(|e| panic!("{nulls}: {e}"));
        assert_eq!(r.outbound, Outbound::None, "{nulls}");
    }
    // A missing platform is Golem's default: x86_64 Linux.
    assert!(r
        .select_payload(&Platform {
            arch: "x86_64".into(),
            os: "linux".into(),
            os_version: None
        })
        .is_some_and(|p| p.platform.is_none()));
}

#[test]
fn unknown_fields_are_rejected_and_named_by_path() {
    let mut m = manifest(&["https://api.example.com"]);
    m["compManifest"]["net"]["inet"]["out"]["allowAll"] = json!(true);
    let (field, message) = field_error(&m);
    assert_eq!(field, "compManifest.net.inet.out.allowAll");
    assert!(message.contains("unknown field `allowAll`"), "{message}");

    let mut m = manifest(&[]);
    m["payload"][0]["sizeLimit"] = json!(1);
    let (field, message) = field_error(&m);
    assert_eq!(field, "payload[0].sizeLimit");
    assert!(message.contains("unknown field"), "{message}");

    let mut m = manifest(&[]);
    m["signature"] = json!("x");
    assert!(field_error(&m).1.contains("signature"));
}

#[test]
fn structural_errors_name_the_field() {
    let cases: Vec<(serde_json::Value, &str, &str)> = vec![
        (json!({"payload": []}), "payload", "at least one"),
        (
            json!({"payload": [{"urls": [], "hash": format!("sha3:{}", "a".repeat(64))}]}),
            "payload[0].urls",
            "at least one",
        ),
        (
            json!({"payload": [{"urls": ["not a url"], "hash": format!("sha3:{}", "a".repeat(64))}]}),
            "payload[0].urls[0]",
            "not a url",
        ),
        (
            json!({"payload": [{"urls": ["ftp://x/y"], "hash": format!("sha3:{}", "a".repeat(64))}]}),
            "payload[0].urls[0]",
            "ftp",
        ),
        (
            json!({"payload": [{"urls": ["https://x/y"], "hash": "sha256:abcd"}]}),
            "payload[0].hash",
            "sha3:",
        ),
        (
            json!({"payload": [{"urls": ["https://x/y"], "hash": format!("sha3:{}", "a".repeat(63))}]}),
            "payload[0].hash",
            "63 hex digits",
        ),
        (
            json!({"payload": [{"urls": ["https://x/y"], "hash": format!("sha3:{}", "g".repeat(64))}]}),
            "payload[0].hash",
            "hexadecimal",
        ),
        (
            json!({"expiresAt": "tomorrow"}),
            "expiresAt",
            "`tomorrow` is not an RFC 3339 date-time",
        ),
    ];
    for (patch, want_field, want_msg) in cases {
        let mut m = manifest(&[]);
        for (k, v) in patch.as_object().unwrap() {
            m[k] = v.clone();
        }
        let (field, message) = field_error(&m);
        assert_eq!(field, want_field, "{patch}");
        assert!(message.contains(want_msg), "{patch}: {message}");
    }
}

#[test]
fn outbound_urls_are_checked_against_protocols_and_parsed() {
    let mut m = manifest(&["http://api.example.com"]);
    m["compManifest"]["net"]["inet"]["out"]["protocols"] = json!(["https"]);
    let (field, message) = field_error(&m);
    assert_eq!(field, "compManifest.net.inet.out.urls[0]");
    assert!(message.contains("never be reached"), "{message}");

    let mut m = manifest(&["https://api.example.com"]);
    m["compManifest"]["net"]["inet"]["out"]["protocols"] = json!(["gopher"]);
    assert_eq!(field_error(&m).0, "compManifest.net.inet.out.protocols[0]");

    let m = manifest(&["https://"]);
    assert_eq!(field_error(&m).0, "compManifest.net.inet.out.urls[0]");

    let mut m = manifest(&["https://api.example.com"]);
    m["compManifest"]["net"]["inet"]["out"]["unrestricted"] = json!({"urls": true});
    assert!(field_error(&m).1.contains("contradict"));
}

/// Found by fuzzing (`fuzz/`, target `manifest`, differential against Golem's schema): the
/// URL parser accepted `https://api.example.com/%0/`, which is no URI, and silently mends
/// or drops what RFC 3986 forbids (a tab inside the host disappears), so the URL the egress
/// policy allowed was not the text the requestor signed. Both URL lists refuse such text,
/// naming the byte; well-formed escapes still pass.
#[test]
fn urls_that_are_not_rfc3986_uris_are_refused() {
    for (bad, says) in [
        ("https://api.example.com/%0/", "percent-escape"),
        ("https://api.example.com/%zz", "percent-escape"),
        ("https://api.exa\tmple.com/", "not allowed in a URI"),
        ("https://api.example.com/a b", "not allowed in a URI"),
        (" https://api.example.com/", "not allowed in a URI"),
        ("https://bücher.example/", "not allowed in a URI"),
        (
            "https://images.example.com/ap[p.tar.gz",
            "not allowed in a URI",
        ),
        // Finding 9: a `[` in the userinfo is not the host's.
        ("https://[ap@images.example.com/v1/", "not allowed in a URI"),
        ("https://u]@images.example.com/", "not allowed in a URI"),
        ("https://u@im[ages.example.com/", "not allowed in a URI"),
        ("https://[::1]x/", "not allowed in a URI"),
        ("https://a@b@images.example.com/", "second `@`"),
        // Finding 10: the fragment holds no `#`.
        ("https://images.example.com/app##x.gvmi", "second `#`"),
        ("https://images.example.com/app#a#b", "second `#`"),
    ] {
        let (field, message) = field_error(&manifest(&[bad]));
        assert_eq!(field, "compManifest.net.inet.out.urls[0]", "{bad:?}");
        assert!(message.contains(says), "{bad:?}: {message}");

        let mut m = manifest(&[]);
        m["payload"][0]["urls"] = json!([bad]);
        assert_eq!(field_error(&m).0, "payload[0].urls[0]", "{bad:?}");
    }
    let ok = manifest(&[
        "https://api.example.com/a%20b/?q=%7E&x=%5B1%5D#f",
        "https://xn--bcher-kva.example/",
        "https://user:pw@[2001:db8::1]:8443/v1/",
        "https://[2001:db8::2]/",
        "https://images.example.com/app.gvmi#frag/with?marks",
    ]);
    assert!(parse(&ok).is_ok());
}

/// Found by fuzzing (`fuzz/`, target `manifest`): a manifest followed by more text
/// (`{…}garbage`, `{…}{…}`) was accepted, the rest ignored although it was signed too.
#[test]
fn text_after_the_manifest_object_is_refused() {
    let text = manifest(&[]).to_string();
    for tail in ["x", "{}", " ]", "\u{0}"] {
        let err = ReceivedManifest::from_json(format!("{text}{tail}").as_bytes()).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Json(m) if m.contains("after the manifest")),
            "{tail:?}: {err}"
        );
    }
    // Trailing whitespace is still fine (files end with a newline).
    assert!(ReceivedManifest::from_json(format!("{text}\n  ").as_bytes()).is_ok());
}

/// Found by fuzzing (`fuzz/`, target `manifest`, against Golem's schema): chrono's
/// lenient parsing accepted `210 -01-01T00:00:00Z`; the times must be RFC 3339 exactly.
#[test]
fn times_must_be_rfc3339_exactly() {
    let mut m = manifest(&[]);
    m["expiresAt"] = json!("210 -01-01T00:00:00Z");
    let (field, message) = field_error(&m);
    assert_eq!(field, "expiresAt");
    assert!(message.contains("RFC 3339"), "{message}");
    // Finding 11: a leap second is refused (chrono accepts `:60` anywhere).
    for leap in ["2022-07-26T12:51:60.000000Z", "2016-12-31T23:59:60Z"] {
        let mut m = manifest(&[]);
        m["createdAt"] = json!(leap);
        let (field, message) = field_error(&m);
        assert_eq!(field, "createdAt", "{leap}");
        assert!(message.contains("leap second"), "{message}");
    }
    let mut m = manifest(&[]);
    m["createdAt"] = json!("2024-01-01T00:00:00+02:00");
    assert!(parse(&m).is_ok());
}

#[test]
fn hash_lengths_pick_the_sha3_variant() {
    for (n, alg) in [
        (56, Sha3::Sha3_224),
        (64, Sha3::Sha3_256),
        (96, Sha3::Sha3_384),
        (128, Sha3::Sha3_512),
    ] {
        let h = PayloadHash::parse(&format!("sha3:{}", "F".repeat(n))).unwrap();
        assert_eq!(h.algorithm, alg);
        assert_eq!(h.hex, "f".repeat(n));
    }
}

#[test]
fn times_are_enforced() {
    let r = parse(&manifest(&[])).unwrap();
    let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    r.check_time(at("2050-01-01T00:00:00Z")).unwrap();
    assert!(matches!(
        r.check_time(at("2100-01-01T00:00:00Z")),
        Err(ManifestError::Expired { .. })
    ));
    // createdAt 2024-01-01: 5 minutes of skew are tolerated, 6 are not.
    let created = at("2024-01-01T00:00:00Z");
    r.check_time(created - Duration::minutes(5)).unwrap();
    assert!(matches!(
        r.check_time(created - Duration::minutes(6)),
        Err(ManifestError::NotYetValid { .. })
    ));
}

#[test]
fn base64_and_json_inputs_agree_and_garbage_is_named() {
    let json = manifest(&[]).to_string();
    let a = ReceivedManifest::from_json(json.as_bytes()).unwrap();
    let b = ReceivedManifest::from_base64(&a.base64).unwrap();
    assert_eq!(a.manifest, b.manifest);
    assert!(matches!(
        ReceivedManifest::from_base64("!!!"),
        Err(ManifestError::Base64(_))
    ));
    assert!(matches!(
        ReceivedManifest::from_json(b"{\"version\": "),
        Err(ManifestError::Json(_))
    ));
}
