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

/// A bcrypt htpasswd line (the registry accepts only bcrypt), by the system's crypt(3), at
/// bcrypt's lowest cost (4): the registry checks it on every request, and at the default
/// cost (12) that made a test of a few dozen requests spend half a minute of CPU in it.
pub fn htpasswd(user: &str, password: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))",
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
    let pw = dir.path().join("htpasswd");
    std::fs::write(&pw, htpasswd(USER, PASSWORD) + "\n").unwrap();
    let auth = format!(
        "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
        pw.display()
    );
    start_registry_in(dir, &auth)
}

/// The registry with its storage in `dir` and `auth` (a YAML `auth:` section) as its
/// config's last part. Its log is `dir/registry.log` ([`RegistryProc::log`]).
fn start_registry_in(dir: tempfile::TempDir, auth: &str) -> RegistryProc {
    let port = free_port();
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
    let child = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
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

impl RegistryProc {
    /// What the registry logged (warnings and errors), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
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

/// The distribution registry with `auth: token`: challenges name `realm`, and tokens must
/// be signed by a certificate in `root_pem` and carry `issuer` and `service`.
pub fn start_token_registry(realm: &str, signer: &Signer) -> RegistryProc {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("token-root.pem");
    std::fs::write(&bundle, signer.cert_pem()).unwrap();
    let auth = format!(
        "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
        signer.service,
        signer.issuer,
        bundle.display()
    );
    start_registry_in(dir, &auth)
}

/// Signs registry tokens as a token service does: a JWT, ES256 with a P-256 key, its
/// self-signed certificate in the `x5c` header (distribution 2.8 verifies the chain against
/// its `rootcertbundle`, then `iss`, `aud`, `exp`/`nbf` and the `access` claim).
pub struct Signer {
    key: openssl::pkey::PKey<openssl::pkey::Private>,
    cert: openssl::x509::X509,
    pub issuer: String,
    pub service: String,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Signer {
    pub fn new(issuer: &str, service: &str) -> Self {
        use openssl::asn1::Asn1Time;
        use openssl::bn::{BigNum, MsbOption};
        use openssl::ec::{EcGroup, EcKey};
        use openssl::nid::Nid;
        use openssl::x509::extension::{BasicConstraints, KeyUsage};
        use openssl::x509::{X509Builder, X509NameBuilder};

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = openssl::pkey::PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", issuer).unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let mut serial = BigNum::new().unwrap();
        serial.rand(63, MsbOption::MAYBE_ZERO, false).unwrap();
        b.set_serial_number(&serial.to_asn1_integer().unwrap())
            .unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        // An hour back, so a registry whose clock is a little behind still accepts it.
        b.set_not_before(&Asn1Time::from_unix(unix_now() - 3600).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
            .unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_cert_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        Self {
            key,
            cert: b.build(),
            issuer: issuer.into(),
            service: service.into(),
        }
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().unwrap()
    }

    /// A token for `subject` granting `access` (`(repository, actions)`).
    pub fn token(&self, subject: &str, access: &[(String, Vec<String>)]) -> String {
        let header = json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(self.cert.to_der().unwrap())],
        });
        let now = unix_now();
        let mut jti = [0u8; 16];
        openssl::rand::rand_bytes(&mut jti).unwrap();
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "access": access.iter().map(|(name, actions)| json!({
                "type": "repository", "name": name, "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            b64url(&serde_json::to_vec(&header).unwrap()),
            b64url(&serde_json::to_vec(&claims).unwrap())
        );
        let digest = openssl::hash::hash(
            openssl::hash::MessageDigest::sha256(),
            signing_input.as_bytes(),
        )
        .unwrap();
        let ec = self.key.ec_key().unwrap();
        let sig = openssl::ecdsa::EcdsaSig::sign(&digest, &ec).unwrap();
        // JWS wants r and s as two 32-byte big-endian numbers, not DER.
        let mut raw = sig.r().to_vec_padded(32).unwrap();
        raw.extend(sig.s().to_vec_padded(32).unwrap());
        format!("{signing_input}.{}", b64url(&raw))
    }
}

/// One request a [`TokenServer`] received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Path and query, as sent.
    pub target: String,
    pub authorization: Option<String>,
}

/// A token service on loopback, as the registry's `realm`: checks basic credentials, and
/// grants of each requested `scope` only the actions the user holds on that repository (a
/// token for what it may not have holds no access entry for it, as Docker's does).
pub struct TokenServer {
    pub ip: std::net::IpAddr,
    pub port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<TokenRequest>>>,
}

/// A user of a [`TokenServer`]: name, password, and `(repository, actions)` held.
pub type TokenUser = (String, String, Vec<(String, Vec<String>)>);

impl TokenServer {
    pub fn start(
        ip: std::net::IpAddr,
        signer: std::sync::Arc<Signer>,
        users: Vec<TokenUser>,
    ) -> Self {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        let users = std::sync::Arc::new(users);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(c) = conn else { continue };
                let (signer, users, log) = (signer.clone(), users.clone(), log.clone());
                std::thread::spawn(move || serve_token(c, &signer, &users, &log));
            }
        });
        Self { ip, port, requests }
    }

    /// `http://IP:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}:{}/token", self.ip, self.port)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn serve_token(
    mut c: std::net::TcpStream,
    signer: &Signer,
    users: &[TokenUser],
    log: &std::sync::Mutex<Vec<TokenRequest>>,
) {
    use std::io::Read as _;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req).into_owned();
    let mut lines = head.lines();
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_owned();
    let authorization = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| v.trim().to_owned())
    });
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(TokenRequest {
            target: target.clone(),
            authorization: authorization.clone(),
        });
    let reply = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let url = url::Url::parse(&format!("http://token{target}")).unwrap();
    let user = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|up| {
            let (u, p) = up.split_once(':')?;
            users.iter().find(|(n, pw, _)| n == u && pw == p)
        });
    let answer = if url.path() != "/token" {
        reply("404 Not Found", "", "{}")
    } else if let Some((name, _, holds)) = user {
        let service = url
            .query_pairs()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.into_owned());
        if service.as_deref() != Some(signer.service.as_str()) {
            reply("400 Bad Request", "", r#"{"details":"unknown service"}"#)
        } else {
            let mut access = Vec::new();
            for (_, scopes) in url.query_pairs().filter(|(k, _)| k == "scope") {
                for scope in scopes.split(' ') {
                    let mut parts = scope.splitn(3, ':');
                    let (Some("repository"), Some(repo), Some(actions)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let Some((_, held)) = holds.iter().find(|(r, _)| r == repo) else {
                        continue;
                    };
                    let granted: Vec<String> = actions
                        .split(',')
                        .filter(|a| held.iter().any(|h| h == a))
                        .map(str::to_owned)
                        .collect();
                    if !granted.is_empty() {
                        access.push((repo.to_owned(), granted));
                    }
                }
            }
            let token = signer.token(name, &access);
            reply(
                "200 OK",
                "",
                &json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
            )
        }
    } else {
        reply(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"token\"\r\n",
            r#"{"details":"incorrect username or password"}"#,
        )
    };
    let _ = c.write_all(answer.as_bytes());
    let _ = c.flush();
}
