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
        "{} not built; run `cargo build -p agent` (or the whole `cargo test --workspace`)",
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
