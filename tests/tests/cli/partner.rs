//! The partner outbound rule through the command line: Golem certificates in the keystore,
//! `rule set outbound partner`, and `manifest check --node-descriptor` with yagna's vectors.

use tests::util::{manifest, yagna, Provider};

const ROOT_ID: &str = "80c84b2701126669966f46c1159cae89c58fb088e8bf94b318358fa4ca33ee56d8948511a397e5aba6aa5b88fff36f2541a91b133cde0fb816e8592b695c04c3";
const ZERO_NODE: &str = "0x0000000000000000000000000000000000000000";
/// Inside every yagna vector's validity (the invalid-signature one ends in 2025).
const NOW: &str = "2024-06-01T00:00:00Z";

/// A table's words, single-spaced, so assertions do not depend on column widths.
fn words(table: &str) -> String {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn cert(name: &str) -> String {
    yagna(&format!("certs/{name}")).display().to_string()
}

/// `manifest check` of a manifest wanting https://domain.com/ with a descriptor.
fn check_descriptor(p: &Provider, descriptor: Option<&str>) -> tests::util::Run {
    let m = p.write_input(
        "domain.json",
        serde_json::to_vec(&manifest(&["https://domain.com/"])).unwrap(),
    );
    let mut extra = vec!["--node-id", ZERO_NODE, "--now", NOW];
    let path;
    if let Some(name) = descriptor {
        path = cert(name);
        extra.extend(["--node-descriptor", path.as_str()]);
    }
    p.check(&m, None, &extra)
}

#[test]
fn import_cert_sets_a_partner_rule_that_yagna_descriptors_meet_as_in_yagna() {
    let p = Provider::new();
    p.run(["rule", "set", "outbound", "everyone", "--mode", "none"])
        .ok();
    let table = p
        .run([
            "rule",
            "set",
            "outbound",
            "partner",
            "import-cert",
            &cert("root-certificate.signed.json"),
            "--mode",
            "all",
            "--description",
            "yagna example",
        ])
        .ok()
        .stdout;
    assert!(
        words(&table)
            .contains("outbound partner 80c84b2701126669 all Example root cert — yagna example"),
        "{table}"
    );
    let rules = p.run(["--json", "rule", "list"]).ok().json();
    assert_eq!(rules["outbound"]["partner"][ROOT_ID]["mode"], "all");
    // The certificate joined the keystore as a Golem certificate.
    let list = p.run(["--json", "keystore", "list"]).ok().json();
    assert_eq!(list[0]["id"], ROOT_ID);
    assert_eq!(list[0]["type"], "golem");
    assert_eq!(list[0]["subject"], "Example root cert");
    assert!(p
        .data_dir()
        .join(format!("cert-dir/{ROOT_ID}.signed.json"))
        .exists());

    let v = check_descriptor(&p, Some("node-descriptor-happy-path.signed.json"))
        .ok()
        .json();
    assert_eq!(v["matched_rule"]["rule"], "partner");
    assert_eq!(v["matched_rule"]["cert_id"], ROOT_ID);
    assert_eq!(v["matched_rule"]["subject"], "Example root cert");

    for (descriptor, code) in [
        (
            "node-descriptor-different-node.signed.json",
            "node-id-mismatch",
        ),
        (
            "node-descriptor-invalid-signature.signed.json",
            "signature-invalid",
        ),
        (
            "node-descriptor-no-permissions.signed.json",
            "outbound-rule-none",
        ),
    ] {
        let run = check_descriptor(&p, Some(descriptor));
        assert_eq!(run.code, 1, "{descriptor}: {run:?}");
        let v = run.json();
        assert_eq!(v["reasons"][0]["code"], code, "{descriptor}: {v}");
        // The everyone rule's own refusal follows.
        assert_eq!(v["reasons"][1]["code"], "outbound-rule-none", "{v}");
    }
    let run = check_descriptor(&p, None);
    assert_eq!(run.code, 1);
    assert_eq!(run.json()["reasons"][0]["code"], "signature-missing");

    // The human-readable verdict names the rule.
    let m = p.write_input(
        "domain.json",
        serde_json::to_vec(&manifest(&["https://domain.com/"])).unwrap(),
    );
    let text = p
        .run([
            "manifest",
            "check",
            "--manifest",
            m.to_str().unwrap(),
            "--node-id",
            ZERO_NODE,
            "--node-descriptor",
            &cert("node-descriptor-happy-path.signed.json"),
            "--now",
            NOW,
        ])
        .ok()
        .stdout;
    assert!(
        text.contains("outbound granted by: partner 80c84b2701126669 Example root cert (mode all)"),
        "{text}"
    );

    // Removing the certificate from the keystore takes its partner rule with it.
    p.run(["keystore", "remove", "80c84b"]).ok();
    let rules = p.run(["--json", "rule", "list"]).ok().json();
    assert_eq!(rules["outbound"]["partner"], serde_json::json!({}));
    assert!(!p
        .data_dir()
        .join(format!("cert-dir/{ROOT_ID}.signed.json"))
        .exists());
}

#[test]
fn cert_id_names_a_golem_certificate_already_in_the_keystore() {
    let p = Provider::new();
    p.keystore_add(&[&yagna("certs/partner-certificate.signed.json")])
        .ok();
    // An X.509 certificate's id does not name a Golem certificate.
    p.keystore_add(&[&yagna("certs/foo_ca.cert.pem")]).ok();
    let table = p.run(["keystore", "list"]).ok().stdout;
    assert!(
        table.contains("  yes  golem  Example partner cert"),
        "{table}"
    );
    assert!(table.contains("  yes  x509   C=PL"), "{table}");
    p.run([
        "rule", "set", "outbound", "partner", "cert-id", "fe4f04", "--mode", "all",
    ])
    .bad_input("no certificate in the keystore has an id starting with `fe4f04`");
    let table = p
        .run([
            "rule", "set", "outbound", "partner", "cert-id", "c525ae", "--mode", "none",
        ])
        .ok()
        .stdout;
    assert!(
        words(&table).contains("outbound partner c525ae05cd9441d9 none Example partner cert"),
        "{table}"
    );
    // The partner certificate is the descriptor's signer: its `none` decides.
    let v = check_descriptor(&p, Some("node-descriptor-happy-path.signed.json")).json();
    assert_eq!(v["verdict"], "reject");
    assert_eq!(v["reasons"][0]["code"], "outbound-rule-none");
    assert!(
        v["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("partner rule for `Example partner cert`"),
        "{v}"
    );
}

#[test]
fn bad_golem_input_is_one_line_exit_2_and_changes_nothing() {
    let p = Provider::new();
    p.run([
        "rule",
        "set",
        "outbound",
        "partner",
        "import-cert",
        &cert("root-certificate.signed.json"),
        "--mode",
        "all",
    ])
    .ok();
    let before = p.snapshot();

    // Expired and not yet valid Golem certificates are refused, as yagna refuses them.
    p.keystore_add(&[&yagna("certs/golem.cert.expired.signed.json")])
        .bad_input("certificate `Expired cert` expired at 1987-10-31");
    p.run([
        "rule",
        "set",
        "outbound",
        "partner",
        "import-cert",
        &cert("golem.cert.not_yet_valid.signed.json"),
        "--mode",
        "all",
    ])
    .bad_input("is not valid before 2187-01-01");
    // A node descriptor is not a certificate; an X.509 file is not a Golem one.
    p.keystore_add(&[&yagna("certs/node-descriptor-happy-path.signed.json")])
        .bad_input("is a node descriptor, not a certificate");
    p.run([
        "rule",
        "set",
        "outbound",
        "partner",
        "import-cert",
        &cert("foo_ca.cert.pem"),
        "--mode",
        "all",
    ])
    .bad_input("is not a Golem certificate");
    // A tampered certificate: its self-signature fails.
    let mut tampered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cert("root-certificate.signed.json")).unwrap())
            .unwrap();
    tampered["certificate"]["subject"]["displayName"] = "Evil root".into();
    let tampered = p.write_input("tampered.signed.json", tampered.to_string());
    p.keystore_add(&[&yagna("certs/partner-certificate.signed.json"), &tampered])
        .bad_input("the signature of certificate `Evil root` does not verify");

    // A corrupt descriptor for manifest check is bad input, not a verdict.
    let m = p.write_input(
        "domain.json",
        serde_json::to_vec(&manifest(&["https://domain.com/"])).unwrap(),
    );
    let corrupt = p.write_input("corrupt.signed.json", "{\"nodeDescriptor\": {\"nodeId\": ");
    let check = |descriptor: &std::path::Path| {
        p.run([
            "manifest".as_ref(),
            "check".as_ref(),
            "--manifest".as_ref(),
            m.as_os_str(),
            "--node-id".as_ref(),
            ZERO_NODE.as_ref(),
            "--node-descriptor".as_ref(),
            descriptor.as_os_str(),
        ])
    };
    check(&corrupt).bad_input("corrupt.signed.json: node descriptor: not JSON");
    let unknown = p.write_input(
        "unknown.signed.json",
        std::fs::read_to_string(cert("node-descriptor-happy-path.signed.json"))
            .unwrap()
            .replacen("\"nodeId\"", "\"allowAll\": true, \"nodeId\"", 1),
    );
    check(&unknown).bad_input("unknown field `allowAll`");
    check(&p.input("missing.json")).bad_input("cannot read");
    p.check(&m, None, &["--node-id", "0xnothex"])
        .bad_input("is not a libp2p peer id");

    // A Golem certificate file hand-dropped into cert-dir that does not parse is named.
    assert_eq!(p.snapshot(), before);
    std::fs::write(
        p.data_dir().join("cert-dir/broken.signed.json"),
        "{\"certificate\": {}}",
    )
    .unwrap();
    p.run(["keystore", "list"]).bad_input("broken.signed.json");
}

/// The partner rule over the network: the provider trusts yagna's root as a partner; a
/// requestor sends a node descriptor issued (with yagna's partner key) for its own libp2p
/// peer id. The daemon compares the descriptor's `nodeId` with the peer id from the noise
/// handshake, so the same descriptor from another peer is refused.
#[test]
fn a_node_descriptor_for_the_requestors_peer_id_meets_the_partner_rule_over_the_network() {
    use certs::testpki::golem::{descriptor, sign, to_bytes, yagna_key};
    let p = Provider::new();
    p.run(["rule", "set", "outbound", "everyone", "--mode", "none"])
        .ok();
    p.run([
        "rule",
        "set",
        "outbound",
        "partner",
        "import-cert",
        &cert("root-certificate.signed.json"),
        "--mode",
        "all",
    ])
    .ok();
    let id_file = p.input("requestor.key");
    let peer = p.requestor(["identity", "--identity", id_file.to_str().unwrap()]);
    assert_eq!(peer.code, 0, "{peer:?}");
    let peer = peer.stdout.trim().to_owned();
    let partner: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cert("partner-certificate.signed.json")).unwrap())
            .unwrap();
    // Inside the partner certificate's validity, around today.
    let d = sign(
        "nodeDescriptor",
        descriptor(
            &peer,
            ("2026-01-01T00:00:00Z", "2029-12-31T00:00:00Z"),
            serde_json::json!({"outbound": {"urls": ["https://domain.com/"]}}),
        ),
        &yagna_key(&yagna("certs/partner-keypair.key")),
        partner,
    );
    let d_file = p.write_input("descriptor.json", to_bytes(&d));
    let m = p.write_input(
        "m.json",
        serde_json::to_vec(&manifest(&["https://domain.com/"])).unwrap(),
    );
    let daemon = p.daemon(&[]);
    let submit = |identity: &str| {
        p.requestor([
            "--json",
            "submit",
            "--dry-run",
            "--provider",
            &daemon.addr,
            "--manifest",
            m.to_str().unwrap(),
            "--node-descriptor",
            d_file.to_str().unwrap(),
            "--identity",
            identity,
        ])
    };
    let r = submit(id_file.to_str().unwrap());
    assert_eq!(r.code, 0, "{r:?}\n{}", daemon.logs());
    let proposal: serde_json::Value =
        serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(proposal["event"], "proposal");
    assert_eq!(proposal["matched_rule"]["rule"], "partner");
    assert_eq!(proposal["matched_rule"]["cert_id"], ROOT_ID);

    // The same descriptor from another peer.
    let other = p.input("other.key");
    let r = submit(other.to_str().unwrap());
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("rejected: node-id-mismatch: "), "{r:?}");
    assert!(
        r.stderr.contains(&peer),
        "the message names the descriptor's node: {r:?}"
    );
}
