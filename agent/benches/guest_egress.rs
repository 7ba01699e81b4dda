//! `cargo bench -p provider --bench guest_egress`: a payload downloads 100 MiB from a
//! loopback upstream through the job's egress proxy (busybox `wget` in the guest → the
//! guest agent's proxy listener → the virtio-serial channel → the host's proxy → the
//! upstream), as a real job does: `Job::start` with a manifest that allows the URL, then
//! `run` batches through the ExeScript gate. Prints MB/s per run and the median.
//!
//! Needs what the VM tests need (QEMU, the kernel and its modules, busybox-static,
//! squashfs-tools, e2fsprogs) and the static guest agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use openssl::hash::MessageDigest;
use provider::activity::{Job, JobConfig, JobSpec};
use provider::audit::AuditLog;
use provider::store::DataDir;
use provider::testsupport::{hex_digest, http_server, vm_env};
use serde_json::json;

const BYTES: usize = 100 * 1024 * 1024;
const RUNS: usize = 3;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = vm_env().expect("a VM environment (QEMU, kernel, busybox)");
    let image = std::fs::read(&env.image).unwrap();
    let images = http_server(vec![("/image.tar".into(), image.clone())], None, None);
    let mut blob = vec![0u8; BYTES];
    openssl::rand::rand_bytes(&mut blob).unwrap();
    let upstream = http_server(vec![("/data/blob".into(), blob)], None, None);
    let now = chrono::Utc::now();
    let manifest = json!({
        "version": "0.1.0",
        "createdAt": (now - chrono::Duration::minutes(1)).to_rfc3339(),
        "expiresAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "payload": [{
            "platform": {"arch": "x86_64", "os": "linux"},
            "urls": [format!("{}/image.tar", images.url())],
            "hash": format!("sha3:{}", hex_digest(MessageDigest::sha3_256(), &image)),
        }],
        "compManifest": {
            "version": "0.1.0",
            "script": {"commands": ["run /bin/wget .*"], "match": "regex"},
            "net": {"inet": {"out": {
                "protocols": ["http"],
                "urls": [format!("{}/data", upstream.url())],
            }}},
        },
    });
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path().join("data"));
    let spec = JobSpec {
        activity_id: "bench".into(),
        agreement_id: "agr-bench".into(),
        provider_id: "provider-peer".into(),
        requestor_id: "requestor-peer".into(),
        manifest_base64: base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&manifest).unwrap()),
        mode: policies::Mode::All,
        whitelist: policies::WhitelistMatcher::new(&[]).unwrap(),
        expires_at: now + chrono::Duration::hours(1),
    };
    let config = JobConfig {
        backend: env.backend.clone(),
        kernel: env.kernel.clone(),
        guest_agent: env.agent.clone(),
        modules: env.modules.clone(),
        storage_bytes: 256 << 20,
        mem_mib: 512,
        cpus: 1,
        boot_timeout: Duration::from_secs(180),
        command_timeout: Duration::from_secs(600),
        max_output_bytes: 4096,
        max_transfer_bytes: 1 << 20,
        transfer_ca_files: Vec::new(),
        addresses: egress::AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        max_image_bytes: 64 << 20,
        image_disk_reserve: 0,
        image_cache_bytes: u64::MAX,
        plain_http_registries: Vec::new(),
        limits: egress::Limits::default(),
        runtime: Default::default(),
        warm: None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let audit = Arc::new(AuditLog::memory());
    let job = Job::start(spec, &config, &data, audit, rt.handle().clone()).expect("job start");
    let url = format!("{}/data/blob", upstream.url());
    let batch =
        json!([{"run": {"entry_point": "/bin/wget", "args": ["-q", "-O", "/dev/null", url]}}]);
    let commands = exescript::parse_batch(&batch.to_string()).unwrap();
    println!(
        "guest_egress: {} MiB through the egress proxy into the guest, {RUNS} runs",
        BYTES >> 20
    );
    let mut rates = Vec::new();
    for i in 0..RUNS {
        let mut ok = false;
        let mark = Instant::now();
        job.exec(&format!("b{i}"), &commands, &mut |r| {
            ok = r.outcome == net::wire::Outcome::Ok;
            if !ok {
                eprintln!("{r:?}");
            }
        })
        .unwrap();
        let secs = mark.elapsed().as_secs_f64();
        assert!(ok, "the download failed");
        let rate = BYTES as f64 / 1e6 / secs;
        println!("run {i}: {secs:.2} s, {rate:.1} MB/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.1} MB/s", rates[rates.len() / 2]);
    let receipt = job.terminate("bench done");
    println!(
        "egress bytes in the receipt: {}",
        receipt.usage.egress_bytes
    );
}
