//! What the tests of this crate and of the `tests` crate need from this host: the static
//! guest agent built once, a busybox rootfs, the guest kernel and QEMU, and a small HTTP
//! upstream on loopback (the one copy of it). Compiled only for this crate's unit tests and
//! with the `test-support` feature (the test crates enable it); nothing in the product uses
//! it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vm::{qemu::QemuOptions, Backend};

pub mod registry;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_owned()
}

/// `<target>/guest`: the static guest agent's own target dir (its RUSTFLAGS differ from
/// the host build's, so it must not share a target dir with it). Found from the running
/// test binary, `<target>/<profile>/deps/<name>`.
fn guest_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps")
        .join("guest")
}

/// Builds the static guest agent once per test process, where `vm::find_guest_agent`
/// looks for it; `Err` with cargo's output when it does not build.
pub fn guest_agent() -> Result<PathBuf, String> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(workspace())
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_PROFILE_RELEASE_STRIP", "true")
                .args(["build", "--release", "-p", "guest"])
                .args(["--target", "x86_64-unknown-linux-gnu", "--target-dir"])
                .arg(guest_target_dir())
                .output()
                .map_err(|e| format!("run cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building provider-guest failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let p = guest_target_dir().join("x86_64-unknown-linux-gnu/release/provider-guest");
            if !vm::is_static_elf(&p) {
                return Err(format!("{} is not a static executable", p.display()));
            }
            Ok(p)
        })
        .clone()
}

/// A VM-capable host: kernel, QEMU backend, a busybox rootfs tarball and the guest agent.
pub struct VmEnv {
    pub kernel: PathBuf,
    /// The kernel's modules for the disk path (`vm::find_modules`).
    pub modules: Option<PathBuf>,
    pub agent: PathBuf,
    pub image: PathBuf,
    pub backend: Backend,
    _dir: tempfile::TempDir,
}

/// The [`VmEnv`] of this host, or `None` after printing `SKIP: <why>` where it lacks a
/// system piece (QEMU, the kernel, busybox); `.ci/run` installs and fetches them.
pub fn vm_env() -> Option<VmEnv> {
    let kernel = match vm::find_kernel(None) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return None;
        }
    };
    let info = vm::HostInfo::detect();
    let (Some(qemu), Some(choice)) = (info.qemu.as_ref(), info.auto.as_ref()) else {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        return None;
    };
    let backend = Backend::Qemu(QemuOptions {
        binary: qemu.path.clone(),
        accel: choice.accel,
        sandbox: qemu.sandbox,
    });
    let dir = tempfile::tempdir().expect("a temp dir");
    let image = dir.path().join("busybox.tar");
    let out = Command::new(workspace().join("scripts/make-test-image.sh"))
        .arg(&image)
        .output()
        .expect("run scripts/make-test-image.sh");
    if !out.status.success() {
        eprintln!(
            "SKIP: no test image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let modules = match vm::find_modules(&kernel) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIP: {e}");
            return None;
        }
    };
    let agent = guest_agent().unwrap_or_else(|e| panic!("{e}"));
    Some(VmEnv {
        kernel,
        modules,
        agent,
        image,
        backend,
        _dir: dir,
    })
}

impl VmEnv {
    /// What a disk-path machine boots from.
    pub fn files(&self) -> vm::GuestFiles {
        vm::GuestFiles {
            kernel: self.kernel.clone(),
            modules: self.modules.clone(),
            agent: self.agent.clone(),
        }
    }

    /// The busybox image as a squashfs disk (converted into `dir`).
    pub fn disk_image(&self, dir: &Path) -> vm::rootfs::DiskImage {
        vm::rootfs::tarball_to_squashfs(
            &self.image,
            &dir.join("busybox.sqfs"),
            dir,
            vm::rootfs::ConvertLimits {
                max_bytes: 1 << 30,
                max_entries: 100_000,
            },
        )
        .unwrap_or_else(|e| panic!("convert the test image: {e}"))
    }
}

/// Lowercase hex of a digest.
pub fn hex_digest(md: openssl::hash::MessageDigest, bytes: &[u8]) -> String {
    openssl::hash::hash(md, bytes)
        .expect("openssl hashes")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running [`http_server`] or [`http_responder`].
pub struct Upstream {
    /// The address it listens on (127.0.0.1 unless [`http_responder_on`] said otherwise).
    pub ip: IpAddr,
    pub port: u16,
    /// TCP connections accepted (also those that never sent a request).
    pub connections: Arc<AtomicUsize>,
    /// The paths requested, in order.
    pub paths: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    /// `http://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `<ip>:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// The whole answer for a `200 OK` with `body`, closing the connection.
pub fn http_ok(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The whole answer for a `404 Not Found`.
pub const HTTP_NOT_FOUND: &[u8] =
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A small HTTP/1.1 server on 127.0.0.1 (over TLS when given an acceptor): `GET <path>`
/// answers with the route's body, other paths with `fallback` (or 404 without one). One
/// request per connection.
pub fn http_server(
    routes: Vec<(String, Vec<u8>)>,
    fallback: Option<Vec<u8>>,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
) -> Upstream {
    serve_http(Ipv4Addr::LOCALHOST.into(), tls, move |path| {
        routes
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, b)| b.as_slice())
            .or(fallback.as_deref())
            .map_or_else(|| HTTP_NOT_FOUND.to_vec(), http_ok)
    })
}

/// The same server with the whole answer (status line, headers, body) from `reply` for
/// each request's path: for upstreams that misbehave on purpose (a short body, no
/// `Content-Length`) or answer every path alike. The connection is closed after it.
pub fn http_responder(reply: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static) -> Upstream {
    http_responder_on(Ipv4Addr::LOCALHOST.into(), reply)
}

/// [`http_responder`] on another local address (e.g. `127.0.0.2`, or `::1`), for tests of
/// address policies.
pub fn http_responder_on(
    ip: IpAddr,
    reply: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
) -> Upstream {
    serve_http(ip, None, reply)
}

fn serve_http(
    ip: IpAddr,
    tls: Option<Arc<openssl::ssl::SslAcceptor>>,
    reply: impl Fn(&str) -> Vec<u8> + Send + Sync + 'static,
) -> Upstream {
    let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    let port = listener.local_addr().expect("local addr").port();
    let paths = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (log, count) = (paths.clone(), connections.clone());
    let reply = Arc::new(reply);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(c) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let (reply, log, tls) = (reply.clone(), log.clone(), tls.clone());
            std::thread::spawn(move || match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(c) {
                        answer(s, &*reply, &log);
                    }
                }
                None => answer(c, &*reply, &log),
            });
        }
    });
    Upstream {
        ip,
        port,
        connections,
        paths,
    }
}

fn answer<S: Read + Write>(mut c: S, reply: &dyn Fn(&str) -> Vec<u8>, log: &Mutex<Vec<String>>) {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&req);
    let path = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_owned();
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.clone());
    let _ = c.write_all(&reply(&path));
    let _ = c.flush();
}

/// The command lines of live QEMU processes that mention `needle` (a job's or data dir's
/// path), to prove none outlived its job.
pub fn qemu_processes_mentioning(needle: &Path) -> Vec<String> {
    qemus_mentioning(needle)
        .into_iter()
        .map(|(_, cmd)| cmd)
        .collect()
}

/// The process ids of the QEMU processes [`qemu_processes_mentioning`] finds.
pub fn qemu_pids_mentioning(needle: &Path) -> Vec<u32> {
    qemus_mentioning(needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

fn qemus_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                found.push((pid, cmd));
            }
        }
    }
    found
}

/// Runs the test `name` of the current test binary again inside a private network
/// namespace with one veth pair, so multicast (mDNS) never touches the host's network.
/// Returns false in that re-run (do the work); true where the re-run happened (it passed,
/// or was skipped with the reason printed).
pub fn rerun_in_private_netns(name: &str) -> bool {
    const MARK: &str = "PROVIDER_TEST_IN_NETNS";
    if std::env::var_os(MARK).is_some() {
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "ip link set lo up && ip link add v0 type veth peer name v1 && \
         ip addr add 10.77.0.1/24 dev v0 && ip link set v0 multicast on up && ip link set v1 up && \
         ip route add 224.0.0.0/4 dev v0 && exec '{}' --exact {name} --nocapture --test-threads 1",
        exe.display()
    );
    match Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .env(MARK, "1")
        .output()
    {
        // `--exact` with a misspelt name runs nothing and succeeds: insist on the one test.
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains(" 1 passed") => {
            true
        }
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("unshare failed") => {
            eprintln!(
                "SKIPPED {name}: no private network namespace here: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            true
        }
        Ok(o) => panic!(
            "{name} failed in its network namespace:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            eprintln!("SKIPPED {name}: cannot run unshare: {e}");
            true
        }
    }
}

/// A small internet in network namespaces, made by a test and removed when dropped (also
/// when the test panics): a "public" segment `198.51.100.0/24` (a bridge in the namespace
/// [`NatLab::public`], which owns `198.51.100.1`), and `homes` home segments, each a host
/// namespace ([`NatLab::home`], `10.<i>.0.2/24`) behind its own router namespace that
/// masquerades it (iptables MASQUERADE) behind `198.51.100.<10+i>` and drops unsolicited
/// inbound connections. Names carry the
/// process id, so parallel runs do not collide; the host's own network is never touched.
pub struct NatLab {
    prefix: String,
    namespaces: Vec<String>,
}

/// How a home's router maps its hosts' connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// `MASQUERADE`: Linux keeps the source port where it can, so one local port maps to
    /// one public port whatever the destination (endpoint-independent): hole punching works.
    PortPreserving,
    /// `MASQUERADE --random-fully`: every new connection gets a random public port
    /// (endpoint-dependent, like a symmetric NAT): hole punching cannot work.
    RandomPorts,
}

impl NatLab {
    /// The public segment's address of the peer in [`NatLab::public`].
    pub const PUBLIC_IP: &'static str = "198.51.100.1";

    /// Builds the namespaces, or says why it cannot (not root, no `ip`/`iptables`).
    pub fn create(homes: &[NatKind]) -> Result<Self, String> {
        let prefix = format!("pv{}", std::process::id() % 1_000_000);
        let mut lab = Self {
            prefix,
            namespaces: Vec::new(),
        };
        for tool in ["ip", "iptables"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !found {
                return Err(format!(
                    "`{tool}` is not installed (scripts/install-deps.sh)"
                ));
            }
        }
        let public = lab.public();
        lab.add_ns(&public)?;
        lab.ip(&public, "link set lo up")?;
        lab.ip(&public, "link add br0 type bridge")?;
        lab.ip(&public, &format!("addr add {}/24 dev br0", Self::PUBLIC_IP))?;
        lab.ip(&public, "link set br0 up")?;
        for (n, kind) in homes.iter().enumerate() {
            let i = n + 1;
            let (router, home) = (lab.router(i), lab.home(i));
            lab.add_ns(&router)?;
            lab.add_ns(&home)?;
            lab.ip(
                &router,
                &format!("link add wan type veth peer name r{i} netns {public}"),
            )?;
            lab.ip(&public, &format!("link set r{i} master br0 up"))?;
            lab.ip(
                &router,
                &format!("addr add 198.51.100.{}/24 dev wan", 10 + i),
            )?;
            lab.ip(&router, "link set wan up")?;
            lab.ip(&router, "link set lo up")?;
            lab.ip(
                &router,
                &format!("link add lan type veth peer name eth0 netns {home}"),
            )?;
            lab.ip(&router, &format!("addr add 10.{i}.0.1/24 dev lan"))?;
            lab.ip(&router, "link set lan up")?;
            lab.ip(&home, "link set lo up")?;
            lab.ip(&home, &format!("addr add 10.{i}.0.2/24 dev eth0"))?;
            lab.ip(&home, "link set eth0 up")?;
            lab.ip(&home, &format!("route add default via 10.{i}.0.1"))?;
            lab.exec(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            let mut nat = vec![
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "wan",
                "-j",
                "MASQUERADE",
            ];
            if *kind == NatKind::RandomPorts {
                nat.push("--random-fully");
            }
            lab.exec(&router, &nat)?;
            // Like a home router: an unsolicited inbound connection is dropped silently.
            // Without this the router's own stack answers a SYN with a RST, and a hole
            // punch fails whenever one side's SYN arrives before the other side's went out.
            lab.exec(
                &router,
                &[
                    "iptables",
                    "-A",
                    "INPUT",
                    "-i",
                    "wan",
                    "-p",
                    "tcp",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "DROP",
                ],
            )?;
        }
        // A dial-back to a home (AutoNAT) now times out instead of being refused: give up
        // after two SYN retries (about 7 s) rather than Linux's six (about two minutes).
        lab.exec(&public, &["sysctl", "-qw", "net.ipv4.tcp_syn_retries=2"])?;
        Ok(lab)
    }

    /// The public namespace (the bridge and `198.51.100.1`).
    pub fn public(&self) -> String {
        format!("{}-pub", self.prefix)
    }

    /// The host namespace of home `i` (1-based).
    pub fn home(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    fn router(&self, i: usize) -> String {
        format!("{}-r{i}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> Result<(), String> {
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    fn ip(&self, ns: &str, args: &str) -> Result<(), String> {
        let mut c = Command::new("ip");
        c.args(["-n", ns]).args(args.split_whitespace());
        run_checked(&mut c)
    }

    /// Runs `argv` in namespace `ns` and fails with its stderr.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<(), String> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(argv);
        run_checked(&mut c)
    }
}

fn run_checked(c: &mut Command) -> Result<(), String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, bridge and iptables rules with it.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A small tmpfs mounted over a directory, for the disk-full fault campaign
/// (docs/robustness.md): what fills it is the test's, what runs out of space is the
/// provider's. Unmounted on drop.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on `path` (created if missing). `None`, with the reason
    /// printed, where this process may not mount (not root, no tmpfs).
    pub fn mount(path: &Path, bytes: u64) -> Option<Self> {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0700"))
            .arg("tmpfs")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs on {} (needs root)",
                path.display()
            );
            return None;
        }
        Some(Self {
            path: path.to_owned(),
        })
    }

    /// Writes a filler file until the disk is full; returns it (remove it to free space).
    pub fn fill(&self) -> PathBuf {
        Self::fill_dir(&self.path)
    }

    /// [`SmallDisk::fill`] for the disk `dir` is on (from another thread).
    pub fn fill_dir(dir: &Path) -> PathBuf {
        let filler = dir.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0xa5u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
