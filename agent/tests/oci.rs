//! `oci://` pulls against a real registry on loopback: Debian's `docker-registry` (the
//! distribution registry 2.8), started here with basic auth (htpasswd, bcrypt), images
//! pushed by the test over the distribution API: a multi-platform index, layers with
//! whiteouts, a layer with a hostile path, and NFD compatibility artifacts that fail and
//! pass (attached by the referrers tag schema, which 2.8 registries use for lack of the
//! referrers API). Skips with a printed reason when `docker-registry` or `mksquashfs` is
//! missing (`scripts/install-deps.sh` installs both).

use std::path::Path;
use std::process::Command;

use egress::AddressPolicy;
use provider::images::fetch::FetchLimits;
use provider::images::oci::auth::{AuthFile, Credential};
use provider::images::{code, ImageStore};
use provider::store::DataDir;
use provider::testsupport::registry::{
    attach_compat, gzip, layer, push_image, sha3_256, skip, start_registry, Pusher, OCI_INDEX,
    OCI_MANIFEST, PASSWORD, USER,
};
use serde_json::{json, Value};

fn limits() -> FetchLimits {
    FetchLimits {
        addresses: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..FetchLimits::default()
    }
}

fn login(data: &DataDir, port: u16, for_requestors: bool) {
    let lock = data.lock().unwrap();
    let mut f = AuthFile::load(data).unwrap();
    f.registries.insert(
        format!("127.0.0.1:{port}"),
        Credential {
            username: USER.into(),
            secret: PASSWORD.into(),
            for_requestors,
        },
    );
    f.save(data, &lock).unwrap();
}

fn list_squashfs(path: &Path) -> Vec<String> {
    let out = Command::new("/usr/bin/unsquashfs")
        .args(["-lc", "-d", ""])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches('/').to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

fn requestor_store(data: &DataDir) -> ImageStore {
    let mut s = ImageStore::for_requestor(data, limits());
    s.progress = false;
    s
}

#[test]
fn oci_pulls_from_a_real_registry() {
    if skip() {
        return;
    }
    let reg = start_registry();
    let p = Pusher::new(reg.port);
    let repo = "team/app";

    // Two layers: the second deletes a file (whiteout) and empties a dir (opaque).
    let l1 = gzip(&layer(&[
        ("a/", ""),
        ("a/gone", "x"),
        ("a/kept", "y"),
        ("b/", ""),
        ("b/old", "z"),
    ]));
    let l2 = layer(&[("a/.wh.gone", ""), ("b/.wh..wh..opq", ""), ("b/new", "n")]);
    let amd = push_image(
        &p,
        repo,
        "amd64",
        &[
            ("application/vnd.oci.image.layer.v1.tar+gzip", l1.clone()),
            ("application/vnd.oci.image.layer.v1.tar", l2.clone()),
        ],
    );
    let arm = push_image(
        &p,
        repo,
        "arm64",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", l1.clone())],
    );
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm, amd]});
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = p.manifest(repo, "v1", OCI_INDEX, &index);
    let base = format!("oci://127.0.0.1:{}/{repo}", reg.port);
    let pinned = format!("{base}:v1@{index_digest}");

    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());

    // No login: the registry's basic-auth challenge is answered with nothing.
    let e = requestor_store(&data)
        .fetch(&pinned, Some(&sha3_256(&index_bytes).parse_hash()))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    assert!(e.to_string().contains("provider registry login"), "{e}");

    // A login the operator did not open to requestors is not used for them.
    login(&data, reg.port, false);
    let e = requestor_store(&data)
        .fetch(&pinned, Some(&sha3_256(&index_bytes).parse_hash()))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");

    login(&data, reg.port, true);
    // A tag alone is refused for requestors; the hash must cover the index's bytes.
    let e = requestor_store(&data)
        .fetch(&format!("{base}:v1"), None)
        .unwrap_err();
    assert_eq!(code(&e), "payload-url-refused", "{e}");
    let wrong = sha3_256(b"not the index");
    let e = requestor_store(&data)
        .fetch(&pinned, Some(&wrong.parse_hash()))
        .unwrap_err();
    assert_eq!(code(&e), "payload-hash-mismatch", "{e}");
    // Loopback is the provider's own network: closed unless the operator opens it.
    let mut closed = ImageStore::for_requestor(&data, FetchLimits::default());
    closed.progress = false;
    let e = closed
        .fetch(&pinned, Some(&sha3_256(&index_bytes).parse_hash()))
        .unwrap_err();
    assert_eq!(code(&e), "payload-url-refused", "{e}");

    let hash = sha3_256(&index_bytes).parse_hash();
    let img = requestor_store(&data).fetch(&pinned, Some(&hash)).unwrap();
    assert!(img.fetched);
    assert_eq!(
        list_squashfs(&img.path),
        ["a/kept", "b/new"],
        "the amd64 entry's files, whiteouts applied (`a/gone` deleted, `b` emptied)"
    );
    let disk = requestor_store(&data).disk_image(&img, 1 << 30).unwrap();
    assert_eq!(
        disk.config.env,
        [("GREETING".to_owned(), "hello from oci".to_owned())]
    );
    assert_eq!(disk.config.working_dir.as_deref(), Some("/work"));
    // Stored by the hash: a second job needs no registry at all.
    drop(reg);
    let again = requestor_store(&data).fetch(&pinned, Some(&hash)).unwrap();
    assert!(!again.fetched);
    assert_eq!(again.path, img.path);
}

#[test]
fn oci_platforms_hostile_layers_and_compatibility_artifacts() {
    if skip() {
        return;
    }
    let reg = start_registry();
    let p = Pusher::new(reg.port);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    login(&data, reg.port, true);
    let base = format!("oci://127.0.0.1:{}", reg.port);
    let pull = |repo: &str, m: &Value| {
        let digest = m["digest"].as_str().unwrap();
        let bytes = {
            // The hash covers the manifest's bytes as the registry serves them.
            let r = reqwest::blocking::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .get(format!(
                    "http://127.0.0.1:{}/v2/{repo}/manifests/{digest}",
                    reg.port
                ))
                .header("Authorization", &p.auth)
                .header("Accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
                .send()
                .unwrap();
            r.bytes().unwrap().to_vec()
        };
        requestor_store(&data).fetch(
            &format!("{base}/{repo}@{digest}"),
            Some(&sha3_256(&bytes).parse_hash()),
        )
    };

    // An index without this host's platform names what it offers.
    let arm = push_image(
        &p,
        "multi",
        "arm64",
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            layer(&[("f", "1")]),
        )],
    );
    let s390 = push_image(
        &p,
        "multi",
        "s390x",
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            layer(&[("f", "1")]),
        )],
    );
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm, s390]});
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = p.manifest("multi", "v1", OCI_INDEX, &index);
    let e = pull("multi", &json!({"digest": digest, "size": bytes.len()})).unwrap_err();
    assert_eq!(code(&e), "platform-unsupported", "{e}");
    assert!(e.to_string().contains("linux/arm64, linux/s390x"), "{e}");

    // A layer with `..` is refused naming the entry; nothing is stored.
    let evil = push_image(
        &p,
        "evil",
        "amd64",
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            layer(&[("../escape", "x")]),
        )],
    );
    let e = pull("evil", &evil).unwrap_err();
    assert_eq!(code(&e), "payload-image-invalid", "{e}");
    assert!(e.to_string().contains("../escape"), "{e}");

    // Compatibility: a rule this host fails refuses before any layer is fetched (the
    // layer's blob is never pushed, so a download would fail differently).
    let needs = push_image(
        &p,
        "compat",
        "amd64",
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            layer(&[("ok", "1")]),
        )],
    );
    attach_compat(
        &p,
        "compat",
        &needs,
        "version: v1alpha1\ncompatibilities:\n- description: needs a cpu flag no cpu has\n  rules:\n  - name: imaginary flag\n    matchFeatures:\n    - feature: cpu.cpuid\n      matchExpressions:\n        NOSUCHFLAG: {op: Exists}\n",
    );
    let e = pull("compat", &needs).unwrap_err();
    assert_eq!(code(&e), "platform-incompatible", "{e}");
    assert!(e.to_string().contains("imaginary flag"), "{e}");

    let fits = push_image(
        &p,
        "compat2",
        "amd64",
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&layer(&[("ok", "1")])),
        )],
    );
    attach_compat(
        &p,
        "compat2",
        &fits,
        "version: v1alpha1\ncompatibilities:\n- description: linux 3 or newer\n  rules:\n  - name: kernel\n    matchFeatures:\n    - feature: kernel.version\n      matchExpressions:\n        major: {op: Gt, value: [\"2\"]}\n",
    );
    let img = pull("compat2", &fits).unwrap();
    assert_eq!(list_squashfs(&img.path), ["ok"]);

    // An artifact with a field the format does not have is not half-read.
    let odd = push_image(
        &p,
        "compat3",
        "amd64",
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            layer(&[("ok", "1")]),
        )],
    );
    attach_compat(
        &p,
        "compat3",
        &odd,
        "version: v1alpha1\ncompatibilities:\n- rules: []\n  labels: {x: y}\n",
    );
    let e = pull("compat3", &odd).unwrap_err();
    assert_eq!(code(&e), "platform-incompatible", "{e}");
    assert!(e.to_string().contains("unknown field"), "{e}");
}

trait ParseHash {
    fn parse_hash(&self) -> policies::manifest::PayloadHash;
}

impl ParseHash for String {
    fn parse_hash(&self) -> policies::manifest::PayloadHash {
        policies::manifest::PayloadHash::parse(self).unwrap()
    }
}
