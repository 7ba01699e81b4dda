//! The operator's command line end to end: keystore, rules, whitelist and `manifest check`
//! on real files in a throwaway data dir.

use certs::testpki::{self, KeyKind, LeafUsage, Validity};
use tests::util::{
    b64, manifest, write_signed, yagna, yagna_foo_inter, Provider, OTHER_PEER, PEER,
};

const FOO_INTER: &str = "55e451bd1a2f43570a25052b863af1d527fe6fd4bfd1482fdb241596432477f20eb2b2f3801fb5c6cd785f1a03c43ccf71fd8cdf0a974d1296be2326b0824673";

/// yagna's goth demand as yagna sends it: signed by `foo_req`, a TLS server certificate
/// (extendedKeyUsage serverAuth only), which may not sign manifests here.
fn goth_check(p: &Provider) -> tests::util::Run {
    p.check(
        &yagna("goth-outbound/outbound_manifest.json"),
        Some((
            &yagna("goth-outbound/outbound_signature.sha256.base64"),
            "sha256",
            &yagna("goth-outbound/outbound_certificate.cert"),
        )),
        &[],
    )
}

/// The same goth manifest signed (with `requestor manifest sign`) by a code-signing leaf
/// issued by yagna's real `Foo Inter` CA.
fn goth_code_signed_check(p: &Provider) -> tests::util::Run {
    let leaf = testpki::issue_leaf(
        &yagna_foo_inter(),
        "Foo Code Signer",
        KeyKind::Rsa2048,
        Validity::current(),
        &LeafUsage {
            key_usage: Some(vec!["digitalSignature"]),
            extended_key_usage: Some(vec!["codeSigning"]),
        },
    );
    let key = p.write_input("signer.key", leaf.key.private_key_to_pem_pkcs8().unwrap());
    let manifest = yagna("goth-outbound/outbound_manifest.json");
    let sig = p.input("goth.sig");
    p.requestor([
        "manifest".as_ref(),
        "sign".as_ref(),
        "--manifest".as_ref(),
        manifest.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--out".as_ref(),
        sig.as_os_str(),
    ])
    .ok();
    let chain = p.write_input("signer.pem", leaf.cert.to_pem().unwrap());
    p.check(&manifest, Some((&sig, "sha256", &chain)), &[])
}

fn codes(r: &tests::util::Run) -> Vec<String> {
    r.json()["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["code"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn yagna_goth_outbound_manifest_is_accepted_under_an_audited_payload_rule() {
    let p = Provider::new();
    p.keystore_add(&[
        &yagna("certs/foo_ca.cert.pem"),
        &yagna("certs/foo_inter.cert.pem"),
    ])
    .ok();
    // Before any rule: everyone=whitelist with an empty whitelist refuses the URLs.
    let before = goth_code_signed_check(&p);
    assert_eq!(before.code, 1, "{before:?}");
    assert_eq!(codes(&before), ["url-not-whitelisted"]);

    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        "55e451",
        "--mode",
        "all",
    ])
    .ok();
    let v = goth_code_signed_check(&p).ok().json();
    assert_eq!(v["verdict"], "accept");
    assert_eq!(v["reasons"], serde_json::json!([]));
    assert_eq!(v["matched_rule"]["rule"], "audited-payload");
    assert_eq!(v["matched_rule"]["cert_id"], FOO_INTER);
    assert_eq!(v["matched_rule"]["mode"], "all");

    // The rules file is yagna's format: the goth file itself gives the same verdict.
    let rules = p.run(["--json", "rule", "list"]).ok().json();
    assert_eq!(
        rules["outbound"]["audited-payload"][FOO_INTER]["mode"],
        "all"
    );
}

#[test]
fn yagna_goth_signature_by_the_tls_certificate_foo_req_is_cert_usage_invalid() {
    let p = Provider::new();
    p.keystore_add(&[
        &yagna("certs/foo_ca.cert.pem"),
        &yagna("certs/foo_inter.cert.pem"),
    ])
    .ok();
    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        "55e451",
        "--mode",
        "all",
    ])
    .ok();
    // The chain reaches the keystore and the signature is yagna's valid one: the only
    // problem is what foo_req is for. Without the grant the everyone rule answers too.
    let r = goth_check(&p);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(codes(&r), ["cert-usage-invalid", "url-not-whitelisted"]);
    let message = r.json()["reasons"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    for needle in ["`Foo Req`", "extendedKeyUsage", "serverAuth", "codeSigning"] {
        assert!(message.contains(needle), "`{needle}` missing: {message}");
    }
}

#[test]
fn yagna_goth_rules_json_works_as_a_data_dir_file() {
    let p = Provider::new();
    p.keystore_add(&[
        &yagna("certs/foo_ca.cert.pem"),
        &yagna("certs/foo_inter.cert.pem"),
    ])
    .ok();
    std::fs::copy(
        yagna("goth-outbound/rules.json"),
        p.data_dir().join("rules.json"),
    )
    .unwrap();
    let v = goth_code_signed_check(&p).ok().json();
    assert_eq!(v["matched_rule"]["cert_id"], FOO_INTER);
    let table = p.run(["rule", "list"]).ok().stdout;
    assert!(
        table.contains("outbound audited-payload  55e451bd1a2f4357  all"),
        "{table}"
    );
    assert!(
        table.contains("outbound everyone         -                 none"),
        "{table}"
    );
}

#[test]
fn expired_and_not_yet_valid_certificates_are_refused_by_keystore_add() {
    let p = Provider::new();
    p.keystore_add(&[&yagna("certs/foo_ca.cert.pem")]).ok();
    let before = p.snapshot();
    p.keystore_add(&[&yagna("certs/expired.pem")])
        .bad_input("expired at 1992-10-28");
    p.keystore_add(&[&yagna("certs/not_yet_valid.pem")])
        .bad_input("not valid before 2101");
    // One bad file among good ones adds nothing.
    p.keystore_add(&[
        &yagna("certs/foo_inter.cert.pem"),
        &yagna("certs/expired.pem"),
    ])
    .bad_input("expired.pem");
    assert_eq!(p.snapshot(), before);
}

#[test]
fn keystore_lists_as_table_and_json_and_removes_by_prefix() {
    let p = Provider::new();
    let listing = p.run(["keystore", "list"]).ok().stdout;
    assert!(listing.contains("empty"), "{listing}");
    p.keystore_add(&[&yagna("certs/foo_ca-chain.cert.pem")])
        .ok();
    let list = p.run(["--json", "keystore", "list"]).ok().json();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    assert!(ids.contains(&FOO_INTER));
    let table = p.run(["keystore", "list"]).ok().stdout;
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("55e451bd1a2f4357  2122-07-17  yes  "),
        "{table}"
    );

    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        "55e4",
        "--mode",
        "all",
    ])
    .ok();
    p.run(["keystore", "remove", "55e4"]).ok();
    let list = p.run(["--json", "keystore", "list"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // The grant for the removed certificate went with it.
    let rules = p.run(["--json", "rule", "list"]).ok().json();
    assert_eq!(rules["outbound"]["audited-payload"], serde_json::json!({}));
}

#[test]
fn bad_input_is_one_line_exit_2_and_changes_nothing() {
    let p = Provider::new();
    p.keystore_add(&[
        &yagna("certs/foo_ca.cert.pem"),
        &yagna("certs/foo_inter.cert.pem"),
        &yagna("certs/foo_req.cert.pem"),
    ])
    .ok();
    p.run(["whitelist", "add", "-p", "api.example.com"]).ok();
    let before = p.snapshot();

    let malformed = p.write_input("malformed.json", "{\"version\": \"0.1.0\", ");
    p.check(&malformed, None, &[]).bad_input("not valid JSON");

    let chain = std::fs::read(yagna("certs/foo_inter_req-chain.cert.pem")).unwrap();
    let truncated = p.write_input("truncated.pem", &chain[..chain.len() - 300]);
    let sig = p.write_input("ok.sig", b64(b"whatever"));
    let good_manifest = yagna("goth-outbound/outbound_manifest.json");
    p.check(&good_manifest, Some((&sig, "sha256", &truncated)), &[])
        .bad_input("truncated");
    p.keystore_add(&[&truncated]).bad_input("truncated");

    let not_b64 = p.write_input("bad.sig", "this is *not* base64!");
    p.check(
        &good_manifest,
        Some((&not_b64, "sha256", &yagna("certs/foo_req.cert.pem"))),
        &[],
    )
    .bad_input("not base64");

    p.run(["rule", "set", "outbound", "everyone", "--mode", "sometimes"])
        .bad_input("sometimes");
    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        "abcdef99",
        "--mode",
        "all",
    ])
    .bad_input("no certificate in the keystore has an id starting with `abcdef99`");
    // The three certificates' ids: find a prefix two of them share, or use one hex digit
    // that matches several.
    let ids: Vec<String> = p
        .run(["--json", "keystore", "list"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let shared = (1..4).find_map(|n| {
        ids.iter().find_map(|a| {
            let pre = &a[..n];
            (ids.iter().filter(|b| b.starts_with(pre)).count() > 1).then(|| pre.to_owned())
        })
    });
    if let Some(pre) = shared {
        p.run(["keystore", "remove", &pre]).bad_input("ambiguous");
    }
    p.run(["keystore", "remove", "zz"])
        .bad_input("not lowercase hexadecimal");
    p.run(["keystore", "remove", "0123456789"])
        .bad_input("0123456789");
    p.run(["whitelist", "add", "-p", "(", "-t", "regex"])
        .bad_input("not a valid regex");
    p.run(["whitelist", "remove", "deadbeef"])
        .bad_input("deadbeef");
    p.run(["rule", "add", "blacklist", "identity", "0xnot-a-peer"])
        .bad_input("not a libp2p peer id");
    p.run(["rule", "remove", "blacklist", "identity", PEER])
        .bad_input("no identity entry");
    p.run(["manifest", "check", "--manifest", "/nonexistent/m.json"])
        .bad_input("cannot read");
    p.run([
        "manifest",
        "check",
        "--manifest",
        good_manifest.to_str().unwrap(),
        "--now",
        "yesterday",
    ])
    .bad_input("RFC 3339");
    assert_eq!(
        p.snapshot(),
        before,
        "a failed command changed the data dir"
    );
}

#[test]
fn ambiguous_prefix_lists_the_candidates() {
    let p = Provider::new();
    let root = testpki::root("Amb Root", KeyKind::EcP256, Validity::current());
    let mut paths = Vec::new();
    for i in 0..17 {
        let c = testpki::issue(
            &root,
            &format!("Amb {i}"),
            KeyKind::EcP256,
            false,
            Validity::current(),
        );
        paths.push(p.write_input(&format!("c{i}.pem"), c.cert.to_pem().unwrap()));
    }
    let mut args = vec!["keystore".into(), "add".into()];
    args.extend(paths.iter().map(|p| p.clone().into_os_string()));
    p.run(args).ok();
    let ids: Vec<String> = p
        .run(["--json", "keystore", "list"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let digit = (0..16u32)
        .map(|d| std::char::from_digit(d, 16).unwrap())
        .find(|d| ids.iter().filter(|id| id.starts_with(*d)).count() > 1)
        .unwrap();
    let before = p.snapshot();
    let r = p
        .run(["keystore", "remove", &digit.to_string()])
        .bad_input("ambiguous");
    assert!(
        r.stderr.matches("Amb ").count() >= 2,
        "candidates are listed: {r:?}"
    );
    assert_eq!(p.snapshot(), before);
}

#[test]
fn generated_chains_cover_signature_and_certificate_codes() {
    let p = Provider::new();
    let root = testpki::root("CLI Root", KeyKind::Rsa2048, Validity::current());
    let inter = testpki::issue(
        &root,
        "CLI Inter",
        KeyKind::EcP384,
        true,
        Validity::current(),
    );
    let leaf = testpki::issue(
        &inter,
        "CLI Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let chain = testpki::pem(&[&inter.cert, &leaf.cert]);
    let want = manifest(&["https://api.example.com"]);

    let check = |m: &std::path::Path, s: &std::path::Path, alg: &str, c: &std::path::Path| {
        p.check(m, Some((s, alg, c)), &[])
    };

    // Audited-payload on the intermediate, set by importing its file.
    let inter_pem = p.write_input("inter.pem", inter.cert.to_pem().unwrap());
    p.run([
        "rule".as_ref(),
        "set".as_ref(),
        "outbound".as_ref(),
        "audited-payload".as_ref(),
        "import-cert".as_ref(),
        inter_pem.as_os_str(),
        "--mode".as_ref(),
        "all".as_ref(),
    ])
    .ok();
    let (m, s, c) = write_signed(&p, "good", &want, &leaf, &chain);
    let r = check(&m, &s, "sha256", &c);
    assert_eq!(r.code, 0, "{r:?}");

    // Tampered: one byte of the manifest changed after signing.
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("api.example.com", "api.example.org");
    let tampered = p.write_input("tampered.json", text);
    let r = check(&tampered, &s, "sha256", &c);
    assert_eq!(
        (r.code, codes(&r)[0].as_str()),
        (1, "signature-invalid"),
        "{r:?}"
    );

    // Wrong signer: a key from outside the chain.
    let stranger = testpki::issue(
        &inter,
        "Stranger",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let (m2, s2, _) = write_signed(&p, "wrong", &want, &stranger, &chain);
    let r = check(&m2, &s2, "sha256", &c);
    // Without a valid signature the audited-payload grant is out of reach, so the everyone
    // rule's answer is reported too.
    assert_eq!(
        codes(&r),
        ["signature-invalid", "url-not-whitelisted"],
        "{r:?}"
    );

    let r = check(&m, &s, "sha1", &c);
    assert_eq!(
        codes(&r),
        ["unsupported-algorithm", "url-not-whitelisted"],
        "{r:?}"
    );

    let unknown_root = testpki::root("Unknown Root", KeyKind::EcP256, Validity::current());
    let unknown_leaf = testpki::issue(
        &unknown_root,
        "Unknown Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let (m3, s3, c3) = write_signed(
        &p,
        "unknown",
        &want,
        &unknown_leaf,
        &unknown_leaf.cert.to_pem().unwrap(),
    );
    let r = check(&m3, &s3, "sha256", &c3);
    assert_eq!(
        codes(&r),
        ["cert-chain-untrusted", "url-not-whitelisted"],
        "{r:?}"
    );

    let old_leaf = testpki::issue(
        &inter,
        "Old Author",
        KeyKind::EcP256,
        false,
        Validity::expired(),
    );
    let (m4, s4, c4) = write_signed(
        &p,
        "old",
        &want,
        &old_leaf,
        &testpki::pem(&[&old_leaf.cert, &inter.cert]),
    );
    let r = check(&m4, &s4, "sha256", &c4);
    assert_eq!(codes(&r), ["cert-expired", "url-not-whitelisted"], "{r:?}");

    let old_inter = testpki::issue(
        &root,
        "Old Inter",
        KeyKind::EcP256,
        true,
        Validity::expired(),
    );
    let leaf5 = testpki::issue(
        &old_inter,
        "Author5",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let (m5, s5, c5) = write_signed(
        &p,
        "oldinter",
        &want,
        &leaf5,
        &testpki::pem(&[&leaf5.cert, &old_inter.cert]),
    );
    let r = check(&m5, &s5, "sha256", &c5);
    assert_eq!(codes(&r), ["cert-expired", "url-not-whitelisted"], "{r:?}");

    // Expired manifest, judged at a time after its expiry.
    let r = p.check(&m, None, &["--now", "2100-06-01T00:00:00Z"]);
    assert_eq!(
        codes(&r),
        [
            "manifest-expired",
            "signature-missing",
            "url-not-whitelisted"
        ],
        "{r:?}"
    );

    // Outbound disabled beats every grant.
    p.run(["rule", "disable", "outbound"]).ok();
    let r = check(&m, &s, "sha256", &c);
    assert_eq!(codes(&r), ["outbound-disabled"], "{r:?}");
    p.run(["rule", "enable", "outbound"]).ok();
    assert_eq!(check(&m, &s, "sha256", &c).code, 0);
}

#[test]
fn whitelist_strictness_through_the_cli() {
    let p = Provider::new();
    let added = p
        .run(["--json", "whitelist", "add", "-p", "api.example.com"])
        .ok()
        .json();
    let id = added[0]["id"].as_str().unwrap().to_owned();
    p.run([
        "whitelist",
        "add",
        "-p",
        r"[a-z]+\.cdn\.example\.net",
        "-t",
        "regex",
    ])
    .ok();
    let table = p.run(["whitelist", "list"]).ok().stdout;
    assert!(
        table.contains(&format!("{id}  strict  api.example.com")),
        "{table}"
    );

    let check = |urls: &[&str]| {
        let f = p.write_input("m.json", serde_json::to_vec(&manifest(urls)).unwrap());
        p.check(&f, None, &[])
    };
    assert_eq!(check(&["https://api.example.com/v1"]).code, 0);
    assert_eq!(check(&["https://img.cdn.example.net"]).code, 0);
    for evil in [
        "https://evil-api.example.com",
        "https://api.example.com.evil.net",
        "https://img.cdn.example.net.evil.org",
        "https://x.img.cdn.example.net",
    ] {
        let r = check(&[evil]);
        assert_eq!(r.code, 1, "{evil}: {r:?}");
        assert_eq!(r.json()["reasons"][0]["code"], "url-not-whitelisted");
    }
    p.run(["whitelist", "remove", &id]).ok();
    assert_eq!(check(&["https://api.example.com/v1"]).code, 1);
}

#[test]
fn blacklist_and_allow_only_by_identity_and_certificate_through_the_cli() {
    let p = Provider::new();
    let root = testpki::root("BL Root", KeyKind::EcP256, Validity::current());
    let leaf = testpki::issue(
        &root,
        "BL Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    let leaf_pem = p.write_input("leaf.pem", leaf.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let (m, s, c) = write_signed(
        &p,
        "bl",
        &manifest(&[]),
        &leaf,
        &leaf.cert.to_pem().unwrap(),
    );
    let check = |node: &str| p.check(&m, Some((&s, "sha256", &c)), &["--node-id", node]);
    assert_eq!(check(PEER).code, 0);

    p.run(["rule", "add", "blacklist", "identity", PEER]).ok();
    let r = check(PEER);
    assert_eq!(r.json()["reasons"][0]["code"], "blacklisted", "{r:?}");
    assert_eq!(check(OTHER_PEER).code, 0);
    p.run(["rule", "remove", "blacklist", "identity", PEER])
        .ok();

    p.run([
        "rule".as_ref(),
        "add".as_ref(),
        "blacklist".as_ref(),
        "certified".as_ref(),
        "import-cert".as_ref(),
        leaf_pem.as_os_str(),
    ])
    .ok();
    assert_eq!(
        check(OTHER_PEER).json()["reasons"][0]["code"],
        "blacklisted"
    );
    // Blacklisting a certificate never makes it trusted.
    assert_eq!(
        p.run(["--json", "keystore", "list"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let leaf_id = certs::cert_id(&leaf.cert);
    p.run([
        "rule",
        "remove",
        "blacklist",
        "certified",
        "cert-id",
        &leaf_id[..12],
    ])
    .ok();
    assert_eq!(check(OTHER_PEER).code, 0);

    p.run(["rule", "add", "allow-only", "identity", PEER]).ok();
    assert_eq!(
        check(OTHER_PEER).code,
        0,
        "allow-only is disabled until enabled"
    );
    p.run(["rule", "enable", "allow-only"]).ok();
    assert_eq!(check(PEER).code, 0);
    assert_eq!(
        check(OTHER_PEER).json()["reasons"][0]["code"],
        "not-allow-listed"
    );
    p.run([
        "rule",
        "add",
        "allow-only",
        "certified",
        "cert-id",
        &leaf_id,
    ])
    .ok();
    assert_eq!(check(OTHER_PEER).code, 0);
    let table = p.run(["rule", "list"]).ok().stdout;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.contains(&vec!["allow-only", "-", "enabled"]),
        "{table}"
    );
    assert!(
        rows.contains(&vec!["allow-only", PEER, "identity"]),
        "{table}"
    );
}

#[test]
fn new_data_dir_defaults() {
    let p = Provider::new();
    let rules = p.run(["--json", "rule", "list"]).ok().json();
    assert_eq!(rules["outbound"]["enabled"], true);
    assert_eq!(rules["outbound"]["everyone"], "whitelist");
    assert_eq!(
        p.run(["--json", "whitelist", "list"]).ok().json(),
        serde_json::json!([])
    );
    assert!(!p.data_dir().exists(), "listing must not create files");
    p.run(["rule", "set", "outbound", "everyone", "--mode", "all"])
        .ok();
    let names: Vec<_> = std::fs::read_dir(p.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names.iter().all(|n| !n.to_string_lossy().contains(".tmp")),
        "{names:?}"
    );
}

/// A pid above any kernel's `pid_max` (at most 2^22): never a running process.
const NEVER_A_PID: u32 = 2_000_000_000;

/// Hidden `.<name>.tmp.<pid>` files of a directory.
fn temps(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".tmp."))
        .collect();
    names.sort();
    names
}

fn listed_ids(p: &Provider) -> std::collections::BTreeSet<String> {
    p.run(["--json", "keystore", "list"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn temps_of_killed_writers_are_never_certificates_and_the_next_write_removes_them() {
    let p = Provider::new();
    p.keystore_add(&[&yagna("certs/foo_ca.cert.pem")]).ok();
    let cert_dir = p.data_dir().join("cert-dir");
    let foo_ca = listed_ids(&p);
    // What writers killed before their rename leave: a whole certificate, a half-written
    // one, a rules file; and the temp of a writer that is still running (this test).
    let inter = std::fs::read(yagna("certs/foo_inter.cert.pem")).unwrap();
    std::fs::write(cert_dir.join(format!(".a.pem.tmp.{NEVER_A_PID}")), &inter).unwrap();
    std::fs::write(
        cert_dir.join(format!(".b.pem.tmp.{NEVER_A_PID}")),
        &inter[..100],
    )
    .unwrap();
    std::fs::write(
        p.data_dir().join(format!(".rules.json.tmp.{NEVER_A_PID}")),
        b"{\"outbound\": {",
    )
    .unwrap();
    let live = format!(".c.pem.tmp.{}", std::process::id());
    std::fs::write(cert_dir.join(&live), &inter).unwrap();

    // Readers skip them (and, holding no lock, leave them).
    assert_eq!(listed_ids(&p), foo_ca);
    assert_eq!(temps(&cert_dir).len(), 3);
    let v = goth_check(&p);
    assert_eq!(v.code, 1, "{v:?}");

    // The next command that takes the lock removes the dead writers' temps, not the live one.
    p.keystore_add(&[&yagna("certs/foo_inter.cert.pem")]).ok();
    assert_eq!(temps(&cert_dir), vec![live]);
    assert_eq!(temps(&p.data_dir()), Vec::<String>::new());
    let ids = listed_ids(&p);
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(
        ids.contains(FOO_INTER) && ids.is_superset(&foo_ca),
        "{ids:?}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&cert_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    files.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}.pem")).collect();
    expected.sort();
    assert_eq!(files, expected);
}

#[test]
fn kill_9_during_keystore_add_leaves_no_temp_after_the_next_command() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let p = Provider::new();
    let root = testpki::root("Kill Root", KeyKind::EcP256, Validity::current());
    let mut all_ids = std::collections::BTreeSet::new();
    let mut bundle = |name: &str| {
        // Several certificates per file: several atomic writes per command, so a kill at a
        // random moment often lands between a temp's creation and its rename.
        let certs: Vec<_> = (0..8)
            .map(|i| {
                testpki::issue(
                    &root,
                    &format!("{name} {i}"),
                    KeyKind::EcP256,
                    false,
                    Validity::current(),
                )
                .cert
            })
            .collect();
        all_ids.extend(certs.iter().map(|c| certs::cert_id(c)));
        p.write_input(
            &format!("{name}.pem"),
            testpki::pem(&certs.iter().collect::<Vec<_>>()),
        )
    };
    let spawn = |path: &std::path::Path| {
        Command::new(tests::util::bin("provider"))
            .arg("--data-dir")
            .arg(p.data_dir())
            .args(["keystore", "add"])
            .arg(path)
            .env_remove("PROVIDER_DATA_DIR")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // How long one whole command takes here: the kills fall within that.
    let first = bundle("first");
    let started = Instant::now();
    assert!(spawn(&first).wait().unwrap().success());
    let span = started.elapsed().as_micros().max(1000) as u64;

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}, one command takes {span} µs");
    let cert_dir = p.data_dir().join("cert-dir");
    let mut left_behind = 0;
    for i in 0..30 {
        let path = bundle(&format!("batch{i}"));
        let mut child = spawn(&path);
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % span));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        left_behind += temps(&cert_dir).len();
    }
    eprintln!("temps seen after the kills (summed over iterations): {left_behind}");

    // The next command that writes cleans up; the keystore holds exactly the certificates
    // whose files were renamed into place, each whole.
    let last = bundle("last");
    p.keystore_add(&[&last]).ok();
    assert_eq!(temps(&cert_dir), Vec::<String>::new());
    assert_eq!(temps(&p.data_dir()), Vec::<String>::new());
    let ids = listed_ids(&p);
    assert!(ids.is_subset(&all_ids), "{ids:?}");
    let mut files: Vec<String> = std::fs::read_dir(&cert_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}.pem")).collect();
    expected.sort();
    assert_eq!(files, expected);
}

/// `images list` shows the cache least recently used first, as a table and as JSON;
/// `images prune --max-size` evicts from the oldest until the rest fits.
#[test]
fn images_list_and_prune_follow_last_use() {
    let p = Provider::new();
    let empty = p.run(["--json", "images", "list"]).ok().json();
    assert_eq!(empty, serde_json::json!([]));
    let dir = p.data_dir().join("images/sha3-256");
    std::fs::create_dir_all(&dir).unwrap();
    for (hex, secs) in [("aa", 3000u64), ("bb", 1000), ("cc", 2000)] {
        let path = dir.join(hex.repeat(32));
        std::fs::write(&path, vec![0u8; 1024]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    }
    let list = p.run(["--json", "images", "list"]).ok().json();
    let order: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["hash"].as_str().unwrap()[9..11].to_owned())
        .collect();
    assert_eq!(order, ["bb", "cc", "aa"], "{list}");
    let table = p.run(["images", "list"]).ok().stdout;
    assert!(table.starts_with("HASH "), "{table}");
    assert!(table.contains("3 image(s), 3.0 KiB"), "{table}");
    let pruned = p
        .run(["--json", "images", "prune", "--max-size", "1500"])
        .ok()
        .json();
    assert_eq!(pruned.as_array().unwrap().len(), 2, "{pruned}");
    let left = p.run(["--json", "images", "list"]).ok().json();
    assert_eq!(left.as_array().unwrap().len(), 1);
    assert!(left[0]["hash"].as_str().unwrap().starts_with("sha3-256:aa"));
    p.run(["images", "prune", "--max-size", "lots"])
        .bad_input("lots");
}

/// A reader that goes away (`provider --json … | head -c1`) ends the command quietly with
/// 141 (SIGPIPE's shell code), not a panic.
#[test]
fn a_closed_stdout_ends_a_listing_quietly() {
    let p = tests::util::Provider::new();
    for args in [
        &["--json", "profile", "runtime", "list"][..],
        &["profile", "runtime", "list"][..],
    ] {
        // A pipe whose read end is closed before the command starts: its first write
        // fails with EPIPE, whatever the scheduling (closing it after the spawn raced the
        // command's write on a loaded machine).
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe(2) just returned these two open descriptors, owned by nothing else.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd as _;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(read);
        let child = std::process::Command::new(tests::util::bin("provider"))
            .arg("--data-dir")
            .arg(p.data_dir())
            .args(args)
            .stdout(std::process::Stdio::from(write))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
