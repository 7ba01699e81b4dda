//! Running the project's binaries against throwaway data dirs, and the files they read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use certs::testpki::Issued;
use openssl::hash::MessageDigest;

/// Path of a workspace binary. `cargo test --workspace` builds the `agent` binaries because
/// `agent` has integration tests of its own; `PROVIDER_BIN_DIR` overrides the location.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("PROVIDER_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test-binary> → target/<profile>/
            let exe = std::env::current_exe().expect("current test binary");
            exe.parent()
                .and_then(Path::parent)
                .expect("test binary lives in target/<profile>/deps")
                .to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build -p provider` (or the whole `cargo test --workspace`)",
        path.display()
    );
    path
}

/// Yagna's vectors in the sibling `shared/` directory.
pub fn yagna(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/vectors/yagna")
        .join(rel)
}

/// yagna's real intermediate CA `Foo Inter` with its private key (the key file is encrypted
/// with the passphrase in `pass.txt`), to issue leaves under yagna's own chain.
pub fn yagna_foo_inter() -> Issued {
    let cert =
        openssl::x509::X509::from_pem(&std::fs::read(yagna("certs/foo_inter.cert.pem")).unwrap())
            .unwrap();
    let pass = std::fs::read_to_string(yagna("certs/pass.txt")).unwrap();
    let key = openssl::pkey::PKey::private_key_from_pem_passphrase(
        &std::fs::read(yagna("certs/foo_inter.key.pem")).unwrap(),
        pass.trim().as_bytes(),
    )
    .unwrap();
    Issued { cert, key }
}

/// A throwaway provider data dir plus a scratch dir for input files.
pub struct Provider {
    pub home: tempfile::TempDir,
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// Asserts success and returns self, showing the output on failure.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }

    /// Asserts a bad-input failure: exit 2, exactly one line on stderr containing `needle`.
    pub fn bad_input(self, needle: &str) -> Self {
        assert_eq!(self.code, 2, "expected exit 2: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected a one-line error: {self:?}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "error should mention `{needle}`: {self:?}"
        );
        self
    }
}

impl Default for Provider {
    fn default() -> Self {
        Self::new()
    }
}

impl Provider {
    pub fn new() -> Self {
        Self {
            home: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.home.path().join("data")
    }

    /// A path for an input file outside the data dir.
    pub fn input(&self, name: &str) -> PathBuf {
        let dir = self.home.path().join("inputs");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    pub fn write_input(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.input(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Runs `provider --data-dir <data> <args>`.
    pub fn run<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = Command::new(bin("provider"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env_remove("PROVIDER_DATA_DIR")
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn provider");
        Run::from(out)
    }

    /// `provider keystore add <paths>…`
    pub fn keystore_add(&self, paths: &[&Path]) -> Run {
        let mut args: Vec<&std::ffi::OsStr> = vec!["keystore".as_ref(), "add".as_ref()];
        args.extend(paths.iter().map(|p| p.as_os_str()));
        self.run(args)
    }

    /// `provider --json manifest check --manifest <m> [--sig s --sig-alg a --cert c] <extra>…`
    pub fn check(
        &self,
        manifest: &Path,
        signed: Option<(&Path, &str, &Path)>,
        extra: &[&str],
    ) -> Run {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--json".as_ref(),
            "manifest".as_ref(),
            "check".as_ref(),
            "--manifest".as_ref(),
            manifest.as_os_str(),
        ];
        if let Some((sig, alg, cert)) = signed {
            args.extend::<[&std::ffi::OsStr; 6]>([
                "--sig".as_ref(),
                sig.as_os_str(),
                "--sig-alg".as_ref(),
                alg.as_ref(),
                "--cert".as_ref(),
                cert.as_os_str(),
            ]);
        }
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        self.run(args)
    }

    /// Every file of the data dir with its bytes, to prove a failed command changed nothing.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        let root = self.data_dir();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(&root).unwrap().to_owned();
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Writes a signed manifest as a requestor sends it: the JSON, the base64 signature over
/// its base64 text, and the PEM chain. Returns (manifest, sig, chain) paths.
pub fn write_signed(
    p: &Provider,
    stem: &str,
    manifest: &serde_json::Value,
    signer: &Issued,
    chain: &[u8],
) -> (PathBuf, PathBuf, PathBuf) {
    let json = serde_json::to_vec_pretty(manifest).unwrap();
    let sig = certs::testpki::sign(&signer.key, MessageDigest::sha256(), b64(&json).as_bytes());
    (
        p.write_input(&format!("{stem}.json"), &json),
        p.write_input(&format!("{stem}.sig"), b64(&sig)),
        p.write_input(&format!("{stem}.chain.pem"), chain),
    )
}

/// A valid manifest asking for `urls` (none: no outbound).
pub fn manifest(urls: &[&str]) -> serde_json::Value {
    let mut m = serde_json::json!({
        "version": "0.1.0",
        "createdAt": "2024-01-01T00:00:00Z",
        "expiresAt": "2100-01-01T00:00:00Z",
        "metadata": {"name": "e2e", "version": "1.0.0"},
        "payload": [{
            "platform": {"arch": "x86_64", "os": "linux"},
            "urls": ["https://images.example.com/app.tar.gz"],
            "hash": format!("sha3:{}", "ab".repeat(32))
        }],
        "compManifest": {"version": "0.1.0"}
    });
    if !urls.is_empty() {
        m["compManifest"]["net"] =
            serde_json::json!({"inet": {"out": {"protocols": ["https"], "urls": urls}}});
    }
    m
}

pub const PEER: &str = "12D3KooWHk6JmCpT1YgUp1wYm4yUjJ3yTTsAxE3pJRgE4sS2zCvo";
pub const OTHER_PEER: &str = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK";

/// A running `provider run` daemon on loopback; SIGTERM and a wait on drop.
pub struct Daemon {
    pub child: std::process::Child,
    /// The address it printed, with `/p2p/<peer id>`.
    pub addr: String,
    stderr: PathBuf,
}

impl Daemon {
    /// The daemon's stderr so far (its logs).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peer id at the end of [`Daemon::addr`].
    pub fn peer_id(&self) -> &str {
        self.addr.rsplit('/').next().unwrap()
    }

    /// SIGTERM, then waits up to `limit` for the exit; returns its code.
    pub fn stop(&mut self, limit: std::time::Duration) -> Option<i32> {
        signal(self.child.id(), "TERM");
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none()
            && self.stop(std::time::Duration::from_secs(30)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kill -<sig> <pid>`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Provider {
    /// Starts `provider run` on 127.0.0.1 (no mDNS) with `extra` flags and waits for the
    /// address it listens on.
    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"];
        args.extend_from_slice(extra);
        self.daemon_with(&args)
    }

    /// Starts `provider run <args>` and waits for the address it listens on.
    pub fn daemon_with(&self, args: &[&str]) -> Daemon {
        self.daemon_in(None, args)
    }

    /// [`Provider::daemon`] with `env` set for the daemon's process.
    pub fn daemon_env(&self, env: &[(&str, &str)], extra: &[&str]) -> Daemon {
        let mut args = vec!["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"];
        args.extend_from_slice(extra);
        self.spawn_daemon(None, env, &args)
    }

    /// Starts `provider run <args>` inside network namespace `netns` (`ip netns exec`), or
    /// here with `None`, and waits for the first address it listens on.
    pub fn daemon_in(&self, netns: Option<&str>, args: &[&str]) -> Daemon {
        self.spawn_daemon(netns, &[], args)
    }

    fn spawn_daemon(&self, netns: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        use std::io::BufRead as _;
        let stderr = self.home.path().join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("provider"));
                c
            }
            None => Command::new(bin("provider")),
        };
        let mut child = command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("run")
            .args(args)
            .env_remove("PROVIDER_DATA_DIR")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn provider run");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(addr) => Daemon {
                child,
                addr,
                stderr,
            },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the daemon printed no address within 60 s; its log:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        }
    }

    /// Runs `requestor <args>` from the inputs dir.
    pub fn requestor<I, S>(&self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = Command::new(bin("requestor"))
            .current_dir(self.input(""))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("spawn requestor");
        Run::from(out)
    }
}

/// Temp files of atomic writes (`.<name>.tmp.<pid>…`) anywhere under `dir`: what a write
/// cut short (a kill, a full disk) must not leave behind.
pub fn half_written_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp.") {
                found.push(entry.path());
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}
