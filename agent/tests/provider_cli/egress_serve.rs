//! `provider egress serve` as an operator runs it: the real binary on loopback, a local
//! upstream, the audit log in the data dir, the domain whitelist read from it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use provider::testsupport::{http_ok, http_responder};

const BOUND: Duration = Duration::from_secs(20);

/// Answers every request with `200 ok`.
fn upstream() -> SocketAddr {
    http_responder(|_| http_ok(b"ok")).addr()
}

fn manifest(dir: &Path, urls: &[String]) -> std::path::PathBuf {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let text = format!(
        r#"{{"version":"0.1.0","createdAt":"2022-09-15T00:00:00Z","expiresAt":"2100-01-01T00:00:00Z",
"payload":[{{"urls":["https://example.com/image.tar.gz"],"hash":"sha3:{}"}}],
"compManifest":{{"version":"0.1.0","net":{{"inet":{{"out":{{"protocols":["http","https"],"urls":[{}]}}}}}}}}}}"#,
        "0".repeat(64),
        urls.join(",")
    );
    let path = dir.join("manifest.json");
    std::fs::write(&path, text).unwrap();
    path
}

/// The running proxy; killed when dropped, also when a test fails.
struct Serve {
    child: Child,
    addr: SocketAddr,
    stdout: Vec<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path, manifest: &Path, extra: &[&str]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_provider"))
        .arg("--data-dir")
        .arg(data)
        .args(["egress", "serve", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(manifest)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdout = Vec::new();
    // The listening line, the policy lines, and the audit log line end the preamble.
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            panic!("egress serve exited early after {stdout:?}");
        }
        let done = line.starts_with("audit log: ");
        stdout.push(line.trim_end().to_owned());
        if done {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = stdout[0]
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    Serve {
        child,
        addr,
        stdout,
    }
}

/// One request through the proxy; returns the whole answer.
fn request(proxy: SocketAddr, text: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(proxy: SocketAddr, host: &str, port: u16) -> String {
    request(
        proxy,
        &format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"),
    )
}

fn audit_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + BOUND;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serves_the_manifest_policy_and_audits_every_decision() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream();
    let m = manifest(dir.path(), &[format!("http://localhost:{}/", up.port())]);
    let data = dir.path().join("data");
    let p = serve(
        &data,
        &m,
        &[
            "--mode",
            "all",
            "--allow-cidr",
            "127.0.0.0/8",
            "--job",
            "job-42",
        ],
    );
    assert!(
        p.stdout
            .iter()
            .any(|l| l.starts_with("allow plain HTTP to localhost:")),
        "{:?}",
        p.stdout
    );

    let ok = get(p.addr, "localhost", up.port());
    assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok"), "{ok}");
    let no = get(p.addr, "elsewhere.localhost", up.port());
    assert!(
        no.starts_with("HTTP/1.1 403") && no.contains("not-listed"),
        "{no}"
    );

    let lines = audit_lines(&data.join("audit.jsonl"), 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let allow = lines.iter().find(|l| l["decision"] == "allow").unwrap();
    assert_eq!(allow["job"], "job-42");
    assert_eq!(allow["event"], "egress");
    assert_eq!(
        allow["destination"],
        format!("http://localhost:{}/", up.port())
    );
    assert_eq!(allow["resolved"], up.to_string());
    assert_eq!(allow["bytes_down"], 2);
    let deny = lines.iter().find(|l| l["decision"] == "deny").unwrap();
    assert_eq!(deny["rule"], "not-listed");
    assert_eq!(deny["status"], 403);
}

#[test]
fn whitelist_mode_reads_the_data_dirs_domain_whitelist() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream();
    let m = manifest(dir.path(), &[format!("http://localhost:{}/", up.port())]);
    let data = dir.path().join("data");
    let audit = dir.path().join("egress-audit.jsonl");
    let audit_arg = audit.to_str().unwrap();
    let args = [
        "--mode",
        "whitelist",
        "--allow-cidr",
        "127.0.0.0/8",
        "--audit",
        audit_arg,
    ];

    // No whitelist file: nothing is whitelisted.
    let p = serve(&data, &m, &args);
    let no = get(p.addr, "localhost", up.port());
    assert!(
        no.starts_with("HTTP/1.1 403") && no.contains("not-whitelisted"),
        "{no}"
    );
    drop(p);

    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("domain_whitelist.json"),
        r#"{"patterns":[{"domain":"localhost","match":"strict"}]}"#,
    )
    .unwrap();
    let p = serve(&data, &m, &args);
    let ok = get(p.addr, "localhost", up.port());
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let lines = audit_lines(&audit, 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        !data.join("audit.jsonl").exists(),
        "--audit must replace the default log"
    );
}

#[test]
fn a_broken_manifest_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("manifest.json");
    std::fs::write(&m, b"{\"version\": \"0.1.0\", \"bogus\": 1}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["egress", "serve", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(&m)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("manifest.json"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_provider"))
        .args(["egress", "serve", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(&m)
        .args(["--allow-cidr", "not-a-cidr"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-cidr"));
}

#[test]
fn oversized_request_heads_are_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream();
    let port = up.port();
    let m = manifest(dir.path(), &[format!("http://localhost:{port}/")]);
    let data = dir.path().join("data");
    let p = serve(&data, &m, &["--mode", "all", "--allow-cidr", "127.0.0.0/8"]);
    // One header of 100 KiB, then a head just under the documented 64 KiB.
    let head = |fill: usize| {
        format!(
            "GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nX-Fill: {}\r\n\r\n",
            "a".repeat(fill)
        )
    };
    let big = request(p.addr, &head(100 << 10));
    assert!(
        big.starts_with("HTTP/1.1 431"),
        "{}",
        &big[..big.len().min(200)]
    );
    let under = head((64 << 10) - 200);
    assert!(under.len() < 64 << 10);
    let ok = request(p.addr, &under);
    assert!(
        ok.starts_with("HTTP/1.1 200"),
        "{}",
        &ok[..ok.len().min(200)]
    );

    let lines = audit_lines(&data.join("audit.jsonl"), 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let deny = lines.iter().find(|l| l["decision"] == "deny").unwrap();
    assert_eq!(deny["rule"], "head-too-large");
    assert_eq!(deny["status"], 431);
    assert!(lines.iter().any(|l| l["decision"] == "allow"), "{lines:?}");
}
