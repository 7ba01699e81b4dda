//! Demand verdicts per second on one core: warm caches, cold chains, and the raw openssl
//! RSA-2048 verify rate measured in the same run (the ceiling a warm verdict can reach,
//! since a repeat demand still costs one signature check).
//!
//! Run: `cargo bench -p policies --bench verdicts` (`VERDICT_BENCH_SECS` sets the time per
//! figure, default 3 s).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use certs::testpki::{self, KeyKind, Validity};
use certs::{ChainVerifier, Keystore};
use chrono::Utc;
use openssl::hash::MessageDigest;
use openssl::sign::Verifier;
use policies::rules::CertRule;
use policies::{Demand, Judge, Mode, Rules, Whitelist};

fn rate(label: &str, budget: Duration, mut op: impl FnMut(u64)) -> f64 {
    // Warm up allocator and caches outside the measured window.
    for i in 0..200 {
        op(i);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..100 {
            op(n);
            n += 1;
        }
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "{label:<44} {per_sec:>12.0} /s   {:>8.2} µs each",
        1e6 / per_sec
    );
    per_sec
}

fn main() {
    let secs: u64 = std::env::var("VERDICT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let budget = Duration::from_secs(secs);
    let b64 = base64::engine::general_purpose::STANDARD;

    let root = testpki::root("Bench Root", KeyKind::Rsa2048, Validity::current());
    let inter = testpki::issue(
        &root,
        "Bench Inter",
        KeyKind::Rsa2048,
        true,
        Validity::current(),
    );
    let leaf = testpki::issue(
        &inter,
        "Bench Author",
        KeyKind::Rsa2048,
        false,
        Validity::current(),
    );

    let manifest = serde_json::json!({
        "version": "0.1.0", "createdAt": "2024-01-01T00:00:00Z", "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "bench", "version": "1.0.0"},
        "payload": [{"platform": {"arch": std::env::consts::ARCH, "os": "linux"},
                     "urls": ["https://images.example.com/app.tar.gz"],
                     "hash": format!("sha3:{}", "ab".repeat(32))}],
        "compManifest": {"version": "0.1.0",
            "script": {"commands": ["run .*curl.*", "run /bin/date -R", "transfer .*output.txt"], "match": "regex"},
            "net": {"inet": {"out": {"protocols": ["https"], "urls": ["https://api.example.com", "https://httpbin.org"]}}}}
    });
    let manifest_b64 = b64.encode(serde_json::to_vec_pretty(&manifest).unwrap());
    let sign = |key: &openssl::pkey::PKey<openssl::pkey::Private>| {
        b64.encode(testpki::sign(
            key,
            MessageDigest::sha256(),
            manifest_b64.as_bytes(),
        ))
    };
    let sig = sign(&leaf.key);
    let chain = testpki::pem(&[&leaf.cert, &inter.cert]);

    let mut rules = Rules::default();
    rules.outbound.everyone = Mode::None;
    rules.outbound.audited_payload.insert(
        certs::cert_id(&inter.cert),
        CertRule {
            mode: Mode::All,
            description: String::new(),
        },
    );
    let keystore = Arc::new(
        Keystore::from_files(vec![(
            PathBuf::from("root.pem"),
            root.cert.to_pem().unwrap(),
        )])
        .unwrap(),
    );
    let judge = Judge::new(
        rules,
        Whitelist::default().matcher().unwrap(),
        Arc::new(ChainVerifier::new(keystore)),
    );
    let now = Utc::now();
    let demand = Demand {
        manifest_base64: Some(&manifest_b64),
        signature_base64: Some(&sig),
        signature_algorithm: Some("sha256"),
        cert_chain_pem: Some(&chain),
        node_id: Some("12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo"),
        node_descriptor: None,
    };
    assert!(judge.judge(&demand, now).is_accept());

    // Distinct author certificates, each signing the manifest: every one is a cache miss.
    let cold_count = 400;
    eprintln!("generating {cold_count} author certificates for the cold-chain figure…");
    let cold: Vec<(Vec<u8>, String)> = (0..cold_count)
        .map(|i| {
            let l = testpki::issue(
                &inter,
                &format!("Author {i}"),
                KeyKind::Rsa2048,
                false,
                Validity::current(),
            );
            (testpki::pem(&[&l.cert, &inter.cert]), sign(&l.key))
        })
        .collect();

    println!("one core, RSA-2048 chains (leaf → intermediate → root), sha256, {secs} s per figure");
    let raw_sig = b64.decode(&sig).unwrap();
    let leaf_pub =
        openssl::pkey::PKey::public_key_from_der(&leaf.key.public_key_to_der().unwrap()).unwrap();
    let raw = rate("raw openssl RSA-2048 verify", budget, |_| {
        let mut v = Verifier::new(MessageDigest::sha256(), &leaf_pub).unwrap();
        assert!(v
            .verify_oneshot(black_box(&raw_sig), manifest_b64.as_bytes())
            .unwrap());
    });
    let warm = rate("demand verdicts, warm caches", budget, |_| {
        assert!(judge.judge(black_box(&demand), now).is_accept());
    });
    let mut fresh = 0usize;
    let cold_rate = rate(
        "demand verdicts, cold chain (new author cert)",
        budget,
        |_| {
            // Past the pre-made certificates, a new judge starts with empty caches again.
            let (c, s) = &cold[fresh % cold.len()];
            fresh += 1;
            let d = Demand {
                cert_chain_pem: Some(c),
                signature_base64: Some(s),
                ..demand
            };
            assert!(judge.judge(&d, now).is_accept());
            if fresh % cold.len() == 0 {
                judge.clear_caches();
            }
        },
    );
    println!(
        "warm / raw verify = {:.1}% (target ≥ 80%); cold / raw verify = {:.1}%",
        100.0 * warm / raw,
        100.0 * cold_rate / raw
    );
}
