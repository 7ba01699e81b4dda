//! The request loop: commands, transfers, the proxy listener.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use channel::msg::{PROXY_ADDR, PROXY_PURPOSE};
use channel::{ChannelError, ExitStatus, GuestMsg, HostMsg, Mux, Side};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;

use crate::entry::{self, DEFAULT_PATH};
use crate::reaper;

pub fn serve(tty: File) -> Result<(), ChannelError> {
    reaper::start()?;
    let reader = tty.try_clone()?;
    let reader = io::BufReader::with_capacity(64 * 1024, reader);
    let mux = Mux::handshake(Side::Guest, Box::new(reader), Box::new(tty))?;
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    mux.send_msg(&GuestMsg::Ready {
        agent: format!("provider-guest {}", env!("CARGO_PKG_VERSION")),
        kernel,
    })?;
    match TcpListener::bind(PROXY_ADDR) {
        Ok(listener) => {
            let m = mux.clone();
            thread::spawn(move || proxy_listener(m, listener));
        }
        Err(e) => log(&mux, format!("proxy listener on {PROXY_ADDR}: {e}")),
    }
    loop {
        let msg = match mux.recv_msg::<HostMsg>(None) {
            Ok(m) => m,
            Err(ChannelError::Message(e)) => {
                log(&mux, format!("ignored a control message: {e}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        let m = mux.clone();
        match msg {
            HostMsg::Run {
                id,
                argv,
                env,
                cwd,
                timeout_ms,
                stdout,
                stderr,
            } => {
                thread::spawn(move || {
                    let spec = RunSpec {
                        argv,
                        env,
                        cwd,
                        timeout: timeout_ms.map(Duration::from_millis),
                    };
                    let reply = match run(&m, &spec, stdout, stderr) {
                        Ok(status) => GuestMsg::Exited { id, status },
                        Err(error) => GuestMsg::Failed { id, error },
                    };
                    let _ = m.send_msg(&reply);
                });
            }
            HostMsg::Upload {
                id,
                path,
                mode,
                stream,
            } => {
                thread::spawn(move || {
                    let reply = match upload(&m, &path, mode, stream) {
                        Ok(bytes) => GuestMsg::Done { id, bytes },
                        Err(error) => GuestMsg::Failed { id, error },
                    };
                    let _ = m.send_msg(&reply);
                });
            }
            HostMsg::Download { id, path, stream } => {
                thread::spawn(move || {
                    let reply = match download(&m, &path, stream) {
                        Ok(bytes) => GuestMsg::Done { id, bytes },
                        Err(error) => GuestMsg::Failed { id, error },
                    };
                    let _ = m.send_msg(&reply);
                });
            }
            HostMsg::Poweroff => return Ok(()),
        }
    }
}

fn log(mux: &Mux, message: String) {
    eprintln!("provider-guest: {message}");
    let _ = mux.send_msg(&GuestMsg::Log { message });
}

struct RunSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    timeout: Option<Duration>,
}

/// Runs one command in its own process group, streaming its output; on its deadline the
/// whole group is killed. When the command's main process ends, what it left behind in its
/// group is killed too, so no stray process holds the output open.
fn run(mux: &Mux, spec: &RunSpec, stdout: u32, stderr: u32) -> Result<ExitStatus, String> {
    let mut out = mux.stream(stdout).map_err(|e| e.to_string())?;
    let mut err = mux.stream(stderr).map_err(|e| e.to_string())?;
    let Some(program) = spec.argv.first() else {
        return Err("empty command".into());
    };
    // Found in the fixed PATH, not the request's; argv[0] stays as given (busybox applets
    // and programs that look at their name see what the requestor wrote).
    let path = entry::resolve(program)?;
    let mut cmd = Command::new(&path);
    cmd.arg0(program)
        .args(&spec.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("http_proxy", format!("http://{PROXY_ADDR}"))
        .env("https_proxy", format!("http://{PROXY_ADDR}"))
        .env("HTTP_PROXY", format!("http://{PROXY_ADDR}"))
        .env("HTTPS_PROXY", format!("http://{PROXY_ADDR}"))
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: `join_payload_cgroup` and `drop_payload_caps` only make syscalls (async-signal-safe, no allocation),
    // as code between fork and exec must.
    unsafe {
        // First into the payload's pids group (the runtime profile's `pids_max`), while
        // the child still has every capability.
        cmd.pre_exec(crate::limits::join_payload_cgroup);
        cmd.pre_exec(crate::lockdown::drop_payload_caps);
    }
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut child = reaper::spawn(&mut cmd).map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = reaper::pid(&child);
    let mut child_out = child.stdout.take().expect("piped stdout");
    let mut child_err = child.stderr.take().expect("piped stderr");
    let (status, pumped) = thread::scope(|s| {
        let o = s.spawn(|| pump(&mut child_out, &mut out));
        let e = s.spawn(|| pump(&mut child_err, &mut err));
        let mut timed_out = false;
        let status = match reaper::wait(pid.as_raw(), deadline) {
            Some(st) => st,
            None => {
                timed_out = true;
                let _ = killpg(pid, Signal::SIGKILL);
                reaper::wait(pid.as_raw(), None).unwrap_or(WaitStatus::StillAlive)
            }
        };
        // Leftovers of the group would keep the pipes open.
        let _ = killpg(pid, Signal::SIGKILL);
        let pumped = [o.join(), e.join()];
        ((status, timed_out), pumped)
    });
    for p in pumped {
        match p {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("streaming output: {e}")),
            Err(_) => return Err("output pump panicked".into()),
        }
    }
    let (status, timed_out) = status;
    Ok(match status {
        WaitStatus::Exited(_, code) => ExitStatus {
            code: Some(code),
            signal: None,
            timed_out,
        },
        WaitStatus::Signaled(_, sig, _) => ExitStatus {
            code: None,
            signal: Some(sig as i32),
            timed_out,
        },
        _ => ExitStatus {
            code: None,
            signal: None,
            timed_out,
        },
    })
}

/// Copies a pipe into a channel stream, then half-closes the stream.
fn pump(from: &mut impl Read, to: &mut channel::Stream) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
    to.shutdown_write().map_err(io::Error::other)
}

fn upload(mux: &Mux, path: &str, mode: u32, stream: u32) -> Result<u64, String> {
    let mut s = mux.stream(stream).map_err(|e| e.to_string())?;
    let result = (|| -> io::Result<u64> {
        let p = Path::new(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut f = File::create(p)?;
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        let n = io::copy(&mut s, &mut f)?;
        f.sync_all()?;
        Ok(n)
    })();
    result.map_err(|e| {
        let msg = format!("{path}: {e}");
        let _ = s.reset(&msg);
        msg
    })
}

fn download(mux: &Mux, path: &str, stream: u32) -> Result<u64, String> {
    let mut s = mux.stream(stream).map_err(|e| e.to_string())?;
    let result = (|| -> io::Result<u64> {
        let mut f = File::open(path)?;
        if f.metadata()?.is_dir() {
            return Err(io::Error::other("is a directory"));
        }
        let n = io::copy(&mut f, &mut s)?;
        s.shutdown_write().map_err(io::Error::other)?;
        Ok(n)
    })();
    result.map_err(|e| {
        let msg = format!("{path}: {e}");
        let _ = s.reset(&msg);
        msg
    })
}

/// Each connection to `127.0.0.1:3128` becomes a channel stream to the host's egress proxy.
fn proxy_listener(mux: Mux, listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let m = mux.clone();
        thread::spawn(move || {
            if let Err(e) = proxy_conn(&m, tcp) {
                eprintln!("provider-guest: proxy connection: {e}");
            }
        });
    }
}

fn proxy_conn(mux: &Mux, tcp: TcpStream) -> io::Result<()> {
    let mut up = mux.open(PROXY_PURPOSE).map_err(io::Error::other)?;
    let mut down = up.try_clone().map_err(io::Error::other)?;
    let mut tcp_read = tcp.try_clone()?;
    let mut tcp_write = tcp;
    // Guest → host: the client's bytes. Once the host side is gone the rest is read and
    // dropped: closing a socket with unread input sends a reset, and the client would lose
    // the answer (the 502 below) to it.
    let to_host = thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; 32 * 1024];
        let mut forwarding = true;
        loop {
            let n = tcp_read.read(&mut buf)?;
            if n == 0 {
                if forwarding {
                    let _ = up.shutdown_write();
                }
                return Ok(());
            }
            if forwarding && up.write_all(&buf[..n]).is_err() {
                forwarding = false;
                // Draining is bounded: a client that never closes is dropped after this.
                tcp_read.set_read_timeout(Some(Duration::from_secs(10)))?;
            }
        }
    });
    // Host → guest: the proxy's answer. A refusal before any byte becomes a 502 so an HTTP
    // client sees why.
    let mut sent_any = false;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match down.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                sent_any = true;
                tcp_write.write_all(&buf[..n])?;
            }
            Err(e) if !sent_any => {
                let body = format!("egress refused: {e}\n");
                let resp = format!(
                    "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp_write.write_all(resp.as_bytes());
                let _ = tcp_write.shutdown(Shutdown::Write);
                // The socket closes once `to_host` has drained the client's input (it
                // holds the other handle), so the client reads the answer, not a reset.
                return Ok(());
            }
            Err(_) => break,
        }
    }
    let _ = tcp_write.shutdown(Shutdown::Both);
    drop(down);
    let _ = to_host.join();
    Ok(())
}
