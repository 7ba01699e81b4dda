//! `oci://` pulls against a real registry on loopback: Debian's `docker-registry` (the
//! distribution registry 2.8), started here with basic auth (htpasswd, bcrypt) or token
//! auth (a token service of the test's own issuing ES256 JWTs the registry verifies), images
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
    attach_compat, gzip, layer, push_image, sha3_256, skip, start_registry, start_token_registry,
    Pusher, Signer, TokenServer, TokenUser, OCI_INDEX, OCI_MANIFEST, PASSWORD, USER,
};
use serde_json::{json, Value};

fn limits() -> FetchLimits {
    FetchLimits {
        addresses: AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
        ..FetchLimits::default()
    }
}

fn login(data: &DataDir, port: u16, for_requestors: bool) {
    login_as(data, port, PASSWORD, for_requestors, &[]);
}

fn login_as(data: &DataDir, port: u16, secret: &str, for_requestors: bool, realms: &[String]) {
    let lock = data.lock().unwrap();
    let mut f = AuthFile::load(data).unwrap();
    f.registries.insert(
        format!("127.0.0.1:{port}"),
        Credential {
            username: USER.into(),
            secret: secret.into(),
            for_requestors,
            token_realms: realms.to_vec(),
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

/// The manifest `m` (a descriptor) as the registry serves it, fetched with `auth`, and
/// the `oci://` reference pinning it.
fn pinned(
    port: u16,
    auth: &str,
    repo: &str,
    m: &Value,
) -> (String, policies::manifest::PayloadHash) {
    let digest = m["digest"].as_str().unwrap();
    let bytes = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "http://127.0.0.1:{port}/v2/{repo}/manifests/{digest}"
        ))
        .header("Authorization", auth)
        .header("Accept", format!("{OCI_MANIFEST}, {OCI_INDEX}"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    (
        format!("oci://127.0.0.1:{port}/{repo}@{digest}"),
        sha3_256(&bytes).parse_hash(),
    )
}

fn token_user(repos: &[&str]) -> TokenUser {
    (
        USER.into(),
        PASSWORD.into(),
        repos
            .iter()
            .map(|r| (r.to_string(), vec!["pull".to_owned()]))
            .collect(),
    )
}

/// A token-auth registry whose pusher holds a token for `repos`, and one image in each.
fn token_setup(
    realm: &str,
    signer: &Signer,
    repos: &[&str],
) -> (
    provider::testsupport::registry::RegistryProc,
    String,
    Vec<Value>,
) {
    let reg = start_token_registry(realm, signer);
    let mut p = Pusher::new(reg.port);
    let rw: Vec<(String, Vec<String>)> = repos
        .iter()
        .map(|r| (r.to_string(), vec!["pull".into(), "push".into()]))
        .collect();
    p.auth = format!("Bearer {}", signer.token("pusher", &rw));
    // Each repository's image differs, so no pull is answered from the store by hash.
    let images = repos
        .iter()
        .map(|r| {
            push_image(
                &p,
                r,
                "amd64",
                &[(
                    "application/vnd.oci.image.layer.v1.tar",
                    layer(&[("hello", &format!("from {r}"))]),
                )],
            )
        })
        .collect();
    (reg, p.auth, images)
}

#[test]
fn oci_pulls_through_a_token_service() {
    if skip() {
        return;
    }
    let signer = std::sync::Arc::new(Signer::new("test-token-issuer", "test-registry"));
    let tokens = TokenServer::start(
        "127.0.0.1".parse().unwrap(),
        signer.clone(),
        vec![token_user(&["team/app"])],
    );
    let (reg, auth, images) = token_setup(&tokens.realm(), &signer, &["team/app", "team/secret"]);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    let (app, app_hash) = pinned(reg.port, &auth, "team/app", &images[0]);

    // The right login: the registry's Bearer challenge sends us to the token service (on
    // another port, so another origin the operator names), which checks the login and
    // grants the pull the challenge's scope names.
    let realm = vec![format!("127.0.0.1:{}", tokens.port)];
    login_as(&data, reg.port, PASSWORD, true, &realm);
    let img = requestor_store(&data)
        .fetch(&app, Some(&app_hash))
        .unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", reg.log()));
    assert!(img.fetched);
    assert_eq!(list_squashfs(&img.path), ["hello"]);
    let asked = tokens.requests();
    assert!(
        asked
            .iter()
            .all(|r| r.target.contains("service=test-registry")
                && r.target.contains("scope=repository%3Ateam%2Fapp%3Apull")
                && r.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Basic "))),
        "{asked:?}"
    );

    // A wrong password: the token service refuses it, and we say so.
    let data2 = DataDir::new(dir.path().join("second"));
    login_as(&data2, reg.port, "wrong password", true, &realm);
    let e = requestor_store(&data2)
        .fetch(&app, Some(&app_hash))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "token service http://127.0.0.1:{} refused the login (HTTP 401",
            tokens.port
        )),
        "{msg}"
    );

    // A repository the login may not pull: the token holds no access to it, the registry
    // answers insufficient_scope, and the message names the scope.
    let (secret, secret_hash) = pinned(reg.port, &auth, "team/secret", &images[1]);
    let e = requestor_store(&data)
        .fetch(&secret, Some(&secret_hash))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("does not grant `repository:team/secret:pull`")
            && msg.contains("insufficient_scope")
            && msg.contains(&format!("the login `{USER}` may not pull team/secret")),
        "{msg}"
    );

    // A token service whose key the registry does not trust (its certificate is not in the
    // registry's rootcertbundle): the registry answers invalid_token, and we say so.
    let rogue = std::sync::Arc::new(Signer::new("test-token-issuer", "test-registry"));
    let rogue_tokens = TokenServer::start(
        "127.0.0.1".parse().unwrap(),
        rogue,
        vec![token_user(&["team/app"])],
    );
    let (reg3, auth3, images3) = token_setup(&rogue_tokens.realm(), &signer, &["team/app"]);
    let (app3, hash3) = pinned(reg3.port, &auth3, "team/app", &images3[0]);
    let data3 = DataDir::new(dir.path().join("third"));
    let realm3 = vec![format!("127.0.0.1:{}", rogue_tokens.port)];
    login_as(&data3, reg3.port, PASSWORD, true, &realm3);
    let e = requestor_store(&data3)
        .fetch(&app3, Some(&hash3))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    assert!(e.to_string().contains("invalid_token"), "{e}");
    assert_eq!(rogue_tokens.requests().len(), 1, "one token was asked for");
}

#[test]
fn registry_logins_never_cross_to_another_origin() {
    if skip() {
        return;
    }
    // The token service on another host (127.0.0.2) than the registry (127.0.0.1).
    let signer = std::sync::Arc::new(Signer::new("test-token-issuer", "test-registry"));
    let tokens = TokenServer::start(
        "127.0.0.2".parse().unwrap(),
        signer.clone(),
        vec![token_user(&["team/app"])],
    );
    let (reg, auth, images) = token_setup(&tokens.realm(), &signer, &["team/app"]);
    let (app, hash) = pinned(reg.port, &auth, "team/app", &images[0]);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());

    login(&data, reg.port, true);
    let e = requestor_store(&data).fetch(&app, Some(&hash)).unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    let msg = e.to_string();
    let realm_host = format!("127.0.0.2:{}", tokens.port);
    assert!(
        msg.contains(&format!(
            "was not sent to the token service at http://{realm_host}"
        )) && msg.contains(&format!("--token-realm {realm_host}")),
        "{msg}"
    );
    let asked = tokens.requests();
    assert!(
        !asked.is_empty(),
        "the token service was asked (anonymously)"
    );
    assert!(asked.iter().all(|r| r.authorization.is_none()), "{asked:?}");

    // The operator trusts that realm: now the login goes there and the pull works.
    login_as(
        &data,
        reg.port,
        PASSWORD,
        true,
        std::slice::from_ref(&realm_host),
    );
    let img = requestor_store(&data).fetch(&app, Some(&hash)).unwrap();
    assert_eq!(list_squashfs(&img.path), ["hello"]);
    let last = tokens.requests().pop().unwrap();
    assert!(
        last.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "{last:?}"
    );

    // A trusted realm that redirects to another origin: the login stays behind.
    let before = tokens.requests().len();
    let t_port = tokens.port;
    let hop = provider::testsupport::http_responder(move |path| {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:{t_port}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    });
    let (reg2, auth2, images2) =
        token_setup(&format!("{}/token", hop.url()), &signer, &["team/app"]);
    let (app2, hash2) = pinned(reg2.port, &auth2, "team/app", &images2[0]);
    let data3 = DataDir::new(dir.path().join("third"));
    login_as(&data3, reg2.port, PASSWORD, true, &[hop.addr().to_string()]);
    let e = requestor_store(&data3)
        .fetch(&app2, Some(&hash2))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    assert_eq!(hop.paths().len(), 1, "the trusted realm was asked once");
    let after: Vec<_> = tokens.requests().split_off(before);
    assert_eq!(after.len(), 1, "the redirect was followed: {after:?}");
    assert!(after[0].authorization.is_none(), "{after:?}");
}

#[test]
fn a_plain_http_token_realm_elsewhere_than_loopback_is_refused() {
    // A registry on loopback whose challenge names a plain-HTTP realm on another host:
    // refused before anything is sent there (no name is even resolved).
    let fake = provider::testsupport::http_responder(|_| {
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://auth.registry.invalid/token\",service=\"r\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    });
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::new(dir.path());
    login(&data, fake.port, true);
    let url = format!(
        "oci://127.0.0.1:{}/team/app@sha256:{}",
        fake.port,
        "a".repeat(64)
    );
    let e = requestor_store(&data)
        .fetch(&url, Some(&sha3_256(b"x").parse_hash()))
        .unwrap_err();
    assert_eq!(code(&e), "payload-auth-failed", "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("token realm http://auth.registry.invalid is plain HTTP on a host that is neither loopback nor listed"),
        "{msg}"
    );
    assert_eq!(fake.paths().len(), 1, "only the registry was asked");
}

trait ParseHash {
    fn parse_hash(&self) -> policies::manifest::PayloadHash;
}

impl ParseHash for String {
    fn parse_hash(&self) -> policies::manifest::PayloadHash {
        policies::manifest::PayloadHash::parse(self).unwrap()
    }
}

const PROVIDER: &str = env!("CARGO_BIN_EXE_provider");

/// `provider vm run --image oci://…` with `data` as its data dir, run directly (`tty` false:
/// stdout and stderr are pipes) or under `script`, whose pseudo-terminal is stderr and
/// stdout both (its transcript comes back as stdout).
fn vm_run_oci(data: &Path, agent: &Path, tty: bool, args: &[&str]) -> std::process::Output {
    if tty {
        let quoted: Vec<String> = std::iter::once(PROVIDER)
            .chain(args.iter().copied())
            .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
            .collect();
        Command::new("script")
            .args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
            .env("PROVIDER_DATA_DIR", data)
            .env("PROVIDER_GUEST", agent)
            .env("TERM", "xterm")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    } else {
        Command::new(PROVIDER)
            .env("PROVIDER_DATA_DIR", data)
            .env("PROVIDER_GUEST", agent)
            .args(args)
            .output()
            .unwrap()
    }
}

/// The operator's `vm run` pulls an OCI image and runs it; the pull's progress bar is on a
/// terminal only: piped stderr, and `--json` on a terminal, get no control characters.
#[test]
fn vm_run_pulls_an_oci_image_with_progress_only_on_a_terminal() {
    if skip() {
        return;
    }
    let Some(env) = provider::testsupport::vm_env() else {
        return;
    };
    if !Path::new("/usr/bin/script").exists() {
        eprintln!("SKIP: script(1) is missing (bsdutils)");
        return;
    }
    let reg = start_registry();
    let p = Pusher::new(reg.port);
    let busybox = std::fs::read(&env.image).unwrap();
    let m = push_image(
        &p,
        "tools/busybox",
        "amd64",
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip(&busybox),
        )],
    );
    p.manifest("tools/busybox", "v1", OCI_MANIFEST, &{
        // The same manifest under a tag, as an operator names it.
        let digest = m["digest"].as_str().unwrap();
        let r = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!(
                "http://127.0.0.1:{}/v2/tools/busybox/manifests/{digest}",
                reg.port
            ))
            .header("Authorization", &p.auth)
            .header("Accept", OCI_MANIFEST)
            .send()
            .unwrap();
        serde_json::from_slice::<Value>(&r.bytes().unwrap()).unwrap()
    });
    let image = format!("oci://127.0.0.1:{}/tools/busybox:v1", reg.port);
    let run = [
        "vm",
        "run",
        "--image",
        &image,
        "--",
        "/bin/echo",
        "hi from oci",
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &dirs {
        login(&DataDir::new(d.path()), reg.port, false);
    }

    // Piped: the command's output, and a stderr with no control character at all.
    let o = vm_run_oci(dirs[0].path(), &env.agent, false, &run);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi from oci\n", "{err}");
    assert!(
        !err.chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'),
        "control characters on a piped stderr: {err:?}"
    );
    assert!(!err.contains("pulling"), "{err:?}");

    // On a terminal: the bar is drawn, then cleared. Only the pull is of interest here, so
    // a kernel that does not exist ends these runs right after it (one boot per test run
    // is enough: TCG boots take seconds).
    let pull_only = |json: bool| {
        let mut a = vec![
            "vm",
            "run",
            "--image",
            &image,
            "--kernel",
            "/nonexistent/vmlinuz",
        ];
        if json {
            a.insert(0, "--json");
        }
        a.extend(["--", "/bin/true"]);
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let args = pull_only(false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vm_run_oci(dirs[1].path(), &env.agent, true, &args);
    let tty = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_ne!(o.status.code(), Some(0), "{tty:?}");
    let bar = tty
        .find("pulling tools/busybox")
        .unwrap_or_else(|| panic!("no progress bar: {tty:?}"));
    let failed = tty
        .find("/nonexistent/vmlinuz")
        .unwrap_or_else(|| panic!("it fails at the kernel, after the pull: {tty:?}"));
    assert!(bar < failed, "{tty:?}");
    assert!(
        tty.contains('\u{1b}'),
        "a bar is drawn with escape sequences: {tty:?}"
    );
    eprintln!("terminal transcript: {tty:?}");

    // `--json` on a terminal: no bar.
    let args = pull_only(true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = vm_run_oci(dirs[2].path(), &env.agent, true, &args);
    let tty = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_ne!(o.status.code(), Some(0), "{tty:?}");
    assert!(
        tty.contains("/nonexistent/vmlinuz"),
        "it fails at the kernel, after the pull: {tty:?}"
    );
    assert!(!tty.contains("pulling"), "{tty:?}");
    assert!(!tty.contains('\u{1b}'), "{tty:?}");
}

/// `provider registry login` against a token-auth registry: the check goes through the
/// token service, a realm on another origin needs `--token-realm`, a refused login stores
/// nothing, and `auth list` shows the trusted realm but never the secret.
#[test]
fn registry_login_checks_through_the_token_service_and_stores_only_what_passed() {
    if skip() {
        return;
    }
    let signer = std::sync::Arc::new(Signer::new("test-token-issuer", "test-registry"));
    let tokens = TokenServer::start(
        "127.0.0.1".parse().unwrap(),
        signer.clone(),
        vec![token_user(&["team/app"])],
    );
    let reg = start_token_registry(&tokens.realm(), &signer);
    let dir = tempfile::tempdir().unwrap();
    let registry = format!("127.0.0.1:{}", reg.port);
    let realm = format!("127.0.0.1:{}", tokens.port);
    let cli = |args: &[&str], stdin: &str| {
        let mut c = Command::new(PROVIDER)
            .env("PROVIDER_DATA_DIR", dir.path())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let login = [
        "registry",
        "login",
        &registry,
        "--username",
        USER,
        "--password-stdin",
    ];
    let auth_file = dir.path().join("registry/auth.json");

    // The realm is another origin: the login is not sent there, so the check fails, and
    // the message says how to trust it.
    let (code, _, err) = cli(&login, &format!("{PASSWORD}\n"));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains(&format!("--token-realm {realm}")), "{err}");
    assert!(!auth_file.exists(), "nothing stored after a failed check");

    let mut trusted = login.to_vec();
    trusted.extend(["--token-realm", &realm]);
    let (code, _, err) = cli(&trusted, "wrong password\n");
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("refused the login"), "{err}");
    assert!(!auth_file.exists(), "nothing stored after a refused login");

    let (code, _, err) = cli(&trusted, &format!("{PASSWORD}\n"));
    assert_eq!(code, Some(0), "{err}");
    let asked = tokens.requests();
    let last = asked.last().unwrap();
    assert!(
        last.authorization.is_some() && !last.target.contains("scope="),
        "{asked:?}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let (code, out, err) = cli(&["--json", "registry", "auth", "list"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains(PASSWORD), "{out}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list,
        json!([{"registry": registry, "username": USER, "for_requestors": false, "token_realms": [realm]}])
    );

    let (code, _, err) = cli(&["registry", "logout", &registry], "");
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&["--json", "registry", "auth", "list"], "");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
}
