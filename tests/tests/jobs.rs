//! A whole job across two processes: `provider run` and `requestor submit` over loopback,
//! the payload in a QEMU VM, every command through the ExeScript gate, every outbound
//! connection through the job's egress proxy, and the signed receipt.
//!
//! One VM boot carries most assertions (TCG boots take seconds); the kill -9 test needs
//! its own. Both skip with a printed reason where QEMU, the kernel or busybox is missing.

use std::time::{Duration, Instant};

use certs::testpki::{self, KeyKind, Validity};
use openssl::hash::MessageDigest;
use provider::testsupport::{
    hex_digest, http_server, qemu_pids_mentioning, qemu_processes_mentioning, vm_env, SmallDisk,
    Upstream, VmEnv,
};
use serde_json::{json, Value};
use tests::util::{write_signed, Provider, Run};

struct Job {
    p: Provider,
    upstream: Upstream,
    other: Upstream,
    manifest: std::path::PathBuf,
    sig: std::path::PathBuf,
    cert: std::path::PathBuf,
    env: VmEnv,
}

/// A provider trusting a fresh CA for audited payloads with full outbound, an upstream
/// serving the image and `/allowed/…`, a second upstream on another port, and a manifest
/// signed under the CA allowing `run /bin/…` of a few tools and the one URL prefix.
fn job() -> Option<Job> {
    let env = vm_env()?;
    let image = std::fs::read(&env.image).unwrap();
    let hash = hex_digest(MessageDigest::sha3_256(), &image);
    let upstream = http_server(
        vec![
            ("/image.tar".into(), image),
            (
                "/allowed/hello.txt".into(),
                b"hello from upstream\n".to_vec(),
            ),
            ("/secret.txt".into(), b"secret\n".to_vec()),
        ],
        None,
        None,
    );
    let other = http_server(
        vec![("/allowed/hello.txt".into(), b"other port\n".to_vec())],
        None,
        None,
    );
    let base = upstream.url();

    let p = Provider::new();
    let root = testpki::root("Job Root", KeyKind::EcP256, Validity::current());
    let author = testpki::issue(
        &root,
        "Job Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let root_id = certs::cert_id(&root.cert);
    p.run([
        "rule",
        "set",
        "outbound",
        "audited-payload",
        "cert-id",
        &root_id,
        "--mode",
        "all",
    ])
    .ok();
    let m = json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "job", "version": "1.0.0"},
        "payload": [{"platform": {"arch": "x86_64", "os": "linux"},
                     "urls": [format!("{base}/image.tar")],
                     "hash": format!("sha3:{hash}")}],
        "compManifest": {"version": "0.1.0",
            "script": {"match": "regex", "commands": [
                "run /bin/echo .*", "run /bin/wget .*", "run /bin/ls .*", "run /bin/sleep .*",
                "run /bin/touch /tmp/skipped-ran"]},
            "net": {"inet": {"out": {"protocols": ["http"], "urls": [format!("{base}/allowed")]}}}}
    });
    let (manifest, sig, cert) =
        write_signed(&p, "job", &m, &author, &testpki::pem(&[&author.cert]));
    Some(Job {
        p,
        upstream,
        other,
        manifest,
        sig,
        cert,
        env,
    })
}

fn run(entry: &str, args: &[&str]) -> Value {
    json!({"run": {"entry_point": entry, "args": args}})
}

fn submit(j: &Job, addr: &str, batches: &[Value]) -> (Run, Vec<Value>) {
    let mut args: Vec<String> = [
        "--json",
        "submit",
        "--provider",
        addr,
        "--manifest",
        j.manifest.to_str().unwrap(),
        "--sig",
        j.sig.to_str().unwrap(),
        "--cert",
        j.cert.to_str().unwrap(),
        "--out-dir",
        j.p.input("receipts").to_str().unwrap(),
        "--timeout",
        "15m",
    ]
    .map(String::from)
    .to_vec();
    for (i, b) in batches.iter().enumerate() {
        let f = j.p.write_input(&format!("batch{i}.json"), b.to_string());
        args.push("--script".into());
        args.push(f.display().to_string());
    }
    let r = j.p.requestor(args);
    let events = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    (r, events)
}

fn daemon_args(j: &Job) -> Vec<String> {
    vec![
        "--allow-cidr".into(),
        "127.0.0.0/8".into(),
        "--guest".into(),
        j.env.agent.display().to_string(),
    ]
}

#[test]
fn a_job_runs_gated_and_filtered_and_leaves_a_verified_receipt() {
    let Some(j) = job() else { return };
    let args = daemon_args(&j);
    let d =
        j.p.daemon(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let wget = |url: String| run("/bin/wget", &["-q", "-O", "-", &url]);
    let batches = [
        json!([{"deploy": {}}, {"start": {}}, run("/bin/echo", &["hello", "vm"]),
               wget(format!("{}/allowed/hello.txt", j.upstream.url()))]),
        // Another port of the same host, another host name, a path outside the allowed
        // prefix, then no proxy at all.
        json!([wget(format!("{}/allowed/hello.txt", j.other.url()))]),
        json!([wget(format!(
            "http://localhost:{}/allowed/hello.txt",
            j.upstream.port
        ))]),
        json!([wget(format!("{}/secret.txt", j.upstream.url()))]),
        json!([run(
            "/bin/wget",
            &[
                "-Y",
                "off",
                "-q",
                "-O",
                "-",
                &format!("{}/allowed/hello.txt", j.upstream.url())
            ]
        )]),
        // Denied: not in the manifest's script. The command after it is allowed but must
        // not run either.
        json!([
            run("/bin/touch", &["/tmp/denied-ran"]),
            run("/bin/touch", &["/tmp/skipped-ran"])
        ]),
        json!([run("/bin/ls", &["/tmp"])]),
    ];
    let (r, events) = submit(&j, &d.addr, &batches);
    assert_eq!(
        r.code,
        1,
        "commands failed or were denied, so exit 1: {r:?}\n{}",
        d.logs()
    );
    let results: Vec<&Value> = events.iter().filter(|e| e["event"] == "result").collect();
    let outcomes: Vec<&str> = results
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            "ok", "ok", "ok", "ok", "failed", "failed", "failed", "failed", "denied", "skipped",
            "ok"
        ],
        "{results:#?}\n{}",
        d.logs()
    );
    assert_eq!(results[2]["stdout"], "hello vm\n");
    assert_eq!(results[3]["stdout"], "hello from upstream\n");
    assert!(!results[8]["reason"]["code"].as_str().unwrap().is_empty());
    let ls = results[10]["stdout"].as_str().unwrap();
    assert!(
        !ls.contains("denied-ran") && !ls.contains("skipped-ran"),
        "{ls}"
    );
    // The upstream saw exactly the allowed fetch (plus the image download); the other port
    // was never reached.
    assert_eq!(j.upstream.paths(), ["/image.tar", "/allowed/hello.txt"]);
    assert_eq!(j.other.connections(), 0);

    // The receipt: saved, verified, and it records what happened.
    let receipt_event = events
        .iter()
        .find(|e| e["event"] == "receipt")
        .expect("receipt event");
    assert_eq!(receipt_event["valid"], true);
    let path = receipt_event["path"].as_str().unwrap();
    let v = j.p.requestor(["receipt", "verify", path]);
    assert_eq!(v.code, 0, "{v:?}");
    let receipt: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let body = &receipt["receipt"];
    assert_eq!(body["provider_id"], d.peer_id());
    let cmds = body["commands"].as_array().unwrap();
    assert_eq!(cmds.len(), 11, "{cmds:#?}");
    assert_eq!(cmds[8]["outcome"], "denied");
    assert_eq!(cmds[9]["outcome"], "skipped");
    let egress = body["egress"].as_array().unwrap();
    assert!(
        egress.iter().any(|e| e["decision"] == "allow"),
        "{egress:#?}"
    );
    assert!(
        egress.iter().filter(|e| e["decision"] == "deny").count() >= 2,
        "{egress:#?}"
    );
    // A changed byte breaks it.
    let mut tampered = receipt.clone();
    tampered["receipt"]["commands"][8]["outcome"] = "ok".into();
    let t = j.p.write_input("tampered.json", tampered.to_string());
    let v = j.p.requestor(["receipt", "verify", t.to_str().unwrap()]);
    assert_eq!(v.code, 1, "{v:?}");

    // The audit log has the verdict, each command decision and the egress decisions.
    let audit = std::fs::read_to_string(j.p.data_dir().join("audit.jsonl")).unwrap();
    for needle in [
        r#""event":"verdict""#,
        r#""event":"command""#,
        r#""decision":"deny""#,
    ] {
        assert!(
            audit.contains(needle),
            "{needle} missing from the audit log:\n{audit}"
        );
    }
}

/// The fault campaign's crash points with a VM (docs/robustness.md): `kill -9` of the
/// daemon while a job's VM boots (job start), while its batch runs, and a few milliseconds
/// into the shutdown that ends the job and writes its receipt. After each: no QEMU left, no
/// half-written file in the data dir, every receipt whole and verified, the interrupted job
/// marked ended with its reason once the daemon is back, and a new job served.
#[test]
fn kill_9_mid_job_leaves_no_vm_behind_and_a_restart_serves_again() {
    let Some(j) = job() else { return };
    let args = daemon_args(&j);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let data = j.p.data_dir();
    // The last point: SIGTERM makes the daemon end the job and write its receipt; the
    // kill comes a varying few milliseconds into that (printed, to replay a failure).
    let into_shutdown = Duration::from_millis(u64::from(std::process::id() % 250));
    for (point, settle, term_first) in [
        ("job start", None, false),
        ("running batch", Some(Duration::from_secs(2)), false),
        ("receipt writing", Some(Duration::from_secs(2)), true),
    ] {
        let mut d = j.p.daemon(&args);
        let submitter = start_long_job(&j, &d, settle);
        if term_first {
            eprintln!("{point}: SIGKILL {into_shutdown:?} after SIGTERM");
            tests::util::signal(d.pid(), "TERM");
            std::thread::sleep(into_shutdown);
        }
        tests::util::signal(d.pid(), "KILL");
        let _ = d.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !qemu_processes_mentioning(&data).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{point}: QEMU outlived the killed daemon: {:?}",
                qemu_processes_mentioning(&data)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut submitter = submitter;
        let _ = submitter.kill();
        let _ = submitter.wait();

        let d2 = j.p.daemon(&args);
        // Killed during the shutdown, the job may have been ended and its receipt written
        // before the kill: then it is not interrupted, and the receipt must be whole.
        assert_clean(&data, point, !term_first);
        for r in std::fs::read_dir(data.join("receipts"))
            .into_iter()
            .flatten()
        {
            let path = r.unwrap().path();
            let verified = j.p.requestor(["receipt", "verify", path.to_str().unwrap()]);
            assert_eq!(verified.code, 0, "{point}: {} {verified:?}", path.display());
        }
        let (r, events) = submit(&j, &d2.addr, &[json!([run("/bin/echo", &["again"])])]);
        assert_eq!(r.code, 0, "{point}: {r:?}\n{}", d2.logs());
        let out = events.iter().find(|e| e["event"] == "result").unwrap();
        assert_eq!(out["stdout"], "again\n");
        drop(d2);
    }
}

/// What a restart after `kill -9` must have left: every job directory ended (a receipt,
/// or an `ended` audit line, the killed one's saying it was interrupted), no temp file of
/// an atomic write, no initramfs, and an audit log whose lines all parse but at most one
/// line torn by the kill.
///
/// `interrupted_expected`: whether some job must have been marked interrupted (a kill
/// mid-job), or only ended somehow (its end may or may not have been written first).
fn assert_clean(data: &std::path::Path, point: &str, interrupted_expected: bool) {
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    let lines: Vec<Option<Value>> = audit
        .lines()
        .map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.iter().filter(|l| l.is_none()).count() <= 1,
        "{point}: more than one torn audit line:\n{audit}"
    );
    let ended = |id: &str| {
        lines.iter().flatten().any(|v| {
            v["activity_id"] == id
                && ((v["event"] == "job" && v["phase"] == "ended")
                    || v["event"] == "activity-terminated"
                    || v["event"] == "activity-failed")
        })
    };
    let interrupted = lines
        .iter()
        .flatten()
        .filter(|v| {
            v["phase"] == "ended"
                && v["termination"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("interrupted"))
        })
        .count();
    assert!(
        !interrupted_expected || interrupted >= 1,
        "{point}: no job was marked interrupted:\n{audit}"
    );
    for entry in std::fs::read_dir(data.join("jobs")).unwrap() {
        let entry = entry.unwrap();
        let id = entry.file_name().into_string().unwrap();
        assert!(
            ended(&id),
            "{point}: job {id} was not marked ended:\n{audit}"
        );
        assert!(
            !entry.path().join("initramfs.cpio").exists(),
            "{point}: {id} kept its initramfs"
        );
    }
    let left = tests::util::half_written_files(data);
    assert!(
        left.is_empty(),
        "{point}: half-written files left: {left:?}"
    );
}

/// Starts `requestor submit` of one long `sleep` in the background and waits until its VM
/// runs; returns the requestor process.
/// `settle`: how long to wait after the VM process appears (`None`: return while it boots).
/// How many jobs the daemon's audit log says have started (their VM booted).
fn started_jobs(data: &std::path::Path) -> usize {
    std::fs::read_to_string(data.join("audit.jsonl"))
        .unwrap_or_default()
        .matches("\"phase\":\"started\"")
        .count()
}

fn start_long_job(
    j: &Job,
    d: &tests::util::Daemon,
    settle: Option<Duration>,
) -> std::process::Child {
    let started_before = started_jobs(&j.p.data_dir());
    let batch = j.p.write_input(
        "long.json",
        json!([run("/bin/sleep", &["600"])]).to_string(),
    );
    let child = std::process::Command::new(tests::util::bin("requestor"))
        .args(["submit", "--provider", &d.addr, "--manifest"])
        .arg(&j.manifest)
        .arg("--sig")
        .arg(&j.sig)
        .arg("--cert")
        .arg(&j.cert)
        .arg("--script")
        .arg(&batch)
        // The receipt goes to the test's temp dir, never the source tree (the cwd).
        .arg("--out-dir")
        .arg(j.p.input("receipts"))
        .current_dir(j.p.input(""))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The VM process appearing means the job started.
    let data = j.p.data_dir();
    let deadline = Instant::now() + Duration::from_secs(300);
    while qemu_processes_mentioning(&data).is_empty() {
        assert!(Instant::now() < deadline, "no VM started: {}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    // With `settle`: once the audit log says the job started (its VM booted; a fixed sleep
    // raced slow boots on a loaded machine), give the batch `settle` to reach the guest.
    if let Some(settle) = settle {
        while started_jobs(&data) <= started_before {
            assert!(
                Instant::now() < deadline,
                "the job never started: {}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(settle);
    }
    child
}

/// The receipts the daemon stored.
fn stored_receipts(j: &Job) -> Vec<Value> {
    let dir = j.p.data_dir().join("receipts");
    std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| {
                    serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sigterm_ends_running_jobs_with_stored_receipts_and_no_vm_left() {
    let Some(j) = job() else { return };
    let args = daemon_args(&j);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = j.p.daemon(&args);
    let mut submitter = start_long_job(&j, &d, Some(Duration::from_secs(2)));
    let t = Instant::now();
    assert_eq!(d.stop(Duration::from_secs(60)), Some(0), "{}", d.logs());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "SIGTERM waited out the command"
    );
    assert!(qemu_processes_mentioning(&j.p.data_dir()).is_empty());
    let receipts = stored_receipts(&j);
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    let r = &receipts[0]["receipt"];
    assert_eq!(r["termination"], "the provider was shut down", "{r}");
    assert_eq!(r["commands"][0]["outcome"], "failed", "{r}");
    let path = j.p.data_dir().join("receipts");
    let file = std::fs::read_dir(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        j.p.requestor(["receipt", "verify", file.to_str().unwrap()])
            .code,
        0
    );
    let _ = submitter.kill();
    let _ = submitter.wait();
}

#[test]
fn an_expired_agreement_ends_its_job() {
    let Some(j) = job() else { return };
    let cfg = j.p.write_input("short.json", r#"{"agreement_ttl": "20s"}"#);
    let mut args = daemon_args(&j);
    args.extend(["--config".to_string(), cfg.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = j.p.daemon(&args);
    let mut submitter = start_long_job(&j, &d, Some(Duration::from_secs(2)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_receipts(&j).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job outlived its agreement: {}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // At the expiry the running command is killed (its end is capped by the agreement);
    // either the requestor, seeing that, terminates first or the daemon's reaper does.
    let receipts = stored_receipts(&j);
    let r = &receipts[0]["receipt"];
    assert!(
        r["termination"] == "the agreement expired"
            || r["termination"] == "terminated by the requestor",
        "{r}"
    );
    let cmd = &r["commands"][0];
    assert_eq!(cmd["outcome"], "failed", "{r}");
    let ran = chrono_secs(&cmd["ended_at"]) - chrono_secs(&cmd["started_at"]);
    assert!(
        ran < 30.0,
        "`sleep 600` ran {ran} s under a 20 s agreement: {r}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qemu_processes_mentioning(&j.p.data_dir()).is_empty() {
        assert!(Instant::now() < deadline, "the VM outlived its agreement");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The requestor learns it: its job ends with an error, not a hang.
    let status = submitter.wait().unwrap();
    assert_ne!(status.code(), Some(0));
}

/// Fault campaign (docs/robustness.md): the guest stops answering mid-batch (its QEMU
/// frozen with SIGSTOP, so neither the guest's own command timer nor its agent runs).
/// The host gives up at the command's deadline plus its grace, kills the VM, fails the
/// command with the reason, skips the rest of the batch, ends the job with a verified
/// receipt, and serves the next job.
#[test]
fn a_guest_that_stops_answering_mid_batch_is_killed_and_the_job_ends_with_a_receipt() {
    let Some(j) = job() else { return };
    // Cold boot: a warm-start snapshot built beside the job would be a second QEMU.
    let cfg = j.p.write_input(
        "stuck.json",
        r#"{"command_timeout": "5s", "warm_start": false}"#,
    );
    let mut args = daemon_args(&j);
    args.extend(["--config".to_string(), cfg.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = j.p.daemon(&args);
    let data = j.p.data_dir();
    let mut submitter = start_long_job(&j, &d, Some(Duration::from_secs(1)));
    let pids = qemu_pids_mentioning(&data);
    assert_eq!(pids.len(), 1, "{:?}", qemu_processes_mentioning(&data));
    tests::util::signal(pids[0], "STOP");
    let frozen = Instant::now();
    // 5 s deadline + the host's 15 s grace; the rest is a loaded machine's slack.
    let deadline = frozen + Duration::from_secs(90);
    while stored_receipts(&j).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job with a frozen guest never ended: {}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        frozen.elapsed() >= Duration::from_secs(4),
        "the job ended before the command's deadline: {}",
        d.logs()
    );
    let receipts = stored_receipts(&j);
    let r = &receipts[0]["receipt"];
    let cmd = &r["commands"][0];
    assert_eq!(cmd["outcome"], "failed", "{r}");
    assert_eq!(cmd["reason"]["code"], "vm-error", "{r}");
    assert!(
        cmd["reason"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("did not answer")),
        "{r}"
    );
    let wait = Instant::now() + Duration::from_secs(10);
    while !qemu_processes_mentioning(&data).is_empty() {
        assert!(Instant::now() < wait, "the frozen VM was left running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = std::fs::read_dir(data.join("receipts"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        j.p.requestor(["receipt", "verify", file.to_str().unwrap()])
            .code,
        0
    );
    let status = submitter.wait().unwrap();
    assert_ne!(
        status.code(),
        Some(0),
        "the requestor was told it succeeded"
    );
    let (r, events) = submit(&j, &d.addr, &[json!([run("/bin/echo", &["after"])])]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d.logs());
    let out = events.iter().find(|e| e["event"] == "result").unwrap();
    assert_eq!(out["stdout"], "after\n");
}

/// Fault campaign (docs/robustness.md): the disk the receipts go to is full when a running
/// job's receipt is written (the daemon stopped with SIGTERM ends the job). A small full
/// tmpfs on `receipts/` only: the job's teardown frees its own files just before the
/// receipt is written, so a full data dir has room again by then. The daemon says it
/// cannot store the receipt and still exits cleanly; no half-written receipt or temp is
/// left; after a restart the job counts as ended and a new job runs and stores its receipt.
#[test]
fn a_full_disk_at_receipt_writing_leaves_no_half_receipt_and_a_restart_serves() {
    let Some(j) = job() else { return };
    let data = j.p.data_dir();
    let Some(disk) = SmallDisk::mount(&data.join("receipts"), 1 << 20) else {
        return;
    };
    let cfg = j.p.write_input("cold.json", r#"{"warm_start": false}"#);
    let mut args = daemon_args(&j);
    args.extend(["--config".to_string(), cfg.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = j.p.daemon(&args);
    let mut submitter = start_long_job(&j, &d, Some(Duration::from_secs(2)));
    let filler = disk.fill();
    assert_eq!(d.stop(Duration::from_secs(60)), Some(0), "{}", d.logs());
    let logs = d.logs();
    assert!(
        logs.contains("cannot store the receipt") && logs.contains("No space left on device"),
        "{logs}"
    );
    assert!(qemu_processes_mentioning(&data).is_empty());
    let _ = submitter.kill();
    let _ = submitter.wait();
    let stored: Vec<_> = std::fs::read_dir(data.join("receipts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| *p != filler)
        .collect();
    assert!(
        stored.is_empty(),
        "a receipt or its temp was left: {stored:?}"
    );

    std::fs::remove_file(filler).unwrap();
    let d2 = j.p.daemon(&args);
    assert_clean(&data, "full disk at the receipt", false);
    let (r, events) = submit(&j, &d2.addr, &[json!([run("/bin/echo", &["room again"])])]);
    assert_eq!(r.code, 0, "{r:?}\n{}", d2.logs());
    let out = events.iter().find(|e| e["event"] == "result").unwrap();
    assert_eq!(out["stdout"], "room again\n");
    assert_eq!(stored_receipts(&j).len(), 1, "{}", d2.logs());
    drop(d2);
    // Unmounted first, so the temp dir under it can go.
    drop(disk);
}

/// Seconds since the epoch of an RFC 3339 timestamp (as the receipt writes them).
fn chrono_secs(v: &Value) -> f64 {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    t.timestamp_millis() as f64 / 1000.0
}

/// Issue 15's runtime profiles on a real VM: under a tight profile (read-only root, 16
/// tasks, half a vCPU, minimal Landlock, strict seccomp) a write to `/` fails while `/tmp`
/// stays writable and forking past 16 tasks fails; under `permissive` both succeed.
#[test]
fn a_runtime_profile_makes_the_root_read_only_and_caps_the_payloads_tasks() {
    let Some(env) = vm_env() else { return };
    let p = Provider::new();
    let dir = p.data_dir().join("runtime-profiles");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tight.toml"),
        "landlock = \"minimal\"\nseccomp = \"strict\"\npids_max = 16\ncpu_quota = 0.5\nread_only_rootfs = true\n",
    )
    .unwrap();
    let script = "touch /x && echo root-written; touch /tmp/y && echo tmp-written; \
                  i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo forked $i";
    for (profile, writable_root, forks) in [("tight", false, false), ("permissive", true, true)] {
        let r = p.run([
            "vm",
            "run",
            "--image",
            env.image.to_str().unwrap(),
            "--kernel",
            env.kernel.to_str().unwrap(),
            "--guest",
            env.agent.to_str().unwrap(),
            "--runtime-profile",
            profile,
            "--",
            "/bin/sh",
            "-c",
            script,
        ]);
        let all = format!("{}{}", r.stdout, r.stderr);
        assert!(all.contains("tmp-written"), "{profile}: {r:?}");
        assert_eq!(
            all.contains("root-written"),
            writable_root,
            "{profile}: {r:?}"
        );
        if !writable_root {
            assert!(all.contains("Read-only file system"), "{profile}: {r:?}");
        }
        assert_eq!(all.contains("forked 40"), forks, "{profile}: {r:?}");
        if !forks {
            assert!(all.contains("can't fork"), "{profile}: {r:?}");
        }
    }
    // A profile the host cannot enforce is refused, naming it (Landlock is on here, so a
    // CPU quota without a controller cannot be staged; an unknown scope is refused at load).
    std::fs::write(dir.join("bad.toml"), "landlock = \"everything\"\nseccomp = \"strict\"\npids_max = 1\ncpu_quota = 1\nread_only_rootfs = true\n").unwrap();
    let r = p.run([
        "vm",
        "run",
        "--image",
        env.image.to_str().unwrap(),
        "--runtime-profile",
        "bad",
        "--",
        "/bin/true",
    ]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("bad.toml"), "{r:?}");
}
