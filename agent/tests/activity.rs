//! `provider::activity` end to end: a manifest becomes a job in a real VM (QEMU, TCG where
//! KVM cannot boot Linux), batches pass the ExeScript gate, the payload's traffic goes
//! through the job's egress proxy to real sockets, and the receipt records it all.
//!
//! Booting takes seconds under TCG, so one job carries most assertions. Tests that need
//! QEMU, the guest kernel or busybox skip with a printed reason when the host lacks them
//! (`.ci/run` installs and fetches them), as `tests/vm.rs` does.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use egress::{AddressPolicy, Limits};
use net::wire::{CommandResult, Outcome};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::ssl::{SslAcceptor, SslMethod};
use openssl::x509::X509;
use provider::activity::{ActivityError, Job, JobConfig, JobSpec};
use provider::audit::AuditLog;
use provider::store::DataDir;
use provider::testsupport::{hex_digest, http_server, qemu_processes_mentioning, vm_env};
use serde_json::{json, Value};
use vm::{qemu::QemuOptions, Backend};

/// A TLS server identity for 127.0.0.1 (self-signed: the client trusts it as a root).
fn tls_identity() -> (Arc<SslAcceptor>, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let pem = cert.cert.pem();
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate(&X509::from_pem(pem.as_bytes()).unwrap())
        .unwrap();
    b.set_private_key(
        &PKey::private_key_from_pem(cert.key_pair.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    (Arc::new(b.build()), pem)
}

fn run(entry: &str, args: &[&str]) -> Value {
    json!({"run": {"entry_point": entry, "args": args}})
}

/// The commands of a batch, parsed as the daemon parses an `exec`.
fn commands(batch: &Value) -> Vec<exescript::Command> {
    exescript::parse_batch(&batch.to_string()).unwrap()
}

/// Runs a batch and collects its results.
fn exec(job: &Job, batch_id: &str, batch: Value) -> Vec<CommandResult> {
    let mut results = Vec::new();
    job.exec(batch_id, &commands(&batch), &mut |r| results.push(r))
        .unwrap_or_else(|e| panic!("batch {batch_id}: {e}"));
    results
}

fn summary(r: &CommandResult) -> String {
    format!(
        "{} → {:?} exit {:?} reason {:?}\nstdout: {}\nstderr: {}",
        r.command, r.outcome, r.exit_code, r.reason, r.stdout, r.stderr
    )
}

/// One job: allowed and denied commands, a failure, truncated output, egress allowed and
/// refused from inside the VM, transfers through the proxy, and the receipt at the end.
#[test]
fn a_job_runs_gated_batches_with_egress_only_through_its_proxy() {
    let Some(env) = vm_env() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(data_dir.path());
    let audit_path = data_dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&audit_path).unwrap());

    let file: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
    let upstream = |body: &str, tls| {
        let u = http_server(
            vec![("/allowed/file.bin".into(), file.to_vec())],
            Some(body.as_bytes().to_vec()),
            tls,
        );
        (u.port, u.connections)
    };
    let (allowed_port, allowed_hits) = upstream("hello from the allowed upstream\n", None);
    let (other_port, other_hits) = upstream("you must not see this\n", None);
    let (acceptor, ca_pem) = tls_identity();
    let (tls_port, tls_hits) = upstream("secure\n", Some(acceptor));
    // Listed in the manifest, but its certificate is not one the job trusts.
    let (untrusted, _) = tls_identity();
    let (untrusted_port, _) = upstream("forged\n", Some(untrusted));
    let ca_file = data_dir.path().join("test-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let image = std::fs::read(&env.image).unwrap();
    // Served on loopback, which the operator opens below: a requestor's payload is fetched
    // only over http(s) and under the same address policy as the job's egress.
    let image_server = http_server(vec![("/image.tar".into(), image.clone())], None, None);
    let now = chrono::Utc::now();
    let manifest = json!({
        "version": "0.1.0",
        "createdAt": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "expiresAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "metadata": {"name": "activity test", "version": "1.0.0"},
        "payload": [{
            "platform": {"arch": "x86_64", "os": "linux"},
            "urls": [format!("{}/image.tar", image_server.url())],
            "hash": format!("sha3:{}", hex_digest(MessageDigest::sha3_256(), &image)),
        }],
        "compManifest": {
            "version": "0.1.0",
            "script": {
                "commands": [
                    "run /bin/echo .*",
                    "run /bin/sh -c .*",
                    "run /bin/wget .*",
                    "run /bin/touch /tmp/.*",
                    "run /bin/cat /tmp/.*",
                    "transfer https?://127\\.0\\.0\\.1:[0-9]+/allowed/.* container:/tmp/.*",
                ],
                "match": "regex",
            },
            "net": {"inet": {"out": {
                "protocols": ["http", "https"],
                "urls": [
                    format!("http://127.0.0.1:{allowed_port}/allowed"),
                    format!("https://127.0.0.1:{tls_port}/"),
                    format!("https://127.0.0.1:{untrusted_port}/"),
                ],
            }}},
        },
    });
    let manifest_json = serde_json::to_vec(&manifest).unwrap();
    let spec = JobSpec {
        activity_id: "act-1".into(),
        agreement_id: "agr-1".into(),
        provider_id: "provider-peer".into(),
        requestor_id: "requestor-peer".into(),
        manifest_base64: base64::engine::general_purpose::STANDARD.encode(&manifest_json),
        mode: policies::Mode::All,
        whitelist: policies::WhitelistMatcher::new(&[]).unwrap(),
        expires_at: now + chrono::Duration::hours(1),
    };
    let config = JobConfig {
        backend: env.backend.clone(),
        kernel: env.kernel.clone(),
        guest_agent: env.agent.clone(),
        modules: env.modules.clone(),
        storage_bytes: 64 << 20,
        mem_mib: 256,
        cpus: 1,
        boot_timeout: Duration::from_secs(180),
        command_timeout: Duration::from_secs(60),
        max_output_bytes: 4096,
        max_transfer_bytes: 1 << 20,
        transfer_ca_files: vec![ca_file.clone()],
        // The upstreams are on the host's loopback: the operator opens it for this test.
        addresses: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        max_image_bytes: 64 << 20,
        image_disk_reserve: 0,
        image_cache_bytes: u64::MAX,
        plain_http_registries: Vec::new(),
        limits: Limits::default(),
        runtime: Default::default(),
        warm: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let job = Job::start(spec, &config, &data, audit.clone(), rt.handle().clone())
        .unwrap_or_else(|e| panic!("job start: {e}"));
    let job_dir = data_dir.path().join("jobs/act-1");
    assert_eq!(job.dir(), job_dir);
    assert!(
        !job_dir.join("initramfs.cpio").exists(),
        "the initramfs is removed once the guest has it"
    );

    // An allowed run.
    let r = exec(
        &job,
        "b1",
        json!([{"deploy": {}}, {"start": {}}, run("/bin/echo", &["hello"])]),
    );
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r.outcome == Outcome::Ok), "{r:#?}");
    assert_eq!(r[2].exit_code, Some(0));
    assert_eq!(r[2].stdout, "hello\n");
    assert_eq!(r[2].command, "run /bin/echo hello");

    // Allowed, denied, allowed: the third is skipped and does not run.
    let r = exec(
        &job,
        "b2",
        json!([
            run("/bin/echo", &["first"]),
            run("/bin/date", &["-R"]),
            run("/bin/touch", &["/tmp/third-ran"]),
        ]),
    );
    let outcomes: Vec<Outcome> = r.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Ok, Outcome::Denied, Outcome::Skipped],
        "{r:#?}"
    );
    let denied = r[1].reason.as_ref().unwrap();
    assert_eq!(denied.code, "script-no-match", "{denied:?}");
    assert!(denied.message.contains("run /bin/date -R"), "{denied:?}");
    assert_eq!(r[2].reason.as_ref().unwrap().code, "after-denied");
    let r = exec(
        &job,
        "b3",
        json!([run(
            "/bin/sh",
            &[
                "-c",
                "test -e /tmp/third-ran && echo present || echo absent"
            ]
        )]),
    );
    assert_eq!(r[0].stdout, "absent\n", "{}", summary(&r[0]));

    // A failure stops the batch too; output beyond the limit is cut but hashed whole.
    let r = exec(
        &job,
        "b4",
        json!([
            run(
                "/bin/sh",
                &[
                    "-c",
                    "head -c 10000 /dev/zero | tr '\\0' a; echo oops >&2; exit 3"
                ]
            ),
            run("/bin/echo", &["after"]),
        ]),
    );
    assert_eq!(r[0].outcome, Outcome::Failed, "{}", summary(&r[0]));
    assert_eq!(r[0].exit_code, Some(3));
    assert_eq!(r[0].reason.as_ref().unwrap().code, "exit-code");
    assert_eq!(r[0].stdout, "a".repeat(4096));
    assert!(r[0].truncated);
    assert_eq!(r[0].stderr, "oops\n");
    assert_eq!(r[1].outcome, Outcome::Skipped);
    assert_eq!(r[1].reason.as_ref().unwrap().code, "after-failed");

    // A batch that does not parse never reaches the job: the place is named.
    let err = exescript::parse_batch(
        &json!([{"run": {"entry_point": "/bin/echo", "argz": []}}]).to_string(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("argz"), "{err}");

    // Egress from inside the VM: busybox wget uses the http_proxy the guest agent sets.
    let allowed = format!("http://127.0.0.1:{allowed_port}/allowed");
    let r = exec(
        &job,
        "e1",
        json!([run("/bin/wget", &["-q", "-O", "-", &allowed])]),
    );
    assert_eq!(r[0].outcome, Outcome::Ok, "{}", summary(&r[0]));
    assert_eq!(r[0].stdout, "hello from the allowed upstream\n");
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);

    // Another port, another host name: refused by the proxy, never reached.
    for (batch, url) in [
        ("e2", format!("http://127.0.0.1:{other_port}/allowed")),
        ("e3", format!("http://localhost:{allowed_port}/allowed")),
    ] {
        let r = exec(
            &job,
            batch,
            json!([run("/bin/wget", &["-q", "-O", "-", &url])]),
        );
        assert_eq!(r[0].outcome, Outcome::Failed, "{url}: {}", summary(&r[0]));
        assert!(!r[0].stdout.contains("hello"), "{}", summary(&r[0]));
    }
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "the other port was reached"
    );
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        1,
        "localhost was let through"
    );

    // Without the proxy there is no way out: the guest's loopback has no upstream, and
    // there is no network device for anything else.
    for (batch, url) in [
        ("e4", allowed.clone()),
        ("e5", format!("http://10.0.2.2:{allowed_port}/allowed")),
    ] {
        let r = exec(
            &job,
            batch,
            json!([run(
                "/bin/wget",
                &["-Y", "off", "-T", "5", "-q", "-O", "-", &url]
            )]),
        );
        assert_eq!(r[0].outcome, Outcome::Failed, "{url}: {}", summary(&r[0]));
    }
    assert_eq!(
        allowed_hits.load(Ordering::SeqCst),
        1,
        "a direct connection got out"
    );

    // Transfers: fetched through the same proxy, so the allowlist holds for them too.
    let r = exec(
        &job,
        "t1",
        json!([
            {"transfer": {"from": format!("{allowed}/file.bin"), "to": "container:/tmp/file.bin"}},
            run("/bin/sh", &["-c", "sha256sum /tmp/file.bin | cut -d' ' -f1"]),
        ]),
    );
    assert_eq!(r[0].outcome, Outcome::Ok, "{}", summary(&r[0]));
    assert_eq!(
        r[1].stdout.trim(),
        hex_digest(MessageDigest::sha256(), &file),
        "{}",
        summary(&r[1])
    );
    let r = exec(
        &job,
        "t2",
        json!([{"transfer": {
            "from": format!("http://127.0.0.1:{other_port}/allowed/file.bin"),
            "to": "container:/tmp/other.bin"
        }}]),
    );
    assert_eq!(r[0].outcome, Outcome::Failed, "{}", summary(&r[0]));
    assert_eq!(
        r[0].reason.as_ref().unwrap().code,
        "egress-denied",
        "{r:#?}"
    );
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
    // HTTPS: a CONNECT tunnel through the proxy, TLS verified against the operator's CA.
    let r = exec(
        &job,
        "t3",
        json!([
            {"transfer": {
                "from": format!("https://127.0.0.1:{tls_port}/allowed/file.bin"),
                "to": "container:/tmp/secure.bin"
            }},
            run("/bin/sh", &["-c", "sha256sum /tmp/secure.bin | cut -d' ' -f1"]),
        ]),
    );
    assert_eq!(r[0].outcome, Outcome::Ok, "{}", summary(&r[0]));
    assert_eq!(
        r[1].stdout.trim(),
        hex_digest(MessageDigest::sha256(), &file),
        "{}",
        summary(&r[1])
    );
    assert_eq!(tls_hits.load(Ordering::SeqCst), 1);
    let r = exec(
        &job,
        "t4",
        json!([{"transfer": {
            "from": format!("https://127.0.0.1:{untrusted_port}/allowed/file.bin"),
            "to": "container:/tmp/forged.bin"
        }}]),
    );
    assert_eq!(r[0].outcome, Outcome::Failed, "{}", summary(&r[0]));
    let why = r[0].reason.as_ref().unwrap();
    assert_eq!(why.code, "transfer-failed", "{why:?}");
    assert!(why.message.contains("TLS"), "{why:?}");

    // The manifest's `net` allows the whole TLS upstream, so only the script constraint
    // (`…/allowed/.*`) keeps its other paths out: what the URL parser would fetch for these
    // lies outside `/allowed/`, and the gate refuses them before anything is fetched.
    for (id, from) in [
        (
            "t5",
            format!("https://127.0.0.1:{tls_port}/allowed/../secret.bin"),
        ),
        (
            "t6",
            format!("https://127.0.0.1:{tls_port}/allowed/%2e%2e/secret.bin"),
        ),
        (
            "t7",
            format!("https://127.0.0.1:{tls_port}/allowed/..\\secret.bin"),
        ),
    ] {
        let r = exec(
            &job,
            id,
            json!([{"transfer": {"from": from, "to": "container:/tmp/secret.bin"}}]),
        );
        assert_eq!(r[0].outcome, Outcome::Denied, "{from}: {}", summary(&r[0]));
        let why = r[0].reason.as_ref().unwrap();
        assert_eq!(why.code, "transfer-not-canonical", "{from}: {why:?}");
    }
    assert_eq!(
        tls_hits.load(Ordering::SeqCst),
        1,
        "a refused transfer was fetched"
    );

    // Sixteen guest connections at once through the bridge. Small answers: data into the
    // guest crosses its emulated UART at tens of KiB/s under TCG.
    let many = format!(
        "for i in $(seq 16); do wget -q -O /tmp/many.$i {allowed} & done; wait; cat /tmp/many.* | wc -c"
    );
    let r = exec(&job, "c1", json!([run("/bin/sh", &["-c", &many])]));
    assert_eq!(r[0].outcome, Outcome::Ok, "{}", summary(&r[0]));
    assert_eq!(
        r[0].stdout.trim(),
        (16 * "hello from the allowed upstream\n".len()).to_string(),
        "{}",
        summary(&r[0])
    );

    // Every guest connection's threads and proxy task end with the connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while job.egress().active_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        job.egress().active_connections(),
        0,
        "connections left open"
    );

    // A stop from another thread while a command runs: the VM dies at once, the command
    // fails, the rest is skipped, later batches are refused; terminate still works.
    let stopper = job.stopper();
    let started = Instant::now();
    let r = std::thread::scope(|s| {
        let running = s.spawn(|| {
            exec(
                &job,
                "s1",
                json!([
                    run("/bin/sh", &["-c", "echo waiting; sleep 50"]),
                    run("/bin/echo", &["never"]),
                ]),
            )
        });
        std::thread::sleep(Duration::from_secs(2));
        stopper.stop("terminated by requestor");
        running.join().unwrap()
    });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r[0].outcome, Outcome::Failed, "{}", summary(&r[0]));
    assert_eq!(r[0].reason.as_ref().unwrap().code, "job-stopped");
    assert_eq!(r[1].outcome, Outcome::Skipped);
    assert_eq!(r[1].reason.as_ref().unwrap().code, "after-failed");
    let err = job
        .exec(
            "s2",
            &commands(&json!([run("/bin/echo", &["late"])])),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, ActivityError::Stopped(_)), "{err}");

    let receipt = job.terminate("terminated by requestor");
    let left = qemu_processes_mentioning(data_dir.path());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
    assert!(!job_dir.join("initramfs.cpio").exists());

    assert_eq!(receipt.activity_id, "act-1");
    assert_eq!(receipt.agreement_id, "agr-1");
    assert_eq!(receipt.termination, "terminated by requestor");
    assert_eq!(receipt.backend, "qemu");
    assert_eq!(
        receipt.manifest_sha256,
        hex_digest(MessageDigest::sha256(), &manifest_json)
    );
    assert_eq!(
        receipt.image_hash,
        format!("sha3:{}", hex_digest(MessageDigest::sha3_256(), &image))
    );
    let cmds: Vec<(&str, usize, Outcome)> = receipt
        .commands
        .iter()
        .map(|c| (c.batch_id.as_str(), c.index, c.outcome))
        .collect();
    assert_eq!(
        &cmds[..9],
        [
            ("b1", 0, Outcome::Ok),
            ("b1", 1, Outcome::Ok),
            ("b1", 2, Outcome::Ok),
            ("b2", 0, Outcome::Ok),
            ("b2", 1, Outcome::Denied),
            ("b2", 2, Outcome::Skipped),
            ("b3", 0, Outcome::Ok),
            ("b4", 0, Outcome::Failed),
            ("b4", 1, Outcome::Skipped),
        ]
    );
    assert!(!receipt.commands.iter().any(|c| c.batch_id == "bad"));
    // The hash covers the whole stdout, not the 4096 bytes the result kept.
    let b4 = &receipt.commands[7];
    assert_eq!(
        b4.stdout_sha256,
        hex_digest(MessageDigest::sha256(), "a".repeat(10000).as_bytes())
    );
    assert_eq!(b4.exit_code, Some(3));
    let t1 = receipt
        .commands
        .iter()
        .find(|c| c.batch_id == "t1" && c.index == 0)
        .unwrap();
    assert_eq!(
        t1.stdout_sha256,
        hex_digest(
            MessageDigest::sha256(),
            format!("{} bytes to /tmp/file.bin\n", file.len()).as_bytes()
        )
    );
    let allow: Vec<_> = receipt
        .egress
        .iter()
        .filter(|e| e.decision == "allow")
        .collect();
    let deny: Vec<_> = receipt
        .egress
        .iter()
        .filter(|e| e.decision == "deny")
        .collect();
    // The untrusted tunnel was allowed by the proxy; the job's TLS client refused it.
    assert_eq!(
        allow.len(),
        4 + 16,
        "wget, the transfers and the parallel wgets: {:#?}",
        receipt.egress
    );
    assert!(allow[..2].iter().all(|e| e
        .destination
        .contains(&format!("127.0.0.1:{allowed_port}/allowed"))));
    assert_eq!(allow[2].method, "CONNECT");
    assert_eq!(allow[2].destination, format!("127.0.0.1:{tls_port}"));
    assert!(allow.iter().any(|e| e.bytes_down >= file.len() as u64));
    assert_eq!(deny.len(), 3, "{:#?}", receipt.egress);
    for e in &deny {
        let want = if e.destination.contains("localhost") {
            "not-listed"
        } else {
            assert!(e.destination.contains(&format!(":{other_port}/")), "{e:?}");
            "wrong-port"
        };
        assert_eq!(e.rule, want, "{e:?}");
    }
    assert!(deny.iter().any(|e| e.destination.contains("localhost")));
    assert!(receipt.usage.egress_bytes >= file.len() as u64);
    assert!(receipt.usage.boot_ms > 0);
    assert_eq!(receipt.usage.mem_mib, 256);

    // The daemon's audit log has every command decision and every egress decision.
    let lines: Vec<Value> = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied_line = lines
        .iter()
        .find(|l| l["event"] == "command" && l["outcome"] == "denied")
        .expect("a denied command line");
    assert_eq!(denied_line["activity_id"], "act-1");
    assert_eq!(denied_line["batch_id"], "b2");
    assert_eq!(denied_line["index"], 1);
    assert_eq!(denied_line["code"], "script-no-match");
    assert_eq!(
        lines.iter().filter(|l| l["event"] == "egress").count(),
        receipt.egress.len()
    );
    assert!(lines
        .iter()
        .any(|l| l["event"] == "job" && l["phase"] == "ended"));
}

/// A manifest for `image` (its bytes) with `script` commands and no outbound.
fn manifest_for(image_url: &str, image: &[u8], script: Value) -> Value {
    let now = chrono::Utc::now();
    json!({
        "version": "0.1.0",
        "createdAt": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "expiresAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "payload": [{
            "platform": {"arch": "x86_64", "os": "linux"},
            "urls": [image_url],
            "hash": format!("sha3:{}", hex_digest(MessageDigest::sha3_256(), image)),
        }],
        "compManifest": {"version": "0.1.0", "script": script},
    })
}

fn spec_for(id: &str, manifest: &Value, expires_in: chrono::Duration) -> JobSpec {
    JobSpec {
        activity_id: id.into(),
        agreement_id: format!("agr-{id}"),
        provider_id: "provider-peer".into(),
        requestor_id: "requestor-peer".into(),
        manifest_base64: base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(manifest).unwrap()),
        mode: policies::Mode::None,
        whitelist: policies::WhitelistMatcher::new(&[]).unwrap(),
        expires_at: chrono::Utc::now() + expires_in,
    }
}

fn config_for(backend: Backend, kernel: PathBuf, agent: PathBuf, timeout: Duration) -> JobConfig {
    let modules = vm::find_modules(&kernel).ok().flatten();
    JobConfig {
        backend,
        kernel,
        guest_agent: agent,
        modules,
        storage_bytes: 64 << 20,
        mem_mib: 256,
        cpus: 1,
        boot_timeout: Duration::from_secs(180),
        command_timeout: timeout,
        max_output_bytes: 4096,
        max_transfer_bytes: 1 << 20,
        transfer_ca_files: Vec::new(),
        // The tests serve images on loopback; the operator opens it.
        addresses: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        max_image_bytes: 64 << 20,
        image_disk_reserve: 0,
        image_cache_bytes: u64::MAX,
        plain_http_registries: Vec::new(),
        limits: Limits::default(),
        runtime: Default::default(),
        warm: None,
    }
}

/// Everything refused before a VM could start: no VMM is ever launched (the backend here
/// is a binary that does not exist) and no job directory is left.
#[test]
fn a_job_is_refused_before_boot_for_what_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path().join("data"));
    let image = dir.path().join("image.tar");
    std::fs::write(&image, b"an image that is never unpacked").unwrap();
    let bytes = std::fs::read(&image).unwrap();
    let server = http_server(vec![("/image.tar".into(), bytes.clone())], None, None);
    let url = format!("{}/image.tar", server.url());
    let config = config_for(
        Backend::Qemu(QemuOptions {
            binary: dir.path().join("no-qemu"),
            accel: vm::Accel::Tcg,
            sandbox: false,
        }),
        dir.path().join("no-kernel"),
        dir.path().join("no-agent"),
        Duration::from_secs(5),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let audit = Arc::new(AuditLog::memory());
    let start_with = |spec: JobSpec, config: &JobConfig| {
        Job::start(spec, config, &data, audit.clone(), rt.handle().clone())
            .err()
            .expect("the job must not start")
    };
    let start = |spec: JobSpec| start_with(spec, &config);
    let good = manifest_for(&url, &bytes, json!({"commands": ["run /bin/echo hi"]}));
    let hour = chrono::Duration::hours(1);

    let e = start(spec_for("../escape", &good, hour));
    assert!(matches!(e, ActivityError::BadActivityId(_)), "{e}");

    let e = start(spec_for("expired-agreement", &good, -hour));
    assert!(matches!(e, ActivityError::Expired(_)), "{e}");

    let mut s = spec_for("not-base64", &good, hour);
    s.manifest_base64 = "%%%".into();
    let e = start(s);
    assert!(matches!(e, ActivityError::Manifest(_)), "{e}");

    let mut old = good.clone();
    old["expiresAt"] = json!("2020-01-01T00:00:00Z");
    old["createdAt"] = json!("2019-01-01T00:00:00Z");
    let e = start(spec_for("expired-manifest", &old, hour));
    assert!(e.to_string().contains("expired"), "{e}");

    let bad_regex = manifest_for(
        &url,
        &bytes,
        json!({"commands": ["run /bin/(echo"], "match": "regex"}),
    );
    let e = start(spec_for("bad-regex", &bad_regex, hour));
    assert!(matches!(e, ActivityError::Script(_)), "{e}");

    let mut arm = good.clone();
    arm["payload"][0]["platform"]["arch"] = json!("aarch64");
    let e = start(spec_for("other-platform", &arm, hour));
    assert!(e.to_string().contains("platform-unsupported"), "{e}");

    let mut wrong = good.clone();
    wrong["payload"][0]["hash"] = json!(format!("sha3:{}", "ab".repeat(32)));
    let e = start(spec_for("wrong-hash", &wrong, hour));
    assert!(e.to_string().contains("hash mismatch"), "{e}");
    assert_eq!(e.public_reason().code, "payload-hash-mismatch");

    // The host never reads its own files for a requestor, nor says whether they exist.
    let requests = server.paths().len();
    let dir_text = dir.path().display().to_string();
    for (id, file_url) in [
        ("file-image", format!("file://{}", image.display())),
        ("dev-zero", "file:///dev/zero".to_owned()),
        ("missing-file", format!("file://{}/nothing-here", dir_text)),
    ] {
        let m = manifest_for(&file_url, &bytes, json!({"commands": []}));
        let e = start(spec_for(id, &m, hour));
        let reason = e.public_reason();
        assert_eq!(reason.code, "payload-url-refused", "{id}: {e}");
        assert!(!reason.message.contains("No such file"), "{id}: {reason:?}");
    }
    // Nor fetches from its own loopback unless the operator opened it (`--allow-cidr`).
    let mut closed_config = config.clone();
    closed_config.addresses = AddressPolicy::new(Vec::new());
    let e = start_with(spec_for("loopback", &good, hour), &closed_config);
    let reason = e.public_reason();
    assert_eq!(reason.code, "payload-url-refused", "{e}");
    assert_eq!(
        server.paths().len(),
        requests,
        "a refused image fetch reached the server"
    );
    // A port nothing listens on and a refusal by policy read the same to the requestor.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = manifest_for(
        &format!("http://127.0.0.1:{closed}/image.tar"),
        &bytes,
        json!({"commands": []}),
    );
    let reason = start(spec_for("closed-port", &m, hour)).public_reason();
    assert_eq!(reason.code, "payload-fetch-failed", "{reason:?}");
    assert!(
        !reason.message.to_lowercase().contains("refused"),
        "{reason:?}"
    );
    // An image beyond the operator's limit is cut off while it streams.
    let mut small = config.clone();
    small.max_image_bytes = 10;
    let reason = start_with(spec_for("too-large", &good, hour), &small).public_reason();
    assert_eq!(reason.code, "payload-too-large", "{reason:?}");
    for entry in std::fs::read_dir(dir.path().join("data/images")).unwrap() {
        let entry = entry.unwrap();
        assert!(
            entry.file_type().unwrap().is_dir(),
            "left in the store: {entry:?}"
        );
    }

    assert!(
        !dir.path().join("data/jobs").exists()
            || std::fs::read_dir(dir.path().join("data/jobs"))
                .unwrap()
                .next()
                .is_none(),
        "a refused job left a directory"
    );
}

/// A command is killed at the job's command timeout; a job dropped without terminate
/// leaves no QEMU behind; an activity id cannot be reused while its directory exists.
#[test]
fn a_command_times_out_and_a_dropped_job_leaves_no_vm() {
    let Some(env) = vm_env() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(data_dir.path());
    let image = std::fs::read(&env.image).unwrap();
    let server = http_server(vec![("/image.tar".into(), image.clone())], None, None);
    let manifest = manifest_for(
        &format!("{}/image.tar", server.url()),
        &image,
        json!({"commands": ["run /bin/sh -c .*", "run /bin/echo .*"], "match": "regex"}),
    );
    let config = config_for(
        env.backend.clone(),
        env.kernel.clone(),
        env.agent.clone(),
        Duration::from_secs(3),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let audit = Arc::new(AuditLog::memory());
    let spec = spec_for("slow", &manifest, chrono::Duration::hours(1));
    let job = Job::start(
        spec.clone(),
        &config,
        &data,
        audit.clone(),
        rt.handle().clone(),
    )
    .unwrap_or_else(|e| panic!("job start: {e}"));

    let started = Instant::now();
    let r = exec(
        &job,
        "b1",
        json!([
            run("/bin/sh", &["-c", "echo started; sleep 60"]),
            run("/bin/echo", &["never"]),
        ]),
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r[0].outcome, Outcome::Failed, "{}", summary(&r[0]));
    assert_eq!(r[0].reason.as_ref().unwrap().code, "timeout");
    assert_eq!(r[0].stdout, "started\n");
    assert_eq!(r[1].outcome, Outcome::Skipped);

    // The directory is taken while the job lives (and after: console.log stays).
    let e = Job::start(spec, &config, &data, audit, rt.handle().clone())
        .err()
        .expect("a second job with the same id");
    assert!(matches!(e, ActivityError::JobDir { .. }), "{e}");

    assert!(!qemu_processes_mentioning(data_dir.path()).is_empty());
    drop(job);
    let left = qemu_processes_mentioning(data_dir.path());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}
