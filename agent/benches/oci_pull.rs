//! `cargo bench -p provider --bench oci_pull`: an `oci://` pull of a 200 MiB image from a
//! distribution registry on loopback (basic auth), cold (an empty store: manifest, config,
//! layer streamed and verified, squashfs written) and cached (the store has the image under
//! the payload hash: no registry is asked at all), as a requestor's job does it. The boot
//! that follows is `vm_boot`'s figure. Needs `docker-registry` and squashfs-tools.

use std::time::{Duration, Instant};

use egress::AddressPolicy;
use provider::images::fetch::FetchLimits;
use provider::images::oci::auth::{AuthFile, Credential};
use provider::images::ImageStore;
use provider::store::DataDir;
use provider::testsupport::registry::{
    layer, push_image, sha3_256, skip, start_registry, Pusher, PASSWORD, USER,
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
        {
            let lock = data.lock().unwrap();
            let mut f = AuthFile::default();
            f.registries.insert(
                format!("127.0.0.1:{}", reg.port),
                Credential {
                    username: USER.into(),
                    secret: PASSWORD.into(),
                    for_requestors: true,
                    token_realms: Vec::new(),
                },
            );
            f.save(&data, &lock).unwrap();
        }
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
}
