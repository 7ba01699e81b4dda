//! Warm start through the daemon (`vm::warm`, docs/payload-runtime.md "Warm start"):
//! `provider vm snapshot` builds the snapshot, jobs restore it and run the demo's three
//! batches, two restored jobs differ in their random bytes and boot id, a snapshot whose
//! file was changed is refused by its hash (the job boots cold, saying why) and rebuilt,
//! and a missing one means a cold boot with the reason in the job's log.
//!
//! One daemon and one data dir carry the whole sequence (each snapshot build is a TCG
//! boot). Skips with a printed reason where QEMU, the kernel or busybox is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use certs::testpki::{self, KeyKind, Validity};
use openssl::hash::MessageDigest;
use provider::testsupport::{hex_digest, http_server, vm_env, Upstream, VmEnv};
use serde_json::{json, Value};
use tests::util::{write_signed, Provider};

struct Setup {
    p: Provider,
    upstream: Upstream,
    manifest: PathBuf,
    sig: PathBuf,
    cert: PathBuf,
    env: VmEnv,
}

/// The demo's setup (scripts/demo.sh): an upstream with the image and one allowed URL, a
/// manifest under a trusted CA allowing `wget` of it, `echo`, and `cat`/`od` to read the
/// boot id and random bytes.
fn setup() -> Option<Setup> {
    let env = vm_env()?;
    let image = std::fs::read(&env.image).unwrap();
    let hash = hex_digest(MessageDigest::sha3_256(), &image);
    let upstream = http_server(
        vec![
            ("/image.tar".into(), image),
            (
                "/allowed/hello.txt".into(),
                b"hello from the allowed upstream\n".to_vec(),
            ),
            ("/secret.txt".into(), b"must not leave\n".to_vec()),
        ],
        None,
        None,
    );
    let base = upstream.url();
    let p = Provider::new();
    let root = testpki::root("Warm Root", KeyKind::EcP256, Validity::current());
    let author = testpki::issue(
        &root,
        "Warm Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        &certs::cert_id(&root.cert),
        "--mode",
        "all",
    ])
    .ok();
    let m = json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "warm", "version": "1.0.0"},
        "payload": [{"platform": {"arch": "x86_64", "os": "linux"},
                     "urls": [format!("{base}/image.tar")],
                     "hash": format!("sha3:{hash}")}],
        "compManifest": {"version": "0.1.0",
            "script": {"match": "regex", "commands": [
                "run /bin/wget -q -O - http://.*", "run /bin/echo .*",
                "run /bin/cat /proc/sys/kernel/random/boot_id",
                "run /bin/od -An -N32 -tx1 /dev/urandom"]},
            "net": {"inet": {"out": {"protocols": ["http"], "urls": [format!("{base}/allowed")]}}}}
    });
    let (manifest, sig, cert) =
        write_signed(&p, "warm", &m, &author, &testpki::pem(&[&author.cert]));
    Some(Setup {
        p,
        upstream,
        manifest,
        sig,
        cert,
        env,
    })
}

fn run(entry: &str, args: &[&str]) -> Value {
    json!({"run": {"entry_point": entry, "args": args}})
}

/// Submits one job of `batches`; its result events.
fn submit(s: &Setup, addr: &str, name: &str, batches: &[Value]) -> Vec<Value> {
    let mut args: Vec<String> = [
        "--json",
        "submit",
        "--provider",
        addr,
        "--manifest",
        s.manifest.to_str().unwrap(),
        "--sig",
        s.sig.to_str().unwrap(),
        "--cert",
        s.cert.to_str().unwrap(),
        "--out-dir",
        s.p.input("receipts").to_str().unwrap(),
        "--timeout",
        "5m",
    ]
    .map(String::from)
    .to_vec();
    for (i, b) in batches.iter().enumerate() {
        let f =
            s.p.write_input(&format!("{name}-batch{i}.json"), b.to_string());
        args.push("--script".into());
        args.push(f.display().to_string());
    }
    let r = s.p.requestor(args);
    r.stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .filter(|e| e["event"] == "result")
        .collect()
}

/// The `start` of the job started last (the audit log's `job`/`started` line).
fn last_start(data: &Path) -> String {
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    audit
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "job" && v["phase"] == "started")
        .map(|v| v["start"].as_str().unwrap_or("(no start field)").to_owned())
        .expect("a started job")
}

/// A job that reads its boot id and 32 random bytes; (boot id, bytes).
fn identity(s: &Setup, addr: &str, name: &str) -> (String, String) {
    let results = submit(
        s,
        addr,
        name,
        &[json!([{"deploy": {}}, {"start": {}},
            run("/bin/cat", &["/proc/sys/kernel/random/boot_id"]),
            run("/bin/od", &["-An", "-N32", "-tx1", "/dev/urandom"])])],
    );
    assert_eq!(results.len(), 4, "{results:#?}");
    let out = |i: usize| results[i]["stdout"].as_str().unwrap().trim().to_owned();
    (out(2), out(3).split_whitespace().collect())
}

fn snapshot_cmd(s: &Setup, extra: &[&str]) -> Value {
    let mut args = vec![
        "--json",
        "vm",
        "snapshot",
        "--guest",
        s.env.agent.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let r = s.p.run(&args);
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn jobs_restore_the_snapshot_fresh_and_a_bad_or_missing_one_boots_cold() {
    let Some(s) = setup() else { return };
    let data = s.p.data_dir();

    // Built ahead by the operator's command; a second run keeps the sound one.
    let built = snapshot_cmd(&s, &[]);
    assert_eq!(built["built"], true, "{built:#}");
    let dir = PathBuf::from(built["dir"].as_str().unwrap());
    assert!(dir.starts_with(data.join("snapshots")), "{built:#}");
    assert_eq!(dir.file_name().unwrap(), built["key"].as_str().unwrap());
    assert!(
        built["state_bytes"].as_u64().unwrap() > 1 << 20,
        "{built:#}"
    );
    assert_eq!(
        (built["mem_mib"].as_u64(), built["cpus"].as_u64()),
        (Some(512), Some(1))
    );
    let kept = snapshot_cmd(&s, &[]);
    assert_eq!(kept["built"], false, "{kept:#}");
    assert_eq!(kept["key"], built["key"]);

    let guest = s.env.agent.display().to_string();
    let d =
        s.p.daemon(&["--allow-cidr", "127.0.0.0/8", "--guest", &guest]);

    // The demo's three batches, in a restored VM.
    let base = s.upstream.url();
    let results = submit(
        &s,
        &d.addr,
        "demo",
        &[
            json!([{"deploy": {}}, {"start": {}},
                   run("/bin/wget", &["-q", "-O", "-", &format!("{base}/allowed/hello.txt")])]),
            json!([run(
                "/bin/wget",
                &["-q", "-O", "-", &format!("{base}/secret.txt")]
            )]),
            json!([
                run("/bin/sh", &["-c", "echo denied"]),
                run(
                    "/bin/echo",
                    &["never runs: the batch stopped at the denial"]
                )
            ]),
        ],
    );
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["ok", "ok", "ok", "failed", "denied", "skipped"],
        "{results:#?}\n{}",
        d.logs()
    );
    assert_eq!(results[2]["stdout"], "hello from the allowed upstream\n");
    let start = last_start(&data);
    assert!(
        start.starts_with("warm start: restored snapshot"),
        "{start}"
    );
    assert!(start.contains(built["key"].as_str().unwrap()), "{start}");

    // Two restored jobs share no random state.
    let (boot_a, bytes_a) = identity(&s, &d.addr, "a");
    assert!(last_start(&data).starts_with("warm start"));
    let (boot_b, bytes_b) = identity(&s, &d.addr, "b");
    assert!(last_start(&data).starts_with("warm start"));
    assert_eq!(boot_a.len(), 36, "{boot_a}");
    assert_eq!(bytes_a.len(), 64, "{bytes_a}");
    assert_ne!(boot_a, boot_b, "two restored jobs have the same boot_id");
    assert_ne!(
        bytes_a, bytes_b,
        "two restored jobs read the same random bytes"
    );

    // One changed byte in the middle of the migration stream: refused by its hash, the job
    // boots cold and says so, and the snapshot is rebuilt.
    let state = dir.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&state, &bytes).unwrap();
    drop(bytes);
    let (boot_c, _) = identity(&s, &d.addr, "c");
    assert_ne!(boot_c, boot_a);
    let start = last_start(&data);
    assert!(
        start.starts_with("cold boot: hash mismatch") && start.contains("state has SHA-256"),
        "{start}"
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    while !d.logs().contains("warm-start snapshot ready") {
        assert!(Instant::now() < deadline, "no rebuild:\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let rebuilt = snapshot_cmd(&s, &[]);
    assert_eq!(
        rebuilt["built"], false,
        "the rebuilt snapshot is not sound: {rebuilt:#}"
    );
    identity(&s, &d.addr, "d");
    assert!(
        last_start(&data).starts_with("warm start"),
        "{}",
        last_start(&data)
    );

    // No snapshot at all: a cold boot, and the log says why.
    std::fs::remove_dir_all(&dir).unwrap();
    identity(&s, &d.addr, "e");
    let start = last_start(&data);
    assert!(
        start.starts_with("cold boot: no warm-start snapshot"),
        "{start}"
    );
}
