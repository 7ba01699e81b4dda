//! A distribution registry (Debian's `docker-registry`) on loopback with basic auth, and a
//! small client that pushes blobs, images and NFD compatibility artifacts to it, for the
//! `oci://` tests and the pull bench.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

pub const USER: &str = "puller";
pub const PASSWORD: &str = "correct horse";

pub struct RegistryProc {
    child: Child,
    pub port: u16,
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

pub fn skip() -> bool {
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A bcrypt htpasswd line (the registry accepts only bcrypt), by the system's crypt(3).
pub fn htpasswd(user: &str, password: &str) -> String {
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

pub fn start_registry() -> RegistryProc {
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

pub fn sha256(b: &[u8]) -> String {
    let d = openssl::hash::hash(openssl::hash::MessageDigest::sha256(), b).unwrap();
    format!(
        "sha256:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

pub fn sha3_256(b: &[u8]) -> String {
    let d = openssl::hash::hash(openssl::hash::MessageDigest::sha3_256(), b).unwrap();
    format!(
        "sha3:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The test's own client: pushes blobs and manifests with basic auth.
pub struct Pusher {
    base: String,
    client: reqwest::blocking::Client,
    pub auth: String,
}

impl Pusher {
    pub fn new(port: u16) -> Self {
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

    pub fn blob(&self, repo: &str, bytes: &[u8]) -> Value {
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

    pub fn manifest(&self, repo: &str, reference: &str, media_type: &str, body: &Value) -> String {
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
pub fn layer(entries: &[(&str, &str)]) -> Vec<u8> {
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

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes an image of `layers` ((media type, bytes)) for `arch`; its manifest's
/// descriptor.
pub fn push_image(p: &Pusher, repo: &str, arch: &str, layers: &[(&str, Vec<u8>)]) -> Value {
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
pub fn attach_compat(p: &Pusher, repo: &str, subject: &Value, yaml: &str) {
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
