//! Payloads in a VM, end to end under QEMU (TCG on hosts whose KVM cannot boot Linux).
//!
//! Booting takes seconds under TCG, so the boots are few and shared: one CLI job per
//! behaviour that needs its own VM, and one library session that runs several commands and
//! transfers. Tests that need QEMU, the guest kernel or busybox skip with a printed reason
//! when the host genuinely lacks them; `.ci/run` installs and fetches them.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use openssl::hash::MessageDigest;
use provider::testsupport::{self, hex_digest, http_server, qemu_processes_mentioning, vm_env};
use vm::{qemu::QemuOptions, Backend, RunSpec, Vm};

const PROVIDER: &str = env!("CARGO_BIN_EXE_provider");

fn provider(data: &Path, agent: &Path, args: &[&str]) -> Output {
    Command::new(PROVIDER)
        .env("PROVIDER_DATA_DIR", data)
        .env("PROVIDER_GUEST", agent)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Two jobs from one URL: `echo hello` (exit 0); then stderr, an exit code, `lo` as the
/// only interface and the memory limit, with the image served from the store (one fetch).
#[test]
fn vm_run_streams_output_and_passes_exit_codes() {
    let Some(env) = vm_env() else { return };
    let data = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&env.image).unwrap();
    let hash = format!("sha3:{}", hex_digest(MessageDigest::sha3_256(), &bytes));
    let upstream = http_server(vec![("/image.tar".into(), bytes)], None, None);
    let base = upstream.url();
    let url = format!("{base}/image.tar");

    let o = provider(
        data.path(),
        &env.agent,
        &[
            "vm",
            "run",
            "--image",
            &url,
            "--hash",
            &hash,
            "--",
            "/bin/echo",
            "hello",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello\n",
        "{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let o = provider(
        data.path(),
        &env.agent,
        &[
            "vm",
            "run",
            "--image",
            &url,
            "--hash",
            &hash,
            "--mem",
            "256M",
            "--",
            "/bin/sh",
            "-c",
            "ls /sys/class/net; grep MemTotal /proc/meminfo; echo err >&2; exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(stderr(&o), "err\n");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("lo"), "only lo may exist: {out}");
    let mem = lines.next().unwrap_or_default();
    assert!(mem.starts_with("MemTotal:"), "{out}");
    let kib: u64 = mem
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        kib > 64 * 1024 && kib <= 256 * 1024,
        "MemTotal {kib} kB with --mem 256M"
    );
    assert_eq!(
        upstream.paths(),
        ["/image.tar"],
        "the second job must not download"
    );
}

#[test]
fn vm_run_kills_a_command_at_its_timeout_and_the_vm_is_gone() {
    let Some(env) = vm_env() else { return };
    let data = tempfile::tempdir().unwrap();
    let o = provider(
        data.path(),
        &env.agent,
        &[
            "vm",
            "run",
            "--image",
            env.image.to_str().unwrap(),
            "--timeout",
            "3s",
            "--",
            "/bin/sh",
            "-c",
            "echo started; sleep 600",
        ],
    );
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "started\n");
    assert!(stderr(&o).contains("timed out after 3s"), "{}", stderr(&o));
    let left = qemu_processes_mentioning(data.path());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

/// Refusals that happen before any VM starts.
#[test]
fn bad_images_are_refused_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = dir.path().join("no-agent-needed");
    let tarball = dir.path().join("t.tar");
    std::fs::write(&tarball, b"not really a tar, but hashed first").unwrap();
    let wrong = format!("sha3:{}", "ab".repeat(32));
    let o = provider(
        &data,
        &agent,
        &[
            "vm",
            "run",
            "--image",
            tarball.to_str().unwrap(),
            "--hash",
            &wrong,
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("hash mismatch"), "{}", stderr(&o));
    assert!(
        !data.join("jobs").exists(),
        "no job may start on a wrong hash"
    );

    let empty = http_server(vec![("/image.tar".into(), Vec::new())], None, None);
    let base = empty.url();
    let o = provider(
        &data,
        &agent,
        &[
            "vm",
            "run",
            "--image",
            &format!("{base}/missing.tar"),
            "--",
            "/bin/true",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("404"), "{}", stderr(&o));

    // A port nobody listens on (bound, then released).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/image.tar");
    let o = provider(
        &data,
        &agent,
        &["vm", "run", "--image", &url, "--", "/bin/true"],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains(&url) && e.to_lowercase().contains("refused"),
        "{e}"
    );
}

/// Fault campaign (docs/robustness.md): the data dir's disk fills up while an image is
/// stored. The command fails naming the disk-full error, no VM starts, and the store
/// keeps no part of the image (nothing a later job could take for it).
#[test]
fn a_full_data_disk_during_an_image_download_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = testsupport::SmallDisk::mount(&data, 2 << 20) else {
        return;
    };
    // An upstream that sends half of a 1 MiB image (which fits), then fills the disk as
    // another writer would, then sends the rest: the store's own writes hit ENOSPC.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/big.tar", listener.local_addr().unwrap());
    let upstream = {
        let disk_path = data.clone();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let (mut c, _) = listener.accept().unwrap();
            let mut head = [0u8; 4096];
            let _ = c.read(&mut head).unwrap();
            let half = vec![0x5au8; 512 << 10];
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n",
            );
            let _ = c.write_all(&half);
            std::thread::sleep(Duration::from_millis(300));
            let filler = testsupport::SmallDisk::fill_dir(&disk_path);
            let _ = c.write_all(&half);
            filler
        })
    };
    let agent = dir.path().join("no-agent-needed");
    let o = provider(
        &data,
        &agent,
        &["vm", "run", "--image", &url, "--", "/bin/true"],
    );
    assert_ne!(o.status.code(), Some(0));
    let e = stderr(&o);
    let last = e.lines().last().unwrap_or_default();
    assert!(
        last.contains("could not store the image") && last.contains("No space left on device"),
        "{e}"
    );
    assert!(
        !data.join("jobs").exists()
            || std::fs::read_dir(data.join("jobs"))
                .unwrap()
                .next()
                .is_none(),
        "a job started: {e}"
    );
    let mut left = Vec::new();
    let mut stack = vec![data.join("images")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                left.push(entry.path());
            }
        }
    }
    assert!(
        left.is_empty(),
        "the store kept part of the image: {left:?}"
    );
    std::fs::remove_file(upstream.join().unwrap()).unwrap();
    let o = provider(&data, &agent, &["--json", "images", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    drop(disk);
}

/// A hostile tarball through the CLI: refused with the entry named, no VM started.
#[test]
fn unsafe_tarball_is_refused_naming_the_entry() {
    let Ok(agent) = testsupport::guest_agent() else {
        eprintln!("SKIP: the guest agent cannot be built here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Never booted: the initramfs is refused first.
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"unused").unwrap();
    std::fs::create_dir(dir.path().join("modules")).unwrap();
    std::fs::write(dir.path().join("modules/order"), b"").unwrap();
    for (entries, named) in [
        (vec![("../x", false)], "../x"),
        (vec![("/etc/x", false)], "/etc/x"),
        (vec![("root", true), ("root/etc/x", false)], "root/etc/x"),
    ] {
        let path = dir.path().join("evil.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, is_link) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_mode(0o755);
            if is_link {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name("/").unwrap();
                h.set_size(0);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            } else {
                h.set_size(1);
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            }
        }
        b.finish().unwrap();
        drop(b);
        let o = provider(
            &data,
            &agent,
            &[
                "vm",
                "run",
                "--image",
                path.to_str().unwrap(),
                "--kernel",
                kernel.to_str().unwrap(),
                "--",
                "/bin/true",
            ],
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("`{named}` refused")),
            "{}",
            stderr(&o)
        );
    }
}

/// Boots the busybox image in a VM whose files live in `job`, ready for requests.
fn boot_session(env: &testsupport::VmEnv, job: &Path) -> Vm {
    let image = env.disk_image(job);
    let info = vm::HostInfo::detect();
    let choice = info.auto.clone().expect("a backend");
    let backend = Backend::Qemu(QemuOptions {
        binary: info.qemu.as_ref().unwrap().path.clone(),
        accel: choice.accel,
        sandbox: info.qemu.as_ref().unwrap().sandbox,
    });
    let spec = vm::disk_machine(&env.files(), &image, 256 << 20, 512, 1, job).unwrap();
    let machine = backend.launch(&spec).unwrap();
    Vm::boot(machine, Duration::from_secs(180), vm::refuse_streams()).unwrap()
}

struct Counter {
    n: u64,
    bad: u64,
}

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.n += buf.len() as u64;
        self.bad += buf.iter().filter(|b| **b != 0).count() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One VM, several requests: 50 MiB of stdout through the flow-controlled channel, 50 MiB
/// each way by transfer onto the writable layer (compared by hash), the proxy listener refused cleanly without an
/// egress proxy, a command that cannot start, and a deadline inside the session.
#[test]
fn vm_session_streams_50_mib_and_transfers_50_mib_both_ways() {
    let Some(env) = vm_env() else { return };
    let job = tempfile::tempdir().unwrap();
    let guest = boot_session(&env, job.path());

    // 50 MiB of zeros, in large writes (busybox `yes` writes two bytes per syscall, which
    // under TCG measures the guest CPU rather than the channel).
    let mut out = Counter { n: 0, bad: 0 };
    let mut err = Vec::new();
    let status = guest
        .run(
            &RunSpec::new(["/bin/head", "-c", "52428800", "/dev/zero"]),
            &mut out,
            &mut err,
        )
        .unwrap();
    assert_eq!(status.code, Some(0), "{}", String::from_utf8_lossy(&err));
    assert_eq!((out.n, out.bad), (50 * 1024 * 1024, 0));

    // 50 MiB of incompressible bytes up, hashed in the guest, and back down.
    let up = job.path().join("up.bin");
    let mut data = vec![0u8; 50 * 1024 * 1024];
    openssl::rand::rand_bytes(&mut data).unwrap();
    std::fs::write(&up, &data).unwrap();
    assert_eq!(
        guest.upload(&up, "/data/in/up.bin").unwrap(),
        data.len() as u64
    );
    let mut sum = Vec::new();
    let st = guest
        .run(
            &RunSpec::new(["/bin/sha256sum", "/data/in/up.bin"]),
            &mut sum,
            &mut Vec::new(),
        )
        .unwrap();
    assert_eq!(st.code, Some(0));
    let local_sum = hex_digest(MessageDigest::sha256(), &data);
    assert!(
        String::from_utf8_lossy(&sum).starts_with(&local_sum),
        "guest saw other bytes"
    );
    let down = job.path().join("down.bin");
    assert_eq!(
        guest.download("/data/in/up.bin", &down).unwrap(),
        data.len() as u64
    );
    assert!(std::fs::read(&down).unwrap() == data, "download differs");
    let err = guest
        .download("/tmp/none", &job.path().join("x"))
        .unwrap_err();
    assert!(err.to_string().contains("/tmp/none"), "{err}");

    // The proxy listener exists; with no egress proxy attached the host refuses.
    let mut out = Vec::new();
    let st = guest
        .run(
            &RunSpec::new([
                "/bin/sh",
                "-c",
                "wget -q -O - http://example.com/ 2>&1; echo rc=$?",
            ]),
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(st.code, Some(0));
    assert!(text.contains("502") && text.contains("rc=1"), "{text}");

    let e = guest
        .run(
            &RunSpec::new(["/no/such/program"]),
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/program"), "{e}");

    let mut spec = RunSpec::new(["/bin/sleep", "600"]);
    spec.timeout = Some(Duration::from_secs(2));
    let st = guest.run(&spec, &mut Vec::new(), &mut Vec::new()).unwrap();
    assert!(st.timed_out && st.signal == Some(9), "{st:?}");

    let pid = guest.pid().unwrap();
    guest.shutdown(Duration::from_secs(20)).unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still exists"
    );
}

/// Runs `script` with `/bin/sh -c` in the session: (exit code, stdout, stderr). A dead
/// channel panics naming the script, so the step that broke it is in the failure.
fn sh(guest: &Vm, script: &str) -> (Option<i32>, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = guest
        .run(&RunSpec::new(["/bin/sh", "-c", script]), &mut out, &mut err)
        .unwrap_or_else(|e| panic!("the session broke running `{script}`: {e}"));
    (
        st.code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// Capabilities a payload must not have (bit numbers of `linux/capability.h`).
const DROPPED_CAPS: [(u32, &str); 8] = [
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (22, "CAP_SYS_BOOT"),
    (27, "CAP_MKNOD"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

fn assert_caps_dropped(what: &str, mask: u64) {
    for (bit, name) in DROPPED_CAPS {
        assert_eq!(mask & (1 << bit), 0, "{what} still has {name}: {mask:#x}");
    }
    assert_ne!(mask & 1, 0, "{what} lost CAP_CHOWN too: {mask:#x}");
}

/// One VM, a hostile payload: it looks for a way to the host channel (the virtio-serial
/// port `provider.channel`) through the
/// device node, `mknod`, PID 1's fds, a kernel helper it plants, writable `/sys` and
/// `/proc/sys`, and sprays random bytes at every character device and at PID 1's fds; the
/// session survives and the next command answers. Then the entry point: a requestor's
/// `PATH` cannot pick which program `date` is, and relative or dotted entry points are
/// refused by the guest itself.
#[test]
fn vm_payload_cannot_reach_the_channel_and_path_cannot_pick_the_entry_point() {
    let Some(env) = vm_env() else { return };
    let job = tempfile::tempdir().unwrap();
    let guest = boot_session(&env, job.path());

    // The node is gone, and /dev is not a scratch dir to put a look-alike in.
    let (code, out, err) = sh(&guest, "ls -l /dev/vport* /dev/vd* /dev/hvc*");
    assert_ne!(
        code,
        Some(0),
        "a channel or disk node is visible: {out}{err}"
    );
    let (code, _, err) = sh(&guest, "echo x > /dev/vport0p1");
    assert_ne!(code, Some(0), "writing /dev/vport0p1 succeeded");
    assert!(err.contains("Read-only file system"), "{err}");
    // The port exists to the kernel (sysfs shows it), and cannot be unbound from it.
    let (_, out, _) = sh(
        &guest,
        "cat /sys/class/virtio-ports/*/name;          echo virtio0 > /sys/bus/virtio/drivers/virtio_console/unbind 2>/dev/null || echo unbind refused",
    );
    assert!(
        out.contains("provider.channel") && out.ends_with("unbind refused\n"),
        "{out}"
    );

    // No new device node, not even on a writable (nodev) tmpfs.
    let (code, _, err) = sh(&guest, "mknod /tmp/t c 4 65");
    assert_ne!(code, Some(0));
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, err) = sh(&guest, "mknod /dev/t c 4 65");
    assert_ne!(code, Some(0));
    assert!(err.contains("Read-only file system"), "{err}");

    // PID 1's fds are listed but cannot be reopened or even read as links.
    let (_, out, _) = sh(
        &guest,
        "ls /proc/1/fd | wc -l; for f in /proc/1/fd/*; do \
           if (echo x > $f) 2>/dev/null; then echo opened $f; fi; \
           readlink $f 2>/dev/null && echo readable $f; \
         done; echo done",
    );
    let mut lines = out.lines();
    let n: u32 = lines.next().and_then(|l| l.trim().parse().ok()).unwrap();
    assert!(n >= 3, "PID 1 shows {n} fds: {out}");
    assert_eq!(lines.collect::<Vec<_>>(), ["done"], "{out}");

    // The payload's own fds: nothing of the channel leaked across exec.
    let (_, out, _) = sh(&guest, "for f in /proc/$$/fd/*; do readlink $f; done");
    assert!(!out.contains("vport") && !out.contains("/dev/vd"), "{out}");

    // Capabilities: gone from the bounding set (so from every later exec) and from the
    // kernel's helpers (modprobe, core-dump pipes, request-key run with these).
    let (_, out, _) = sh(
        &guest,
        "grep -E '^Cap(Prm|Eff|Bnd|Inh|Amb)' /proc/self/status; \
         cat /proc/sys/kernel/usermodehelper/bset /proc/sys/kernel/usermodehelper/inheritable",
    );
    let mut lines = out.lines();
    for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = lines.next().unwrap_or_default();
        let hex = line
            .strip_prefix(&format!("{name}:"))
            .unwrap_or_else(|| panic!("{out}"));
        let mask = u64::from_str_radix(hex.trim(), 16).unwrap();
        match name {
            "CapInh" | "CapAmb" => assert_eq!(mask, 0, "{name}: {out}"),
            _ => assert_caps_dropped(name, mask),
        }
    }
    for what in ["usermodehelper/bset", "usermodehelper/inheritable"] {
        let words: Vec<u64> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        assert_eq!(words.len(), 2, "{out}");
        assert_caps_dropped(what, words[0] | (words[1] << 32));
    }

    // A planted modprobe is never run by the kernel (exec of an unknown binary format asks
    // for a module), and kernel settings and sysfs cannot be changed.
    let (_, out, _) = sh(
        &guest,
        "printf '#!/bin/sh\\ngrep CapEff /proc/self/status > /tmp/helper-ran\\n' > /sbin/modprobe; \
         chmod +x /sbin/modprobe; printf '\\377\\377\\377\\377' > /tmp/ff; chmod +x /tmp/ff; \
         /tmp/ff 2>/dev/null; sleep 1; cat /tmp/helper-ran 2>/dev/null; \
         echo /tmp/x > /proc/sys/kernel/modprobe || echo sysctl refused; \
         echo serial8250 > /sys/bus/platform/drivers/serial8250/unbind || echo sysfs refused; \
         mkdir -p /tmp/m; mount -t tmpfs t /tmp/m 2>&1 || echo mount refused",
    );
    // (busybox words EPERM from mount as "permission denied (are you root?)")
    let (head, mount) = out.split_at(out.find("mount").unwrap_or(0));
    assert_eq!(
        head, "sysctl refused\nsysfs refused\n",
        "a kernel helper ran or a setting changed: {out}"
    );
    assert!(
        mount.to_lowercase().contains("permission denied") && mount.ends_with("mount refused\n"),
        "{out}"
    );

    // Random bytes at every character device and at PID 1's fds (ttyS0 and the console
    // only reach the job's log).
    let (code, out, _) = sh(
        &guest,
        "for f in $(find /dev -type c) /proc/1/fd/*; do \
           timeout 2 head -c 4000 /dev/urandom > $f 2>/dev/null; \
         done; echo sprayed",
    );
    assert_eq!((code, out.as_str()), (Some(0), "sprayed\n"));
    let (code, out, _) = sh(&guest, "echo still here");
    assert_eq!((code, out.as_str()), (Some(0), "still here\n"));

    // A bare entry point is looked up in the fixed PATH, not in the requestor's.
    let (code, _, _) = sh(
        &guest,
        "printf '#!/bin/sh\\necho planted\\n' > /tmp/date && chmod +x /tmp/date",
    );
    assert_eq!(code, Some(0));
    let run = |argv: &[&str]| {
        let mut spec = RunSpec::new(argv.iter().copied());
        spec.env = vec![("PATH".into(), "/tmp".into())];
        let (mut out, mut err) = (Vec::new(), Vec::new());
        guest.run(&spec, &mut out, &mut err).map(|st| {
            (
                st.code,
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
            )
        })
    };
    let (code, out, err) = run(&["date", "+%Y"]).unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains("planted"), "PATH=/tmp picked /tmp/date");
    assert!(
        out.trim().parse::<u32>().is_ok(),
        "not the real date: {out}"
    );
    // The requestor's PATH still reaches the command, and absolute paths are its own.
    let (_, out, _) = run(&["sh", "-c", "echo $PATH"]).unwrap();
    assert_eq!(out, "/tmp\n");
    let (_, out, _) = run(&["/tmp/date"]).unwrap();
    assert_eq!(out, "planted\n");
    for (argv0, why) in [
        ("./x", "relative entry point"),
        ("bin/sh", "relative entry point"),
        ("/bin/../tmp/date", "`.` or `..`"),
        ("/bin/echo hi", "whitespace"),
        ("nosuch", "not in the default PATH"),
    ] {
        let e = run(&[argv0]).expect_err(argv0).to_string();
        assert!(e.contains(why) && e.contains(argv0), "{argv0}: {e}");
    }
    let (code, out, _) = sh(&guest, "echo still here");
    assert_eq!((code, out.as_str()), (Some(0), "still here\n"));
    guest.shutdown(Duration::from_secs(20)).unwrap();
}

/// Builds a GVMI with `scripts/make-test-gvmi.sh` (mksquashfs + Golem's trailer), from the
/// busybox rootfs or `rootfs`.
fn make_gvmi(out: &Path, config: &str, comp: &str, rootfs: Option<&Path>) -> bool {
    let mut cmd = Command::new(testsupport::workspace().join("scripts/make-test-gvmi.sh"));
    cmd.arg(out).env("CONFIG", config).env("COMP", comp);
    if let Some(r) = rootfs {
        cmd.env("ROOTFS", r);
    }
    let o = cmd.output().unwrap();
    if !o.status.success() {
        eprintln!(
            "SKIP: make-test-gvmi.sh failed (squashfs-tools?): {}",
            stderr(&o)
        );
    }
    o.status.success()
}

/// A GVMI as Golem builds them (lzo, config in the trailer): its `Env` and `WorkingDir`
/// apply to the command and the command's own `--env` wins; its `Volumes` exist and are
/// writable. Its writable layer is the job's storage: filling it gives ENOSPC inside the VM,
/// the VM goes on, and the layer is gone from the host afterwards.
#[test]
fn a_gvmi_runs_with_its_env_and_working_dir_and_a_full_layer_is_enospc() {
    let Some(env) = vm_env() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gvmi = dir.path().join("app.gvmi");
    let config = r#"{"Env":["GREETING=hello from the image","MODE=image"],"WorkingDir":"/srv/app","Volumes":{"/golem/output":{}},"Cmd":["/bin/sh"]}"#;
    if !make_gvmi(&gvmi, config, "lzo", None) {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let script = "echo \"$GREETING\"; echo \"$MODE\"; pwd; \
                  echo kept > /golem/output/f && cat /golem/output/f; \
                  dd if=/dev/zero of=/fill bs=1M 2>&1 | grep -o 'No space left on device' | head -1; \
                  echo more >> /etc/passwd || echo copy-up-refused; \
                  rm /fill; echo room-again > /after && cat /after";
    let o = provider(
        data.path(),
        &env.agent,
        &[
            "vm",
            "run",
            "--image",
            gvmi.to_str().unwrap(),
            "--mem",
            "256M",
            "--storage",
            "32M",
            "--env",
            "MODE=command",
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello from the image\ncommand\n/srv/app\nkept\nNo space left on device\ncopy-up-refused\nroom-again\n",
        "{}",
        stderr(&o)
    );
    let leftovers: Vec<_> = walk(data.path())
        .into_iter()
        .filter(|p| p.ends_with("upper.img"))
        .collect();
    assert!(leftovers.is_empty(), "writable layers left: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A 1 GiB image (a sparse file in the squashfs, so the test stays small on disk) in a
/// 256 MiB VM: the whole file is read through the read-only disk; the initramfs path would
/// have had to hold it in guest RAM.
#[test]
fn a_one_gib_image_runs_in_a_256_mib_vm() {
    let Some(env) = vm_env() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(&env.image)
        .status()
        .unwrap();
    assert!(st.success());
    let big = std::fs::File::create(root.join("big")).unwrap();
    big.set_len(1 << 30).unwrap();
    {
        use std::os::unix::fs::FileExt;
        big.write_all_at(b"end-marker", (1 << 30) - 10).unwrap();
    }
    drop(big);
    let image = dir.path().join("big.gvmi");
    if !make_gvmi(&image, "{}", "zstd", Some(&root)) {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let o = provider(
        data.path(),
        &env.agent,
        &[
            "vm",
            "run",
            "--image",
            image.to_str().unwrap(),
            "--mem",
            "256M",
            "--storage",
            "32M",
            "--timeout",
            "300s",
            "--",
            "/bin/sh",
            "-c",
            "dd if=/big of=/dev/null bs=1M 2>&1 | tail -1; tail -c 10 /big; echo; grep MemTotal /proc/meminfo",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("1024+0 records out"), "{out}");
    assert!(out.contains("end-marker"), "{out}");
    let kib: u64 = out
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(kib <= 256 * 1024, "MemTotal {kib} kB");
}

/// Images the guest could not mount are refused by the host before any VM starts, naming
/// why: lzma squashfs (no Linux reads it), a truncated squashfs, a file that is neither
/// squashfs nor tarball.
#[test]
fn unmountable_images_are_refused_before_boot_naming_why() {
    let Ok(agent) = testsupport::guest_agent() else {
        eprintln!("SKIP: the guest agent cannot be built here");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello"), b"hello").unwrap();
    let good = dir.path().join("good.sqfs");
    let st = Command::new(vm::rootfs::mksquashfs_binary())
        .arg(&src)
        .arg(&good)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "gzip"])
        .status();
    if !matches!(st, Ok(s) if s.success()) {
        eprintln!("SKIP: no mksquashfs (apt-get install squashfs-tools)");
        return;
    }
    let bytes = std::fs::read(&good).unwrap();
    let mut lzma = bytes.clone();
    lzma[20..22].copy_from_slice(&2u16.to_le_bytes());
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"unused").unwrap();
    std::fs::create_dir(dir.path().join("modules")).unwrap();
    std::fs::write(dir.path().join("modules/order"), b"").unwrap();
    for (name, content, says) in [
        ("lzma.sqfs", lzma, "lzma-compressed"),
        ("short.sqfs", bytes[..200].to_vec(), "truncated"),
        (
            "elf.bin",
            b"\x7fELF and then some bytes".to_vec(),
            "neither a squashfs",
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let data = dir.path().join(format!("data-{name}"));
        let o = provider(
            &data,
            &agent,
            &[
                "vm",
                "run",
                "--vmm",
                "qemu",
                "--image",
                p.to_str().unwrap(),
                "--kernel",
                kernel.to_str().unwrap(),
                "--",
                "/bin/true",
            ],
        );
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{name}: {}", stderr(&o));
        assert!(
            walk(&data).iter().all(|p| !p.ends_with("upper.img")),
            "{name}: a writable layer was made"
        );
    }
}
