//! The egress bridge: carries each connection the guest opens to its in-VM proxy listener
//! (a blocking channel [`Stream`]) into the job's egress [`Proxy`] (async, on tokio).
//!
//! Per connection: a Unix socket pair; one end becomes a tokio socket served by
//! [`serve_connection`], the other is pumped to and from the channel stream by two blocking
//! threads. End of stream, half-closes and resets cross in both directions:
//!
//! - the guest half-closes → the proxy reads end of stream (`shutdown(Write)`);
//! - the guest resets or the channel dies → the proxy's socket is shut both ways;
//! - the proxy half-closes → the guest reads end of stream (`shutdown_write`);
//! - the proxy is done with the connection (its task ended) → the guest's remaining
//!   direction is reset, so neither pump thread can outlive the proxy's interest in it;
//! - the proxy's socket fails → the guest's stream is reset with the reason.
//!
//! Every connection counts against the job's `max_connections`; beyond it the guest's
//! stream is reset with a reason instead of served. [`EgressBridge::close`] (the job's end)
//! aborts every proxy task, which in turn ends every pump thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use channel::msg::PROXY_PURPOSE;
use channel::Stream;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use egress::{serve_connection, Proxy};
use vm::StreamHandler;

/// Copy buffer per direction: a few frames of the channel at a time.
const PUMP_BUF: usize = 32 * 1024;

/// Connects a job's guest to its egress proxy. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct EgressBridge {
    inner: Arc<Inner>,
}

struct Inner {
    proxy: Arc<Proxy>,
    rt: Handle,
    /// Connections whose threads or task have not all finished yet.
    active: AtomicUsize,
    next_id: AtomicU64,
    /// The proxy task of each live connection, so the job's end can stop them.
    tasks: Mutex<HashMap<u64, AbortHandle>>,
    closed: AtomicBool,
}

impl EgressBridge {
    pub fn new(proxy: Arc<Proxy>, rt: Handle) -> Self {
        Self {
            inner: Arc::new(Inner {
                proxy,
                rt,
                active: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                tasks: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The [`StreamHandler`] to boot the job's VM with.
    pub fn handler(&self) -> StreamHandler {
        let bridge = self.clone();
        Arc::new(move |stream: Stream, purpose: String| bridge.accept(stream, &purpose))
    }

    /// Connections still open (their pump threads or proxy task running).
    pub fn active_connections(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    /// Stops serving: new streams are refused and every live connection's proxy task is
    /// aborted, which ends its pump threads.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let tasks: Vec<AbortHandle> = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, t)| t)
            .collect();
        for t in tasks {
            t.abort();
        }
    }

    /// Serves one stream the guest opened. Never blocks: the work happens on the
    /// connection's own threads and task.
    fn accept(&self, mut stream: Stream, purpose: &str) {
        if purpose != PROXY_PURPOSE {
            let _ = stream.reset(&format!(
                "the host serves only `{PROXY_PURPOSE}` streams, not `{purpose}`"
            ));
            return;
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            let _ = stream.reset("the job is ending; no new egress connections");
            return;
        }
        // Counted before anything is spawned, so a burst cannot overshoot the limit.
        let max = self.inner.proxy.policy().limits().max_connections;
        if self.inner.active.fetch_add(1, Ordering::SeqCst) >= max {
            self.inner.active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.reset(&format!(
                "the job already has {max} egress connections open (its limit)"
            ));
            return;
        }
        if let Err(why) = self.start(stream) {
            tracing::warn!(error = %why, "egress bridge: cannot serve a guest connection");
        }
    }

    fn start(&self, mut stream: Stream) -> Result<(), String> {
        // Each of the three parties (two threads, one task) holds a share of the
        // connection; the last one to finish takes it off the active count.
        let guard = Arc::new(ConnGuard {
            inner: self.inner.clone(),
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
        });
        let setup = (|| -> io::Result<_> {
            let (host_end, proxy_end) = UnixStream::pair()?;
            proxy_end.set_nonblocking(true)?;
            let host_read = host_end.try_clone()?;
            Ok((host_end, host_read, proxy_end))
        })();
        let (host_write, host_read, proxy_end) = match setup {
            Ok(s) => s,
            Err(e) => {
                let _ = stream.reset("the host could not set up the egress connection");
                return Err(format!("socket pair: {e}"));
            }
        };
        let (down_stream, mut spare) = match (stream.try_clone(), stream.try_clone()) {
            (Ok(d), Ok(s)) => (d, s),
            (Err(e), _) | (_, Err(e)) => return Err(format!("clone the guest stream: {e}")),
        };

        // The proxy side. `done` tells the downstream pump that the proxy will read no
        // more (its sender drops when the task ends, however it ends).
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let proxy = self.inner.proxy.clone();
        let task_guard = guard.clone();
        let task = self.inner.rt.spawn(async move {
            let _guard = task_guard;
            let _done = done_tx;
            match tokio::net::UnixStream::from_std(proxy_end) {
                Ok(s) => {
                    if let Err(e) = serve_connection(s, proxy).await {
                        tracing::debug!(error = %e, "egress: a guest connection ended with an error");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "egress bridge: register the socket"),
            }
        });
        // Removed by the last party's guard, which cannot run before this: `guard` is
        // still held here.
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(guard.id, task.abort_handle());
        if self.inner.closed.load(Ordering::SeqCst) {
            // `close` ran between the check in `accept` and the insert above.
            task.abort();
        }

        let up_guard = guard.clone();
        let spawned = std::thread::Builder::new()
            .name("egress-up".into())
            .spawn(move || {
                let _guard = up_guard;
                pump_up(stream, host_write);
            });
        if let Err(e) = spawned {
            task.abort();
            return Err(format!("spawn a thread: {e}"));
        }
        let down_guard = guard;
        std::thread::Builder::new()
            .name("egress-down".into())
            .spawn(move || {
                let _guard = down_guard;
                pump_down(host_read, down_stream, done_rx);
            })
            .map_err(|e| {
                // The up pump may be blocked reading the guest: the reset wakes it.
                task.abort();
                let _ = spare.reset("the host could not serve the egress connection");
                format!("spawn a thread: {e}")
            })?;
        Ok(())
    }
}

/// Takes a connection off the count when its last party finishes.
struct ConnGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.inner.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Guest → proxy.
fn pump_up(mut from: Stream, mut to: UnixStream) {
    let mut buf = vec![0u8; PUMP_BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                // The guest's client half-closed: so does the proxy's view of it.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]) {
                    // The proxy is gone: the guest must stop sending.
                    let _ = from.reset(&format!("the egress proxy closed the connection: {e}"));
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // A reset by the guest or a dead channel: the proxy sees the connection
                // end both ways (and the down pump reads end of stream).
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Proxy → guest; once the proxy has finished with the connection, the guest's other
/// direction is reset so the up pump cannot wait on it forever.
fn pump_down(mut from: UnixStream, mut to: Stream, done: mpsc::Receiver<()>) {
    let mut buf = vec![0u8; PUMP_BUF];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown_write();
                break;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    // The guest reset the stream or the channel died: the proxy must stop.
                    let _ = from.shutdown(Shutdown::Both);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = to.reset(&format!("the egress proxy connection failed: {e}"));
                let _ = from.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    // Waits until the proxy's task has ended (the sender is dropped then), so a proxy that
    // half-closed but still reads (a tunnel whose upstream finished first) keeps getting
    // the guest's bytes until it is done.
    let _ = done.recv();
    // Data and end of stream sent before this reset are kept by the guest; the reset only
    // ends a direction the guest may still be holding open.
    let _ = to.reset("the egress proxy closed the connection");
}

#[cfg(test)]
mod tests {
    //! The bridge between an in-process channel pair (the guest's side played by the test)
    //! and a real proxy with a real upstream on loopback.

    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use channel::{Mux, Side};
    use policies::{Mode, Outbound, WhitelistMatcher};

    use super::*;
    use crate::audit::AuditLog;
    use egress::{AddressPolicy, EgressPolicy, Limits};

    struct Rig {
        guest: Mux,
        bridge: EgressBridge,
        port: u16,
        _rt: tokio::runtime::Runtime,
    }

    /// An upstream answering `hello` to anything, a proxy allowing it, a bridge serving the
    /// host side of a channel pair.
    fn rig(max_connections: usize) -> Rig {
        let port = crate::testsupport::http_server(
            vec![("/big".into(), vec![b'x'; 200_000])],
            Some(b"hello".to_vec()),
            None,
        )
        .port;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let limits = Limits {
            max_connections,
            // Long enough that only the bridge's own propagation can end a test's
            // connections in time.
            idle_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let policy = EgressPolicy::new(
            "bridge-test",
            &Outbound::Urls {
                protocols: vec!["http".into()],
                urls: vec![format!("http://127.0.0.1:{port}/").parse().unwrap()],
            },
            Mode::All,
            &WhitelistMatcher::new(&[]).unwrap(),
            AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
            limits,
        );
        let proxy = Proxy::new(policy, Arc::new(AuditLog::memory()));
        let bridge = EgressBridge::new(proxy, rt.handle().clone());

        let (h, g) = UnixStream::pair().unwrap();
        let guest = std::thread::spawn(move || {
            Mux::handshake(Side::Guest, Box::new(g.try_clone().unwrap()), Box::new(g)).unwrap()
        });
        let host =
            Mux::handshake(Side::Host, Box::new(h.try_clone().unwrap()), Box::new(h)).unwrap();
        let handler = bridge.handler();
        std::thread::spawn(move || {
            while let Ok((s, purpose)) = host.accept(None) {
                handler(s, purpose);
            }
        });
        Rig {
            guest: guest.join().unwrap(),
            bridge,
            port,
            _rt: rt,
        }
    }

    fn settles(bridge: &EgressBridge) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while bridge.active_connections() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn read_all(s: &mut Stream) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    /// The guest never closes its side; once the proxy is done the bridge resets it, so
    /// both pump threads end, and the whole answer arrived before that.
    #[test]
    fn an_answer_crosses_and_the_connection_ends_with_the_proxy() {
        let r = rig(8);
        let mut s = r.guest.open(PROXY_PURPOSE).unwrap();
        let req = format!(
            "GET http://127.0.0.1:{p}/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\nConnection: close\r\n\r\n",
            p = r.port
        );
        s.write_all(req.as_bytes()).unwrap();
        let (got, err) = read_all(&mut s);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("hello"), "{text}");
        assert!(err.is_none(), "{err:?}");
        assert!(
            settles(&r.bridge),
            "a connection outlived the proxy's interest"
        );
        // The guest's write side was reset by the host.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.write_all(b"more").is_ok() {
            assert!(Instant::now() < deadline, "the guest may still write");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Many connections at once, each with a body larger than the channel's window.
    #[test]
    fn concurrent_connections_each_get_their_whole_answer() {
        let r = rig(64);
        let port = r.port;
        let guest = &r.guest;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(move || {
                        let mut st = guest.open(PROXY_PURPOSE).unwrap();
                        let req = format!(
                            "GET http://127.0.0.1:{port}/big HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                        );
                        st.write_all(req.as_bytes()).unwrap();
                        let (got, err) = read_all(&mut st);
                        assert!(err.is_none(), "{err:?}");
                        got.len()
                    })
                })
                .collect();
            for h in handles {
                let n = h.join().unwrap();
                assert!(n > 200_000, "{n}");
            }
        });
        assert!(settles(&r.bridge));
    }

    /// The guest half-closes mid-request: the proxy reads end of stream and gives up; the
    /// guest reads the end and nothing lingers.
    #[test]
    fn a_guest_half_close_reaches_the_proxy() {
        let r = rig(8);
        let mut s = r.guest.open(PROXY_PURPOSE).unwrap();
        s.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0")
            .unwrap();
        let start = Instant::now();
        s.shutdown_write().unwrap();
        let _ = read_all(&mut s);
        assert!(settles(&r.bridge), "the proxy did not see the half-close");
        // Well before the proxy's 60 s idle timeout could have ended it instead.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    /// A guest reset ends the proxy's side at once, not at its idle timeout.
    #[test]
    fn a_guest_reset_reaches_the_proxy() {
        let r = rig(8);
        let mut s = r.guest.open(PROXY_PURPOSE).unwrap();
        s.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r.bridge.active_connections(), 1);
        s.reset("client gave up").unwrap();
        assert!(settles(&r.bridge), "the proxy did not see the reset");
    }

    #[test]
    fn other_purposes_and_connections_over_the_limit_are_refused() {
        let r = rig(1);
        let mut other = r.guest.open("shell").unwrap();
        let (_, err) = read_all(&mut other);
        let err = err.expect("a reset").to_string();
        assert!(err.contains("only `proxy` streams"), "{err}");

        let mut first = r.guest.open(PROXY_PURPOSE).unwrap();
        first
            .write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.bridge.active_connections() == 0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut second = r.guest.open(PROXY_PURPOSE).unwrap();
        let (_, err) = read_all(&mut second);
        let err = err.expect("a reset").to_string();
        assert!(err.contains("egress connections open (its limit)"), "{err}");
        assert_eq!(r.bridge.active_connections(), 1);
    }

    /// The job's end: live connections are cut and new ones refused.
    #[test]
    fn close_ends_live_connections_and_refuses_new_ones() {
        let r = rig(8);
        let mut s = r.guest.open(PROXY_PURPOSE).unwrap();
        s.write_all(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        r.bridge.close();
        assert!(settles(&r.bridge), "close left a connection running");
        let _ = read_all(&mut s);
        let mut late = r.guest.open(PROXY_PURPOSE).unwrap();
        let (_, err) = read_all(&mut late);
        assert!(
            err.expect("a reset")
                .to_string()
                .contains("the job is ending"),
            "a stream after close was served"
        );
    }
}
