//! A job's usage and its price, end to end in one VM: the provider meters the VM's CPU
//! seconds, wall seconds and egress on the host, `provider status` shows the job while it
//! runs, and the signed receipt carries the usage vector and the amount, which `requestor
//! receipt verify` shows and checks.
//!
//! Its own test binary, so the VM that burns CPU does not share the machine's cores with
//! the other VM tests (cargo runs test binaries one after another). One VM boot; skipped
//! with a printed reason where QEMU, the kernel or busybox is missing.

use std::time::{Duration, Instant};

use certs::testpki::{self, KeyKind, Validity};
use openssl::hash::MessageDigest;
use provider::testsupport::{hex_digest, http_server, vm_env};
use serde_json::{json, Value};
use tests::util::{write_signed, Provider};

/// Seconds of CPU the payload burns.
const BURN_SECS: f64 = 5.0;

/// Busy-waits `BURN_SECS` by the guest's `/proc/uptime` (centiseconds), with shell
/// builtins only: all of it CPU in the guest, none of it waiting.
fn burn_script() -> String {
    let cs = (BURN_SECS * 100.0) as u64;
    format!(
        "read up rest </proc/uptime; end=$(( ${{up%.*}}${{up#*.}} + {cs} )); \
         while :; do read up rest </proc/uptime; t=${{up%.*}}${{up#*.}}; [ $t -ge $end ] && break; done"
    )
}

/// The pid of the QEMU process whose command line mentions `data`.
fn qemu_pid(data: &std::path::Path) -> Option<u32> {
    let needle = data.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("qemu-system") && cmd.contains(&needle)).then_some(pid)
    })
}

/// Reads the job's QEMU process's CPU ticks from `/proc` every 100 ms, on its own, until
/// the process is gone: the kernel's account of what the VM used, to hold the provider's
/// meter against.
fn watch_vm_cpu(data: std::path::PathBuf) -> std::sync::Arc<std::sync::Mutex<Vec<u64>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        let pid = loop {
            if let Some(pid) = qemu_pid(&data) {
                break pid;
            }
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Some(t) = provider::activity::meter::cpu_ticks(pid) {
            out.lock().unwrap().push(t);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    seen
}

fn run(entry: &str, args: &[&str]) -> Value {
    json!({"run": {"entry_point": entry, "args": args}})
}

#[test]
fn a_job_is_metered_shown_while_it_runs_and_charged_in_its_signed_receipt() {
    let Some(env) = vm_env() else { return };
    let image = std::fs::read(&env.image).unwrap();
    let hash = hex_digest(MessageDigest::sha3_256(), &image);
    let upstream = http_server(vec![("/image.tar".into(), image)], None, None);

    let p = Provider::new();
    let root = testpki::root("Usage Root", KeyKind::EcP256, Validity::current());
    let author = testpki::issue(
        &root,
        "Usage Author",
        KeyKind::EcP256,
        false,
        Validity::current(),
    );
    let root_pem = p.write_input("root.pem", root.cert.to_pem().unwrap());
    p.keystore_add(&[&root_pem]).ok();
    let m = json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "usage", "version": "1.0.0"},
        "payload": [{"platform": {"arch": "x86_64", "os": "linux"},
                     "urls": [format!("{}/image.tar", upstream.url())],
                     "hash": format!("sha3:{hash}")}],
        "compManifest": {"version": "0.1.0"}
    });
    let (manifest, sig, cert) =
        write_signed(&p, "usage", &m, &author, &testpki::pem(&[&author.cert]));
    p.run([
        "profile",
        "set",
        "--cpu-threads",
        "1",
        "--mem",
        "2G",
        "--max-jobs",
        "1",
    ])
    .ok();
    p.run([
        "preset",
        "create",
        "std",
        "--duration-per-hour",
        "0.36",
        "--cpu-per-hour",
        "3.6",
        "--egress-per-gib",
        "1",
        "--start-fee",
        "0.05",
        "--runtime-profile",
        "strict",
    ])
    .ok();
    let d = p.daemon(&[
        "--allow-cidr",
        "127.0.0.0/8",
        "--guest",
        &env.agent.display().to_string(),
        "--preset",
        "std",
    ]);
    let identity = p.input("requestor.key");
    let requestor_id = p
        .requestor(["identity", "--identity", identity.to_str().unwrap()])
        .ok()
        .stdout
        .trim()
        .to_string();

    let batches = [
        // The VM has the agreement's memory: 768 MiB asked for below.
        json!([{"deploy": {}}, {"start": {}}, run("/bin/grep", &["MemTotal", "/proc/meminfo"]),
               run("/bin/sleep", &["8"])]),
        json!([run("/bin/sh", &["-c", &burn_script()])]),
    ];
    let mut cmd = std::process::Command::new(tests::util::bin("requestor"));
    cmd.args(["--json", "submit", "--provider", &d.addr, "--timeout", "5m"])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--sig")
        .arg(&sig)
        .arg("--cert")
        .arg(&cert)
        .arg("--identity")
        .arg(&identity)
        .args(["--constraints", "(golem.inf.mem.gib>=0.75)"])
        .args(["--max-price", "cpu=3.6"])
        .arg("--out-dir")
        .arg(p.input("receipts"))
        .current_dir(p.input(""))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (i, b) in batches.iter().enumerate() {
        cmd.arg("--script")
            .arg(p.write_input(&format!("batch{i}.json"), b.to_string()));
    }
    let vm_cpu = watch_vm_cpu(p.data_dir());
    let submitter = cmd.spawn().unwrap();

    // While it runs: the daemon's status lists the job, its requestor, share and usage.
    let deadline = Instant::now() + Duration::from_secs(240);
    let running = loop {
        let s = p.run(["--json", "status"]);
        if s.code == 0 {
            let s = s.json();
            if let Some(j) = s["jobs"].as_array().and_then(|j| j.first()) {
                break j.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no running job in the status: {}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(running["requestor_id"], requestor_id.as_str(), "{running}");
    assert_eq!(running["preset"], "std");
    assert_eq!(running["grant"]["mem_gib"], 0.75, "{running}");
    assert_eq!(running["grant"]["cpu_threads"], 1);
    let activity = running["activity_id"].as_str().unwrap().to_string();
    let table = p.run(["status"]).ok().stdout;
    assert!(
        table.contains(&activity[..16]) && table.contains("768 MiB"),
        "{table}"
    );
    let listed = p.run(["--json", "jobs", "list"]).ok().json();
    assert_eq!(listed[0]["state"], "running", "{listed}");
    // The guest sleeps now: the VM's CPU time from here on is the burn's (and idling).
    std::thread::sleep(Duration::from_secs(2));
    let base = *vm_cpu
        .lock()
        .unwrap()
        .last()
        .expect("the VM's CPU was read");

    let out = submitter.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.logs()
    );
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let meminfo = events
        .iter()
        .find(|e| e["event"] == "result" && e["stdout"].as_str().unwrap_or("").contains("MemTotal"))
        .expect("the meminfo result");
    let kib: u64 = meminfo["stdout"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (600 * 1024..=768 * 1024).contains(&kib),
        "the VM has {kib} KiB; the agreement gave it 768 MiB"
    );

    // The signed receipt: usage vector, coefficients and the amount they make.
    let receipt_event = events.iter().find(|e| e["event"] == "receipt").unwrap();
    let path = receipt_event["path"].as_str().unwrap().to_string();
    let v = p
        .requestor(["--json", "receipt", "verify", &path])
        .ok()
        .json();
    assert_eq!(v["valid"], true, "{v}");
    let charge = &v["charge"];
    assert_eq!(charge["preset"], "std");
    assert_eq!(
        charge["usage_vector"],
        json!([
            "golem.usage.duration_sec",
            "golem.usage.cpu_sec",
            "golem.usage.egress_mib"
        ])
    );
    assert_eq!(
        charge["coeffs"],
        json!(["0.0001", "0.001", "0.0009765625", "0.05"])
    );
    let num = |v: &Value| v.as_str().unwrap().parse::<f64>().unwrap();
    let duration = num(&charge["usage"][0]);
    let cpu = num(&charge["usage"][1]);
    let egress = num(&charge["usage"][2]);
    let last = *vm_cpu.lock().unwrap().last().unwrap();
    let kernel = (last - base) as f64 / provider::activity::meter::ticks_per_sec() as f64;
    eprintln!(
        "metered: {duration} s wall, {cpu} CPU s (burned {BURN_SECS} s; the kernel counted {kernel:.2} s since the sleep began), {egress} MiB egress; amount {}",
        charge["amount"]
    );
    // The meter is the kernel's account of the VM's CPU (less the boot, plus the idle
    // seconds before the test's first reading).
    assert!(
        cpu >= kernel * 0.8 && cpu <= kernel * 1.2 + 0.5,
        "metered {cpu} CPU s; the kernel counted {kernel:.2} s for the VM"
    );
    // And when the host gave the VM a core for the burn (a quiet machine, CI), that is
    // the burn: N seconds of CPU are metered as N within 20 %. On a loaded machine the VM
    // got less than N: the meter must say so, not make it up.
    if kernel >= BURN_SECS * 0.8 {
        assert!(
            (BURN_SECS * 0.8..=BURN_SECS * 1.2).contains(&cpu),
            "a payload that burned {BURN_SECS} s of CPU was metered {cpu} CPU s"
        );
    } else {
        eprintln!("the host was loaded: the VM got {kernel:.2} s of CPU in {BURN_SECS} s");
        assert!(cpu < BURN_SECS * 0.8 * 1.2 + 0.5, "metered {cpu} CPU s");
    }
    assert!(
        duration >= 8.0 + BURN_SECS * 0.9,
        "{duration} s of wall time"
    );
    assert_eq!(egress, 0.0);
    let amount = 0.05 + duration * 0.0001 + cpu * 0.001;
    assert_eq!(charge["amount"], format!("{amount:.9}"));
    assert_eq!(v["runtime_profile"], "strict");
    let text = p.requestor(["receipt", "verify", &path]).ok().stdout;
    assert!(
        text.contains(&format!("amount due: {amount:.9} GLM (preset std"))
            && text.contains("golem.usage.cpu_sec = "),
        "{text}"
    );
    // The amount is signed: a cheaper one breaks the signature.
    let mut receipt: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    receipt["receipt"]["charge"]["amount"] = "0.000000000".into();
    let t = p.write_input("cheaper.json", receipt.to_string());
    assert_eq!(
        p.requestor(["receipt", "verify", t.to_str().unwrap()]).code,
        1
    );

    // Afterwards: the finished job, from its stored receipt, and its audit lines.
    let listed = p.run(["--json", "jobs", "list"]).ok().json();
    assert_eq!(listed[0]["state"], "ended", "{listed}");
    assert_eq!(listed[0]["activity_id"], activity.as_str());
    assert_eq!(listed[0]["amount"], charge["amount"]);
    let show = p.run(["jobs", "show", &activity[..12]]).ok().stdout;
    assert!(
        show.contains("signature OK")
            && show.contains("terminated by the requestor")
            && show.contains("/bin/sleep 8"),
        "{show}"
    );
    let shown = p
        .run(["--json", "jobs", "show", &activity[..12]])
        .ok()
        .json();
    assert_eq!(shown["receipt_valid"], true);
    let lines = p
        .run(["--json", "audit", "--job", &activity[..12]])
        .ok()
        .json();
    let events: Vec<&str> = lines
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["event"].as_str().unwrap())
        .collect();
    for e in ["activity-created", "job", "command", "activity-terminated"] {
        assert!(events.contains(&e), "{e} missing: {events:?}");
    }
    // The job's log names its runtime profile too: its audit line and its directory.
    let created = lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["event"] == "activity-created")
        .unwrap();
    assert_eq!(created["runtime_profile"], "strict", "{created}");
    assert!(created["start_ms"].as_u64().unwrap() > 0);
    let rp: Value = serde_json::from_slice(
        &std::fs::read(
            p.data_dir()
                .join("jobs")
                .join(&activity)
                .join("runtime-profile.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rp["name"], "strict");
    assert_eq!(rp["read_only_rootfs"], true);
}
