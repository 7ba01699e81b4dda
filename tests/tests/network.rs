//! Provider daemon and requestor CLI as two processes over real TCP + noise + yamux on
//! loopback: every kind of reject reaches the requestor with its code and message, rule
//! changes apply to a running daemon, and the daemon stops cleanly on SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use certs::testpki::{self, Issued, KeyKind, Validity};
use provider::testsupport::SmallDisk;
use tests::util::{manifest, write_signed, Daemon, Provider, Run};

struct Setup {
    p: Provider,
    author: Issued,
    chain: Vec<u8>,
    script: PathBuf,
}

/// A data dir trusting a fresh root, an author under it, and a harmless script.
fn setup() -> Setup {
    setup_in(Provider::new())
}

/// [`setup`] in `p` (whose data dir may be on a disk of the test's own).
fn setup_in(p: Provider) -> Setup {
    let root = testpki::root("E2E Root", KeyKind::EcP256, Validity::current());
    let author = testpki::issue(
        &root,
        "E2E Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let chain = testpki::pem(&[&author.cert]);
    let script = p.write_input(
        "batch.json",
        r#"[{"deploy":{}},{"start":{}},{"run":{"entry_point":"/bin/echo","args":["hi"]}}]"#,
    );
    Setup {
        p,
        author,
        chain,
        script,
    }
}

/// `requestor submit` of manifest `m` signed by the setup's author.
fn submit(s: &Setup, d: &Daemon, stem: &str, m: &serde_json::Value, extra: &[&str]) -> Run {
    submit_signed(
        s,
        d,
        write_signed(&s.p, stem, m, &s.author, &s.chain),
        extra,
    )
}

/// `requestor submit` of already written (manifest, signature, chain) files.
fn submit_signed(
    s: &Setup,
    d: &Daemon,
    (mf, sig, cert): (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    extra: &[&str],
) -> Run {
    let mut args: Vec<String> = vec![
        "submit".into(),
        "--provider".into(),
        d.addr.clone(),
        "--manifest".into(),
        mf.display().to_string(),
        "--sig".into(),
        sig.display().to_string(),
        "--sig-alg".into(),
        "sha256".into(),
        "--cert".into(),
        cert.display().to_string(),
        "--script".into(),
        s.script.display().to_string(),
        "--timeout".into(),
        "60s".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    s.p.requestor(args)
}

/// The requestor exited 1 and printed `code` with a message.
fn assert_rejected(r: &Run, code: &str) {
    assert_eq!(r.code, 1, "expected a reject with {code}: {r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with(&format!("rejected: {code}: ")))
        .unwrap_or_else(|| panic!("no `rejected: {code}: …` line: {r:?}"));
    assert!(
        line.len() > format!("rejected: {code}: ").len() + 10,
        "the message says nothing: {line}"
    );
}

#[test]
fn every_reject_reaches_the_requestor_with_its_code() {
    let s = setup();
    let d = s.p.daemon(&[]);

    // Untrusted chain: an author under a root the provider does not know.
    let stranger_root = testpki::root("Stranger", KeyKind::EcP256, Validity::current());
    let stranger = testpki::issue(
        &stranger_root,
        "S",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let files = write_signed(
        &s.p,
        "untrusted",
        &manifest(&[]),
        &stranger,
        &testpki::pem(&[&stranger.cert]),
    );
    let r = submit_signed(&s, &d, files, &[]);
    assert_rejected(&r, "cert-chain-untrusted");

    // Bad signature: signed by a key that is not the certificate's.
    let other = testpki::issue(
        &stranger_root,
        "O",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let files = write_signed(&s.p, "badsig", &manifest(&[]), &other, &s.chain);
    let r = submit_signed(&s, &d, files, &[]);
    assert_rejected(&r, "signature-invalid");

    // Expired manifest.
    let mut expired = manifest(&[]);
    expired["expiresAt"] = "2024-06-01T00:00:00Z".into();
    assert_rejected(
        &submit(&s, &d, "expired", &expired, &[]),
        "manifest-expired",
    );

    // A payload the provider's host would fetch from its own files.
    let mut local = manifest(&[]);
    local["payload"][0]["urls"] = serde_json::json!(["file:///etc/hostname"]);
    let r = submit(&s, &d, "local", &local, &[]);
    assert_rejected(&r, "payload-url-refused");

    // The demand's constraints over the offer cannot be met.
    let r = submit(
        &s,
        &d,
        "big",
        &manifest(&[]),
        &["--constraints", "(golem.inf.mem.gib>=100000)"],
    );
    assert_rejected(&r, "constraints-unmet");
    assert!(r.stderr.contains("golem.inf.mem.gib"), "{r:?}");

    // A URL that is not on the whitelist (everyone = whitelist by default).
    let r = submit(&s, &d, "wl", &manifest(&["https://api.example.com"]), &[]);
    assert_rejected(&r, "url-not-whitelisted");
    assert!(r.stderr.contains("api.example.com"), "{r:?}");

    // Blacklisted peer: the rule is added while the daemon runs.
    let id_file = s.p.input("requestor.key");
    let peer =
        s.p.requestor(["identity", "--identity", id_file.to_str().unwrap()]);
    assert_eq!(peer.code, 0, "{peer:?}");
    let peer = peer.stdout.trim().to_owned();
    s.p.run(["rule", "add", "blacklist", "identity", &peer])
        .ok();
    let r = submit(
        &s,
        &d,
        "black",
        &manifest(&[]),
        &["--identity", id_file.to_str().unwrap()],
    );
    assert_rejected(&r, "blacklisted");
    assert!(r.stderr.contains(&peer), "{r:?}");

    // Every verdict is in the audit log.
    let audit = std::fs::read_to_string(s.p.data_dir().join("audit.jsonl")).unwrap();
    for code in [
        "cert-chain-untrusted",
        "signature-invalid",
        "manifest-expired",
        "payload-url-refused",
        "constraints-unmet",
        "url-not-whitelisted",
        "blacklisted",
    ] {
        assert!(
            audit.contains(&format!("\"code\":\"{code}\"")),
            "{code} not audited: {audit}"
        );
    }
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_a_restart_keeps_its_identity() {
    let s = setup();
    let mut d = s.p.daemon(&[]);
    let first = d.peer_id().to_owned();
    assert_eq!(d.stop(Duration::from_secs(20)), Some(0), "{}", d.logs());
    let key = s.p.data_dir().join("identity.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "identity.key must be private");
    let d2 = s.p.daemon(&[]);
    assert_eq!(d2.peer_id(), first, "the identity changed across restarts");
}

#[test]
fn unreachable_provider_and_bad_input_have_their_own_exit_codes() {
    let s = setup();
    // Nothing listens there.
    let (mf, sig, cert) = write_signed(&s.p, "m", &manifest(&[]), &s.author, &s.chain);
    let r = s.p.requestor([
        "submit",
        "--provider",
        "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo",
        "--manifest",
        mf.to_str().unwrap(),
        "--sig",
        sig.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--script",
        s.script.to_str().unwrap(),
        "--timeout",
        "20s",
    ]);
    assert_eq!(r.code, 3, "{r:?}");
    // A script that is not ExeScript never goes on the wire.
    let bad = s.p.write_input("bad.json", r#"[{"launch":{}}]"#);
    let r = s.p.requestor([
        "submit",
        "--provider",
        "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo",
        "--manifest",
        mf.to_str().unwrap(),
        "--script",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("launch"), "{r:?}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn fifty_requestors_with_twenty_concurrent_demands_each_are_all_answered() {
    use net::wire::{props, MarketRequest, MarketResponse};
    use net::{Keypair, NetConfig};
    let s = setup();
    let cfg = s.p.write_input("config.json", r#"{"proposal_ttl": "2s"}"#);
    // glibc's malloc as the systemd unit runs the daemon (docs/systemd/provider.service):
    // with its default of up to 8 arenas a core, the many threads serving 1000 concurrent
    // demands spread the heap over arenas whose fragmentation grows RSS round after round
    // (measured, 12 rounds: 98 → 117 MiB; with one arena 88.0 → 89.9 MiB), which would
    // hide a leak of the daemon's own as well as fake one.
    let d = s.p.daemon_env(
        &[("MALLOC_ARENA_MAX", "2")],
        &["--config", cfg.to_str().unwrap()],
    );
    let (mf, sig, cert) = write_signed(&s.p, "load", &manifest(&[]), &s.author, &s.chain);
    let b64 = |b: &[u8]| tests::util::b64(b);
    let properties: std::collections::BTreeMap<String, serde_json::Value> = [
        (props::PAYLOAD, b64(&std::fs::read(&mf).unwrap())),
        (props::PAYLOAD_SIG, std::fs::read_to_string(&sig).unwrap()),
        (props::PAYLOAD_SIG_ALG, "sha256".into()),
        (props::PAYLOAD_CERT, b64(&std::fs::read(&cert).unwrap())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
    .collect();
    let addr: net::Multiaddr = d.addr.parse().unwrap();
    let provider: net::PeerId = d.peer_id().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // One round: 50 requestor peers, each with 20 demands in flight at once.
    let round = || {
        rt.block_on(async {
            let mut peers = Vec::new();
            for _ in 0..50 {
                let addr = addr.clone();
                let properties = properties.clone();
                peers.push(tokio::spawn(async move {
                    let (client, _inbound, event_loop) = net::new(
                        Keypair::generate_ed25519(),
                        NetConfig {
                            mdns: false,
                            ..NetConfig::default()
                        },
                    )
                    .unwrap();
                    let el = tokio::spawn(event_loop.run());
                    client.dial(addr).await.unwrap();
                    let demands = (0..20).map(|_| {
                        client.market(
                            provider,
                            MarketRequest::Demand {
                                properties: properties.clone(),
                                constraints: String::new(),
                            },
                        )
                    });
                    let answers = futures::future::join_all(demands).await;
                    el.abort();
                    answers
                }));
            }
            let mut accepted = 0;
            for p in peers {
                for a in p.await.unwrap() {
                    match a {
                        Ok(MarketResponse::Proposal { .. }) => accepted += 1,
                        other => panic!("a demand was not accepted: {other:?}"),
                    }
                }
            }
            accepted
        })
    };
    assert_eq!(round(), 1000);
    // The first round grows the daemon to its working size (allocator arenas, caches).
    std::thread::sleep(Duration::from_secs(3));
    let settled = rss_kib(d.pid());
    for _ in 0..3 {
        assert_eq!(round(), 1000);
        eprintln!("daemon RSS: {} KiB", rss_kib(d.pid()));
    }
    std::thread::sleep(Duration::from_secs(3));
    // Expired proposals are purged as new ones arrive: a few more demands trigger it.
    let _ = round();
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(d.pid());
    eprintln!("daemon RSS: {settled} KiB after the first round, {after} KiB after four more");
    // Since discovery (gossipsub, Kademlia, AutoNAT, relay) and the operator's ledger
    // joined the daemon, its heap grows in steps over the first rounds and then holds
    // (measured over 10 rounds: 97 → 104 MiB, flat, → 113 MiB, flat); a leak per demand
    // would grow every round by about the same. The bound is a quarter over the settled size.
    assert!(
        after <= settled + settled / 4 + 4096,
        "the daemon's memory keeps growing: {settled} KiB → {after} KiB"
    );
    let audit = std::fs::read_to_string(s.p.data_dir().join("audit.jsonl")).unwrap();
    let verdicts = audit
        .lines()
        .filter(|l| l.contains(r#""event":"verdict""#))
        .count();
    assert_eq!(verdicts, 5000, "every demand leaves one verdict line");
}

#[test]
fn requestor_signs_a_manifest_the_provider_accepts() {
    let s = setup();
    s.p.write_input(
        "author.key",
        s.author.key.private_key_to_pem_pkcs8().unwrap(),
    );
    let m =
        s.p.write_input("m.json", serde_json::to_vec_pretty(&manifest(&[])).unwrap());
    let cert = s.p.write_input("author.pem", &s.chain);
    // Relative paths, as a person types them (the requestor runs in the inputs dir).
    for alg in ["sha256", "sha384", "sha512"] {
        let r = s.p.requestor([
            "manifest",
            "sign",
            "--manifest",
            "m.json",
            "--key",
            "author.key",
            "--alg",
            alg,
            "--out",
            "m.sig",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        let sig = s.p.input("m.sig");
        let v = s.p.check(&m, Some((&sig, alg, &cert)), &[]);
        assert_eq!(v.code, 0, "{alg}: {v:?}");
        assert_eq!(v.json()["verdict"], "accept");
    }
    // A key that is not a key changes nothing and says so.
    s.p.write_input("bad.key", "not a key");
    let r = s.p.requestor([
        "manifest",
        "sign",
        "--manifest",
        "m.json",
        "--key",
        "bad.key",
        "--out",
        "other.sig",
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("bad.key"), "{r:?}");
    assert!(!s.p.input("other.sig").exists());
}

#[test]
fn requestor_offers_lists_a_provider_found_by_mdns() {
    if provider::testsupport::rerun_in_private_netns(
        "requestor_offers_lists_a_provider_found_by_mdns",
    ) {
        return;
    }
    let s = setup();
    let d = s.p.daemon_with(&["--listen", "/ip4/0.0.0.0/tcp/0"]);
    let r = s.p.requestor(["--json", "offers", "--wait", "3s"]);
    assert_eq!(r.code, 0, "{r:?}");
    let list = r.json();
    let found = list
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["provider_id"] == d.peer_id())
        .unwrap_or_else(|| panic!("the provider was not found: {list}\n{}", d.logs()));
    assert_eq!(found["properties"]["golem.runtime.name"], "vm");
    assert_eq!(found["source"], "mdns", "{found}");
    assert!(
        found["addresses"][0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/10.77.0.1/"),
        "{found}"
    );
}

#[test]
fn a_daemon_that_cannot_start_says_why_and_writes_nothing() {
    let p = Provider::new();
    let before = p.snapshot();
    p.run(["run", "--listen", "not-an-address"])
        .bad_input("not-an-address");
    let cfg = p.write_input("c.json", r#"{"max_job": 2}"#);
    p.run(["run", "--config", cfg.to_str().unwrap()])
        .bad_input("max_job");
    let cfg = p.write_input("c2.json", r#"{"agreement_ttl": "forever"}"#);
    p.run(["run", "--config", cfg.to_str().unwrap()])
        .bad_input("agreement_ttl");
    assert_eq!(p.snapshot(), before, "a failed start changed the data dir");
    assert!(!p.data_dir().join("identity.key").exists());
}

/// The fault campaign's negotiation crash point (docs/robustness.md): `kill -9` of the
/// daemon while demands are in flight, at a different moment each round (the delays are
/// spread over the time a round of demands takes, from a seed printed for replay). After
/// each restart: the same identity, no half-written file anywhere in the data dir, an audit
/// log whose lines all parse but at most the one torn by the kill per round, and a new
/// demand answered with its verdict.
#[test]
fn kill_9_during_negotiation_leaves_a_clean_data_dir_and_a_restart_serves() {
    let s = setup();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    eprintln!("kill points seeded with {seed}");
    let stranger_root = testpki::root("Stranger", KeyKind::EcP256, Validity::current());
    let stranger = testpki::issue(
        &stranger_root,
        "S",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let files = write_signed(
        &s.p,
        "untrusted",
        &manifest(&[]),
        &stranger,
        &testpki::pem(&[&stranger.cert]),
    );
    let mut identity = None;
    let rounds = 3u32;
    for round in 0..rounds {
        let mut d = s.p.daemon(&[]);
        if let Some(id) = &identity {
            assert_eq!(d.peer_id(), id, "round {round}: the identity changed");
        }
        identity = Some(d.peer_id().to_owned());
        let requestors: Vec<std::process::Child> = (0..4)
            .map(|_| {
                std::process::Command::new(tests::util::bin("requestor"))
                    .args(["submit", "--provider", &d.addr, "--manifest"])
                    .arg(&files.0)
                    .arg("--sig")
                    .arg(&files.1)
                    .arg("--cert")
                    .arg(&files.2)
                    .arg("--script")
                    .arg(&s.script)
                    .args(["--timeout", "20s"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        // Somewhere in 0..1200 ms: from before the first demand lands to after the last.
        let delay = (seed.wrapping_mul(2654435761).wrapping_add(round * 40503)) % 1200;
        std::thread::sleep(Duration::from_millis(u64::from(delay)));
        tests::util::signal(d.pid(), "KILL");
        let _ = d.child.wait();
        for mut r in requestors {
            let _ = r.kill();
            let _ = r.wait();
        }
        let data = s.p.data_dir();
        let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap_or_default();
        let torn = audit
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
            .count();
        assert!(
            torn <= round as usize + 1,
            "round {round} (kill at {delay} ms): {torn} torn lines:\n{audit}"
        );
        let left = tests::util::half_written_files(&data);
        assert!(
            left.is_empty(),
            "round {round} (kill at {delay} ms): half-written files {left:?}"
        );
    }
    let d = s.p.daemon(&[]);
    let r = submit_signed(&s, &d, files, &[]);
    assert_rejected(&r, "cert-chain-untrusted");
    let audit = std::fs::read_to_string(s.p.data_dir().join("audit.jsonl")).unwrap();
    let last_verdict = audit
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "verdict")
        .expect("the last demand was audited");
    assert_eq!(last_verdict["verdict"], "reject");
}

/// Fault campaign (docs/robustness.md): the data dir's disk fills up under a running
/// daemon. Demands are still answered; the audit lines that did not fit are reported in
/// the daemon's log; a rule change fails with the reason and leaves the rules file as it
/// was; once there is room again the audit log goes on with whole lines (a line torn by
/// the full disk is ended, never glued to the next one).
#[test]
fn a_full_data_disk_fails_writes_clearly_and_corrupts_nothing() {
    let p = Provider::new();
    let Some(disk) = SmallDisk::mount(&p.data_dir(), 64 << 20) else {
        return;
    };
    let s = setup_in(p);
    // A daemon refuses to sell more disk than its data dir has: a profile and a job size
    // that fit the small disk.
    s.p.run(["profile", "set", "--storage", "32M"]).ok();
    let cfg = s.p.write_input("small.json", r#"{"storage": "16MiB"}"#);
    let d = s.p.daemon(&["--config", cfg.to_str().unwrap()]);
    let m = manifest(&[]);
    assert_eq!(submit(&s, &d, "before", &m, &["--dry-run"]).code, 0);
    let rules = std::fs::read(s.p.data_dir().join("rules.json")).ok();

    let filler = disk.fill();
    // The audit file's last page may still hold a few lines: demands until one does not.
    for i in 0.. {
        let r = submit(&s, &d, &format!("full{i}"), &m, &["--dry-run"]);
        assert_eq!(
            r.code,
            0,
            "a demand went unanswered on a full disk: {r:?}\n{}",
            d.logs()
        );
        if d.logs().contains("cannot write audit line") {
            break;
        }
        assert!(
            i < 40,
            "40 demands on a full disk and no audit write failed:\n{}",
            d.logs()
        );
    }
    let r =
        s.p.run(["rule", "set", "outbound", "everyone", "--mode", "all"]);
    assert_ne!(
        r.code, 0,
        "a rule change on a full disk claimed success: {r:?}"
    );
    assert!(
        r.stderr.contains("No space left on device"),
        "the reason is not given: {r:?}"
    );
    assert_eq!(
        std::fs::read(s.p.data_dir().join("rules.json")).ok(),
        rules,
        "the rules file changed on a failed write"
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(submit(&s, &d, "after", &m, &["--dry-run"]).code, 0);
    let audit = std::fs::read_to_string(s.p.data_dir().join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = audit.lines().collect();
    let torn = lines
        .iter()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .count();
    assert!(torn <= 1, "more than one torn audit line:\n{audit}");
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(last.is_object(), "{audit}");
    assert!(
        audit.matches("\"verdict\":\"accept\"").count() >= 2,
        "the demands before and after are not audited:\n{audit}"
    );
    let left = tests::util::half_written_files(&s.p.data_dir());
    assert!(left.is_empty(), "half-written files left: {left:?}");
    drop(d);
    drop(disk);
}
