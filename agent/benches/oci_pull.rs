//! `cargo bench -p provider --bench oci_pull`: an `oci://` pull of a 200 MiB image from a
//! distribution registry on loopback (basic auth), cold (an empty store: manifest, config,
//! layer streamed and verified, squashfs written) and cached (the store has the image under
//! the payload hash: no registry is asked at all), as a requestor's job does it.
//!
//! Then pull → first command output through the real VM path: `provider vm run --image
//! oci://…@sha256:… --hash sha3:… -- /bin/echo` (the binary, as an operator runs it), on an
//! image of busybox plus a 200 MiB layer, cold (an empty data dir) and cached (the same
//! data dir again), timed from the process's start to the first byte on its stdout. That
//! part needs what the VM tests need (QEMU, the kernel from scripts/fetch-guest-kernel.sh,
//! busybox) and is skipped with the reason when they are missing.
//!
//! Needs `docker-registry` and squashfs-tools.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress::AddressPolicy;
use provider::images::fetch::FetchLimits;
use provider::images::oci::auth::{AuthFile, Credential};
use provider::images::ImageStore;
use provider::store::DataDir;
use provider::testsupport::registry::{
    gzip, layer, push_image, sha3_256, skip, start_registry, Pusher, PASSWORD, USER,
};

const ROUNDS: usize = 3;
const IMAGE_BYTES: usize = 200 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if skip() {
        return;
    }
    let reg = start_registry();
    let p = Pusher::new(reg.port);
    // Incompressible content, so the squashfs is as large as the layer.
    let mut data = vec![0u8; IMAGE_BYTES];
    openssl::rand::rand_bytes(&mut data).unwrap();
    // The layer helper takes text: half the bytes, hex-encoded, make 200 MiB.
    let text: String = data[..IMAGE_BYTES / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tar = layer(&[("data/", ""), ("data/blob", &text)]);
    let m = push_image(
        &p,
        "bench/big",
        "amd64",
        &[("application/vnd.oci.image.layer.v1.tar", tar)],
    );
    let digest = m["digest"].as_str().unwrap().to_owned();
    let url = format!("oci://127.0.0.1:{}/bench/big@{digest}", reg.port);
    let manifest = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "http://127.0.0.1:{}/v2/bench/big/manifests/{digest}",
            reg.port
        ))
        .header("Authorization", &p.auth)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let hash = policies::manifest::PayloadHash::parse(&sha3_256(&manifest)).unwrap();
    let limits = FetchLimits {
        addresses: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..FetchLimits::default()
    };
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        login(&data, reg.port);
        let mut store = ImageStore::for_requestor(&data, limits.clone());
        store.progress = false;
        let t = Instant::now();
        let img = store.fetch(&url, Some(&hash)).unwrap();
        cold.push(t.elapsed());
        assert!(img.fetched);
        let t = Instant::now();
        let again = store.fetch(&url, Some(&hash)).unwrap();
        cached.push(t.elapsed());
        assert!(!again.fetched);
    }
    let mib = IMAGE_BYTES as f64 / (1 << 20) as f64;
    let c = median(cold.clone());
    println!(
        "oci pull, {mib:.0} MiB layer over loopback, median of {ROUNDS}: cold {:.0} ms ({:.0} MiB/s incl. squashfs), cached {:.2} ms",
        c.as_secs_f64() * 1e3,
        mib / c.as_secs_f64(),
        median(cached).as_secs_f64() * 1e3
    );
    println!("cold rounds: {cold:?}");

    first_output(&reg, &p, &data);
}

fn login(data: &DataDir, port: u16) {
    let lock = data.lock().unwrap();
    let mut f = AuthFile::default();
    f.registries.insert(
        format!("127.0.0.1:{port}"),
        Credential {
            username: USER.into(),
            secret: PASSWORD.into(),
            for_requestors: true,
            token_realms: Vec::new(),
        },
    );
    f.save(data, &lock).unwrap();
}

/// One `provider vm run`: the time from spawning it to the first byte of the command's
/// output, and the `image` phase its `--timings` reports (the pull, or the store lookup).
fn vm_run(data: &Path, agent: &Path, url: &str, hash: &str) -> (Duration, String) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_provider"))
        .env("PROVIDER_DATA_DIR", data)
        .env("PROVIDER_GUEST", agent)
        .args([
            "vm",
            "run",
            "--image",
            url,
            "--hash",
            hash,
            "--timings",
            "--",
        ])
        .args(["/bin/echo", "ready"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let n = stdout.read(&mut first).unwrap();
    let elapsed = t.elapsed();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && n == 1 && first[0] == b'r',
        "vm run failed: {err}"
    );
    let image = err
        .split("timings: image ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .unwrap_or("?")
        .to_owned();
    (elapsed, image)
}

/// Pull → first command output for busybox plus a 200 MiB layer, cold and cached.
fn first_output(reg: &provider::testsupport::registry::RegistryProc, p: &Pusher, random: &[u8]) {
    let Some(env) = provider::testsupport::vm_env() else {
        println!("pull → first command output: skipped (see SKIP above)");
        return;
    };
    let busybox = std::fs::read(&env.image).unwrap();
    let mut big = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(random.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1);
    big.append_data(&mut h, "data/blob", random).unwrap();
    let big = big.into_inner().unwrap();
    let m = push_image(
        p,
        "bench/vm",
        "amd64",
        &[
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                gzip(&busybox),
            ),
            ("application/vnd.oci.image.layer.v1.tar", big),
        ],
    );
    let digest = m["digest"].as_str().unwrap().to_owned();
    let manifest = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "http://127.0.0.1:{}/v2/bench/vm/manifests/{digest}",
            reg.port
        ))
        .header("Authorization", &p.auth)
        .header("Accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let hash = sha3_256(&manifest);
    let url = format!("oci://127.0.0.1:{}/bench/vm@{digest}", reg.port);
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        login(&DataDir::new(dir.path()), reg.port);
        let (c, ci) = vm_run(dir.path(), &env.agent, &url, &hash);
        let (w, wi) = vm_run(dir.path(), &env.agent, &url, &hash);
        println!("round {round}: cold {c:?} (image phase {ci}), cached {w:?} (image phase {wi})");
        cold.push(c);
        cached.push(w);
    }
    let mib = (random.len() + busybox.len()) as f64 / (1 << 20) as f64;
    let backend = match &env.backend {
        vm::Backend::Qemu(q) => format!("QEMU {:?}", q.accel),
        vm::Backend::Kvm => "the project's VMM".to_owned(),
    };
    println!(
        "pull → first command output (`vm run`, busybox + {mib:.0} MiB, {backend}), median of {ROUNDS}: cold {:.2} s, cached {:.2} s",
        median(cold).as_secs_f64(),
        median(cached).as_secs_f64()
    );
}
