//! The operator's daemon commands without a VM: the hardware profile, presets, what the
//! offer advertises and charges, capacity under concurrent demands, `status`, `jobs`,
//! `audit` and `self-test`, each as a table and as `--json`. (A job's usage and its signed
//! amount need a VM: `usage.rs`.)

use std::time::Duration;

use certs::testpki::{self, KeyKind, Validity};
use net::wire::{props, MarketRequest, MarketResponse};
use serde_json::Value;
use tests::util::{manifest, write_signed, Daemon, Provider};

/// A provider trusting a fresh root, and the (manifest, sig, chain) of a demand signed
/// under it that asks for no outbound traffic.
fn setup() -> (
    Provider,
    (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
) {
    let p = Provider::new();
    let root = testpki::root("Ops Root", KeyKind::EcP256, Validity::current());
    let author = testpki::issue(
        &root,
        "Ops Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let files = write_signed(
        &p,
        "ops",
        &manifest(&[]),
        &author,
        &testpki::pem(&[&author.cert]),
    );
    (p, files)
}

fn host_threads() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

#[test]
fn profile_show_and_set_refuse_more_than_the_host_has() {
    let p = Provider::new();
    let show = p.run(["profile", "show"]).ok();
    assert!(
        show.stdout.contains("cpu threads") && show.stdout.contains("(from default)"),
        "{show:?}"
    );
    let j = p.run(["--json", "profile", "show"]).ok().json();
    assert_eq!(j["source"], "default");
    assert_eq!(j["profile"]["cpu_threads"], host_threads());
    assert!(j["host"]["mem_gib"].as_f64().unwrap() > 0.0);

    // Beyond the host: refused, naming the field and the host's value; nothing written.
    let too_many = (host_threads() + 1).to_string();
    p.run(["profile", "set", "--cpu-threads", &too_many])
        .bad_input("cpu_threads");
    p.run(["profile", "set", "--mem", "100000G"])
        .bad_input("mem_gib");
    p.run(["profile", "set", "--storage", "900000G"])
        .bad_input("storage_gib");
    p.run(["profile", "set"]).bad_input("nothing to set");
    assert!(!p.data_dir().join("profile.json").exists());

    let set = p
        .run([
            "--json",
            "profile",
            "set",
            "--cpu-threads",
            "1",
            "--mem",
            "1.5G",
            "--storage",
            "3G",
            "--max-jobs",
            "3",
        ])
        .ok()
        .json();
    assert_eq!(set["source"], "profile.json");
    let stored: Value =
        serde_json::from_slice(&std::fs::read(p.data_dir().join("profile.json")).unwrap()).unwrap();
    assert_eq!(
        stored,
        serde_json::json!({"cpu_threads": 1, "mem_gib": 1.5, "storage_gib": 3.0, "max_jobs": 3})
    );
    // Unnamed values are kept; a refused change leaves the file as it was.
    p.run(["profile", "set", "--max-jobs", "1"]).ok();
    p.run([
        "profile",
        "set",
        "--cpu-threads",
        &too_many,
        "--max-jobs",
        "9",
    ])
    .bad_input("cpu_threads");
    let j = p.run(["--json", "profile", "show"]).ok().json();
    assert_eq!(j["profile"]["max_jobs"], 1);
    assert_eq!(j["profile"]["mem_gib"], 1.5);
    // A hand-edited file with an unknown field is an error naming it.
    std::fs::write(
        p.data_dir().join("profile.json"),
        r#"{"cpu_threads":1,"mem_gib":1,"storage_gib":1,"max_jobs":1,"gpu":1}"#,
    )
    .unwrap();
    p.run(["profile", "show"]).bad_input("gpu");
}

#[test]
fn presets_are_created_listed_updated_and_removed() {
    let p = Provider::new();
    let list = p.run(["preset", "list"]).ok();
    assert!(
        list.stdout.contains("free") && list.stdout.contains("yes"),
        "{list:?}"
    );
    p.run([
        "preset",
        "create",
        "std",
        "--duration-per-hour",
        "0.36",
        "--cpu-per-hour",
        "1.8",
        "--egress-per-gib",
        "1.024",
        "--start-fee",
        "0.01",
    ])
    .ok();
    p.run(["preset", "create", "std"]).bad_input("exists");
    p.run(["preset", "create", "free"]).bad_input("built-in");
    p.run(["preset", "create", "bad", "--cpu-per-hour", "-1"])
        .bad_input("cpu_per_hour");
    p.run(["preset", "update", "nope", "--cpu-per-hour", "1"])
        .bad_input("no preset `nope`");
    p.run(["preset", "update", "std", "--cpu-per-hour", "3.6"])
        .ok();
    let j = p.run(["--json", "preset", "list"]).ok().json();
    let std = j
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "std")
        .unwrap();
    assert_eq!(std["cpu_per_hour"], 3.6);
    assert_eq!(std["duration_per_hour"], 0.36);
    assert_eq!(
        std["coeffs"],
        serde_json::json!([0.0001, 0.001, 0.001, 0.01])
    );
    // `free` is offered until a preset named `default` exists.
    assert_eq!(std["offered"], false);
    let table = p.run(["preset", "list"]).ok().stdout;
    assert!(
        table.contains("PER CPU HOUR") && table.contains("3.6"),
        "{table}"
    );
    // All or nothing.
    p.run(["preset", "remove", "std", "nope"])
        .bad_input("no preset `nope`");
    assert!(p.run(["preset", "list"]).ok().stdout.contains("std"));
    p.run(["preset", "remove", "std"]).ok();
    assert!(!p.run(["preset", "list"]).ok().stdout.contains("std"));
}

/// `requestor submit --dry-run` of the setup's demand with `extra` flags.
fn dry_run(
    p: &Provider,
    d: &Daemon,
    files: &(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    extra: &[&str],
) -> tests::util::Run {
    let mut args = vec![
        "submit".to_string(),
        "--dry-run".into(),
        "--provider".into(),
        d.addr.clone(),
        "--manifest".into(),
        files.0.display().to_string(),
        "--sig".into(),
        files.1.display().to_string(),
        "--cert".into(),
        files.2.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    p.requestor(args)
}

fn rejected_with(r: &tests::util::Run, code: &str) {
    assert_eq!(r.code, 1, "expected a reject: {r:?}");
    assert!(
        r.stderr.contains(&format!("rejected: {code}: ")),
        "expected {code}: {r:?}"
    );
}

#[test]
fn the_offer_sells_the_profile_at_the_preset_and_never_overcommits() {
    let (p, files) = setup();
    p.run([
        "profile",
        "set",
        "--cpu-threads",
        "1",
        "--mem",
        "1G",
        "--storage",
        "2G",
        "--max-jobs",
        "2",
    ])
    .ok();
    p.run([
        "preset",
        "create",
        "default",
        "--duration-per-hour",
        "0.36",
        "--cpu-per-hour",
        "1.8",
        "--start-fee",
        "0.01",
    ])
    .ok();
    let mut d = p.daemon(&["--metrics", "127.0.0.1:0"]);

    // The status a running daemon writes: its id, addresses, the offer as advertised.
    let mut status = p.run(["--json", "status"]);
    for _ in 0..50 {
        if status.code == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        status = p.run(["--json", "status"]);
    }
    let s = status.ok().json();
    assert_eq!(s["running"], true);
    assert_eq!(s["peer_id"], d.peer_id());
    assert_eq!(s["listen"][0], d.addr);
    let offer = &s["offer"]["properties"];
    assert_eq!(offer["golem.inf.cpu.threads"], 1);
    assert_eq!(offer["golem.inf.mem.gib"], 1.0);
    assert_eq!(offer["golem.inf.storage.gib"], 2.0);
    assert_eq!(
        offer["golem.com.usage.vector"],
        serde_json::json!([
            "golem.usage.duration_sec",
            "golem.usage.cpu_sec",
            "golem.usage.egress_mib"
        ])
    );
    assert_eq!(
        offer["golem.com.pricing.model.linear.coeffs"],
        serde_json::json!([0.0001, 0.0005, 0.0, 0.01])
    );
    assert_eq!(s["jobs"], serde_json::json!([]));
    let table = p.run(["status"]).ok().stdout;
    assert!(
        table.contains(d.peer_id())
            && table.contains("1 CPU threads, 1 GiB memory")
            && table.contains("no jobs running"),
        "{table}"
    );

    // Price caps: at or above the preset's price passes, below it does not.
    dry_run(
        &p,
        &d,
        &files,
        &["--max-price", "cpu=1.8", "--max-price", "start=0.01"],
    )
    .ok();
    rejected_with(
        &dry_run(&p, &d, &files, &["--max-price", "cpu=1.7"]),
        "constraints-unmet",
    );
    rejected_with(
        &dry_run(&p, &d, &files, &["--max-price", "start=0"]),
        "constraints-unmet",
    );
    p.requestor([
        "submit",
        "--provider",
        &d.addr,
        "--manifest",
        "x",
        "--dry-run",
        "--max-price",
        "gpu=1",
    ])
    .bad_input("gpu");
    // More than the profile sells at all.
    rejected_with(
        &dry_run(&p, &d, &files, &["--constraints", "(golem.inf.mem.gib>=2)"]),
        "constraints-unmet",
    );
    rejected_with(
        &dry_run(
            &p,
            &d,
            &files,
            &["--constraints", "(golem.inf.cpu.threads>=2)"],
        ),
        "constraints-unmet",
    );

    // Eight requestors demand and agree at once. Each job gets at least one CPU thread and
    // 512 MiB; the profile sells one thread, so exactly one agreement is made and every
    // other requestor is told `busy` (at its demand or at its agree).
    let agreed = concurrent_agreements(&p, &d, &files, 8);
    assert_eq!(agreed.iter().filter(|a| a.is_ok()).count(), 1, "{agreed:?}");
    for a in agreed.iter().filter_map(|a| a.as_ref().err()) {
        assert_eq!(a, "busy", "{agreed:?}");
    }
    // The status shows the share as taken, and one more demand is told busy.
    std::thread::sleep(Duration::from_millis(1500));
    let s = p.run(["--json", "status"]).ok().json();
    assert_eq!(s["in_use"]["jobs"], 1, "{s}");
    assert_eq!(s["in_use"]["cpu_threads"], 1, "{s}");
    rejected_with(&dry_run(&p, &d, &files, &[]), "busy");

    // The audit log, filtered.
    let verdicts = p.run(["--json", "audit", "--event", "verdict"]).ok().json();
    let verdicts = verdicts.as_array().unwrap();
    assert!(verdicts.iter().all(|v| v["event"] == "verdict"));
    assert!(
        verdicts.iter().any(|v| v["reasons"][0]["code"] == "busy"),
        "{verdicts:?}"
    );
    let agreements = p
        .run(["--json", "audit", "--event", "agreement"])
        .ok()
        .json();
    assert_eq!(agreements.as_array().unwrap().len(), 1, "{agreements}");
    let id = agreements[0]["agreement_id"].as_str().unwrap();
    let by_job = p.run(["--json", "audit", "--job", &id[..10]]).ok().json();
    assert_eq!(by_job.as_array().unwrap().len(), 1, "{by_job}");
    let recent = p
        .run(["--json", "audit", "--since", "10m", "--limit", "3"])
        .ok()
        .json();
    assert_eq!(recent.as_array().unwrap().len(), 3);
    let future = p
        .run(["--json", "audit", "--since", "2100-01-01T00:00:00Z"])
        .ok()
        .json();
    assert_eq!(future, serde_json::json!([]));
    let table = p.run(["audit", "--event", "verdict"]).ok().stdout;
    assert!(
        table.starts_with("TIME") && table.contains("reject from") && table.contains("busy"),
        "{table}"
    );
    p.run(["audit", "--event", "verdicts"])
        .bad_input("not an audit event");
    p.run(["audit", "--since", "yesterday"])
        .bad_input("--since");

    // No job ran: the listing is empty, and an unknown job is an error.
    assert_eq!(
        p.run(["--json", "jobs", "list"]).ok().json(),
        serde_json::json!([])
    );
    assert!(p.run(["jobs", "list"]).ok().stdout.starts_with("ACTIVITY"));
    p.run(["jobs", "show", "abc"]).bad_input("no job abc");

    // The Prometheus endpoint counts the same decisions.
    let metrics = scrape(
        s["metrics"].as_str().expect("the metrics address"),
        "/metrics",
    );
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for want in [
        r#"provider_demands_total{verdict="accept"}"#,
        r#"provider_demand_reasons_total{code="busy"}"#,
        r#"provider_demand_reasons_total{code="constraints-unmet"}"#,
        "provider_cpu_threads_in_use 1",
        "provider_job_start_seconds_count 0",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    let accepted: u64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"provider_demands_total{verdict="accept"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    // Two price-capped dry runs and the eight concurrent demands' winners.
    assert!(accepted >= 2, "{metrics}");
    assert!(scrape(s["metrics"].as_str().unwrap(), "/other").starts_with("HTTP/1.1 404"));

    // Stopped: the status says so (exit 3) and the file is gone.
    assert_eq!(d.stop(Duration::from_secs(30)), Some(0));
    let r = p.run(["--json", "status"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.json()["running"], false);
    assert!(!p.data_dir().join("status.json").exists());
    assert_eq!(p.run(["status"]).code, 3);
}

/// `GET path` from `addr` over plain HTTP/1.1: the whole answer.
fn scrape(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// `n` requestor peers, each sending the demand and agreeing to its proposal, all at once.
/// Each result is the agreement id or the code of the refusal.
fn concurrent_agreements(
    p: &Provider,
    d: &Daemon,
    files: &(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
    n: usize,
) -> Vec<Result<String, String>> {
    let b64 = |b: &[u8]| tests::util::b64(b);
    let properties: std::collections::BTreeMap<String, Value> = [
        (props::PAYLOAD, b64(&std::fs::read(&files.0).unwrap())),
        (
            props::PAYLOAD_SIG,
            std::fs::read_to_string(&files.1).unwrap(),
        ),
        (props::PAYLOAD_SIG_ALG, "sha256".into()),
        (props::PAYLOAD_CERT, b64(&std::fs::read(&files.2).unwrap())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Value::String(v)))
    .collect();
    let _ = p;
    let addr: net::Multiaddr = d.addr.parse().unwrap();
    let provider: net::PeerId = d.peer_id().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (addr, properties, barrier) =
                    (addr.clone(), properties.clone(), barrier.clone());
                tokio::spawn(async move {
                    let (client, _inbound, event_loop) = net::new(
                        net::Keypair::generate_ed25519(),
                        net::NetConfig {
                            mdns: false,
                            ..net::NetConfig::default()
                        },
                    )
                    .unwrap();
                    let el = tokio::spawn(event_loop.run());
                    client.dial(addr).await.unwrap();
                    barrier.wait().await;
                    let demand = MarketRequest::Demand {
                        properties,
                        constraints: "(golem.runtime.name=vm)".into(),
                    };
                    let out = match client.market(provider, demand).await.unwrap() {
                        MarketResponse::Proposal { proposal_id, .. } => {
                            match client
                                .market(provider, MarketRequest::Agree { proposal_id })
                                .await
                                .unwrap()
                            {
                                MarketResponse::Agreement { agreement_id, .. } => Ok(agreement_id),
                                MarketResponse::Error { reason } => Err(reason.code.to_string()),
                                other => Err(format!("{other:?}")),
                            }
                        }
                        MarketResponse::Rejected { reasons } => Err(reasons
                            .iter()
                            .map(|r| r.code.to_string())
                            .collect::<Vec<_>>()
                            .join(",")),
                        other => Err(format!("{other:?}")),
                    };
                    el.abort();
                    out
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[test]
fn self_test_says_what_is_missing_and_how_to_fix_it() {
    let p = Provider::new();
    let r = p.run(["--json", "self-test"]);
    assert!(r.code == 0 || r.code == 1, "{r:?}");
    let j = r.json();
    let checks = j["checks"].as_array().unwrap();
    let names: Vec<&str> = checks
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for want in [
        "data dir",
        "keystore",
        "rules and whitelist",
        "hardware profile",
        "kvm",
        "qemu",
        "guest kernel",
        "guest agent",
        "backend",
    ] {
        assert!(names.contains(&want), "{want} not checked: {names:?}");
    }
    assert_eq!(j["ok"], r.code == 0);
    // An empty keystore is a warning with the fix.
    let ks = checks.iter().find(|c| c["check"] == "keystore").unwrap();
    assert_eq!(ks["status"], "warn");
    assert!(ks["fix"].as_str().unwrap().contains("keystore add"));

    // Broken rules and a profile beyond the host fail, and the table says how to fix them.
    std::fs::create_dir_all(p.data_dir()).unwrap();
    std::fs::write(p.data_dir().join("rules.json"), "{ not json").unwrap();
    std::fs::write(
        p.data_dir().join("profile.json"),
        format!(
            r#"{{"cpu_threads":{},"mem_gib":1,"storage_gib":1,"max_jobs":1}}"#,
            host_threads() + 1
        ),
    )
    .unwrap();
    let r = p.run(["self-test"]);
    assert_eq!(r.code, 1, "{r:?}");
    let line = |name: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line: {}", r.stdout))
            .to_string()
    };
    assert!(line("rules and whitelist").contains("FAIL"), "{}", r.stdout);
    assert!(line("hardware profile").contains("FAIL"), "{}", r.stdout);
    assert!(
        line("hardware profile").contains("provider profile set"),
        "{}",
        r.stdout
    );
    assert!(r
        .stdout
        .contains("jobs cannot run here until every FAIL is fixed"));
    // And the daemon refuses to start with that profile, saying why.
    std::fs::remove_file(p.data_dir().join("rules.json")).unwrap();
    p.run(["run", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .bad_input("cpu_threads");
}

#[test]
fn runtime_profiles_are_validated_named_by_presets_and_cap_a_job() {
    let (p, files) = setup();
    let list = p.run(["profile", "runtime", "list"]).ok().stdout;
    for name in ["strict", "default", "permissive"] {
        assert!(list.contains(name), "{list}");
    }
    let dir = p.data_dir().join("runtime-profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tight.toml"),
        "landlock = \"job-dir\"\nseccomp = \"strict\"\npids_max = 64\ncpu_quota = 0.5\nmemory = \"768M\"\nread_only_rootfs = true\n",
    )
    .unwrap();
    let j = p
        .run(["--json", "profile", "runtime", "show", "tight"])
        .ok()
        .json();
    assert_eq!(j[0]["name"], "tight");
    assert_eq!(j[0]["pids_max"], 64);
    assert_eq!(j[0]["memory"], (768u64 << 20).to_string());
    assert_eq!(j[0]["disk"], Value::Null);
    let table = p.run(["profile", "runtime", "list"]).ok().stdout;
    assert!(
        table.contains("tight") && table.contains("0.75 GiB"),
        "{table}"
    );
    // Unknown fields are refused, naming the field and the file.
    std::fs::write(dir.join("typo.json"), r#"{"landlock":"job-dir","seccomp":"default","pids_max":1,"cpu_quota":1,"read_only_rootfs":false,"network":true}"#).unwrap();
    p.run(["profile", "runtime", "show", "typo"])
        .bad_input("network");
    p.run(["profile", "runtime", "list"]).bad_input("typo.json");
    std::fs::remove_file(dir.join("typo.json")).unwrap();

    // A preset names one that exists.
    p.run(["preset", "create", "default", "--runtime-profile", "nope"])
        .bad_input("no runtime profile `nope`");
    p.run([
        "preset",
        "create",
        "default",
        "--cpu-per-hour",
        "1",
        "--runtime-profile",
        "tight",
    ])
    .ok();
    let d = p.daemon(&[]);
    // The profile caps one job's memory: 768 MiB.
    dry_run(
        &p,
        &d,
        &files,
        &["--constraints", "(golem.inf.mem.gib>=0.75)"],
    )
    .ok();
    let r = dry_run(&p, &d, &files, &["--constraints", "(golem.inf.mem.gib>=1)"]);
    rejected_with(&r, "constraints-unmet");
    assert!(r.stderr.contains("runtime profile `tight`"), "{r:?}");
}
