//! `oci://` pulls against a real registry on loopback: Debian's `docker-registry` (the
//! distribution registry 2.8), started here with basic auth (htpasswd, bcrypt), images
//! pushed by the test over the distribution API: a multi-platform index, layers with
//! whiteouts, a layer with a hostile path, and NFD compatibility artifacts that fail and
//! pass (attached by the referrers tag schema, which 2.8 registries use for lack of the
//! referrers API). Skips with a printed reason when `docker-registry` or `mksquashfs` is
//! missing (`scripts/install-deps.sh` installs both).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use egress::AddressPolicy;
use provider::images::fetch::FetchLimits;
use provider::images::oci::auth::{AuthFile, Credential};
use provider::images::{code, ImageStore};
use provider::store::DataDir;
use serde_json::{json, Value};

const USER: &str = "puller";
const PASSWORD: &str = "correct horse";

struct RegistryProc {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(bin: &str) -> bool {
    Path::new(bin).exists()
}

fn skip() -> bool {
    for bin in [
        "/usr/bin/docker-registry",
        "/usr/bin/mksquashfs",
        "/usr/bin/unsquashfs",
    ] {
        if !have(bin) {
            eprintln!("skipping: {bin} is missing (scripts/install-deps.sh installs it)");
            return true;
        }
    }
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A bcrypt htpasswd line (the registry accepts only bcrypt), by the system's crypt(3).
fn htpasswd(user: &str, password: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{user}:{}", String::from_utf8(out.stdout).unwrap().trim())
}

fn start_registry() -> RegistryProc {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pw = dir.path().join("htpasswd");
    std::fs::write(&pw, htpasswd(USER, PASSWORD) + "\n").unwrap();
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
            dir.path().join("data").display(),
            pw.display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    RegistryProc {
        child,
        port,
        _dir: dir,
    }
}

fn sha256(b: &[u8]) -> String {
    let d = openssl::hash::hash(openssl::hash::MessageDigest::sha256(), b).unwrap();
    format!(
        "sha256:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

fn sha3_256(b: &[u8]) -> String {
    let d = openssl::hash::hash(openssl::hash::MessageDigest::sha3_256(), b).unwrap();
    format!(
        "sha3:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The test's own client: pushes blobs and manifests with basic auth.
struct Pusher {
    base: String,
    client: reqwest::blocking::Client,
    auth: String,
}

impl Pusher {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::blocking::Client::builder()
                .no_proxy()
                .build()
                .unwrap(),
            auth: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
            ),
        }
    }

    fn blob(&self, repo: &str, bytes: &[u8]) -> Value {
        let digest = sha256(bytes);
        let r = self
            .client
            .post(format!("{}/v2/{repo}/blobs/uploads/", self.base))
            .header("Authorization", &self.auth)
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text());
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = self
            .client
            .put(format!("{url}{sep}digest={digest}"))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "{:?}", r.text());
        json!({"digest": digest, "size": bytes.len()})
    }

    fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Value) -> String {
        let bytes = serde_json::to_vec(body).unwrap();
        let r = self
            .client
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", media_type)
            .body(bytes.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "{reference}: {:?}", r.text());
        sha256(&bytes)
    }
}

/// A tar layer of `(path, contents)`; a path ending in `/` is a directory. Paths are
/// written raw into the header, so a hostile one (`../x`) goes in as is.
fn layer(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
        }
        h.set_mtime(1);
        h.set_cksum();
        b.append(&h, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes an image of `layers` ((media type, bytes)) for `arch`; its manifest's
/// descriptor.
fn push_image(p: &Pusher, repo: &str, arch: &str, layers: &[(&str, Vec<u8>)]) -> Value {
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["GREETING=hello from oci"], "WorkingDir": "/work", "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut cd = p.blob(repo, &config_bytes);
    cd["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    let layer_ds: Vec<Value> = layers
        .iter()
        .map(|(t, b)| {
            let mut d = p.blob(repo, b);
            d["mediaType"] = json!(t);
            d
        })
        .collect();
    let m =
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cd, "layers": layer_ds});
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = p.manifest(repo, &sha256(&bytes), OCI_MANIFEST, &m);
    json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(),
           "platform": {"os": "linux", "architecture": arch}})
}

/// Attaches an NFD compatibility artifact holding `yaml` to `subject` (the referrers tag
/// schema: an index at tag `sha256-HEX` listing the artifact).
fn attach_compat(p: &Pusher, repo: &str, subject: &Value, yaml: &str) {
    let empty = p.blob(repo, b"{}");
    let mut spec = p.blob(repo, yaml.as_bytes());
    spec["mediaType"] = json!("application/vnd.nfd.image-compatibility.spec.v1alpha1+yaml");
    let mut cfg = empty.clone();
    cfg["mediaType"] = json!("application/vnd.oci.empty.v1+json");
    let art = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.nfd.image-compatibility.v1alpha1",
        "config": cfg,
        "layers": [spec],
        "subject": {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]},
    });
    let bytes = serde_json::to_vec(&art).unwrap();
    let digest = p.manifest(repo, &sha256(&bytes), OCI_MANIFEST, &art);
    let tag = subject["digest"].as_str().unwrap().replace(':', "-");
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(),
        "artifactType": "application/vnd.nfd.image-compatibility.v1alpha1"}]});
    p.manifest(repo, &tag, OCI_INDEX, &index);
}

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
