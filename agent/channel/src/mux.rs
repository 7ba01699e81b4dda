//! The multiplexer: many byte streams and a control queue over one byte stream, with
//! per-stream credit-based flow control.
//!
//! One reader thread per [`Mux`] owns the read half: it decodes frames and files them into
//! per-stream buffers. A stream's buffer never holds more than [`INITIAL_WINDOW`] bytes,
//! because the sender may only send what the receiver has credited (`Window` frames are sent
//! as the application consumes data); a peer that sends beyond its credit is a protocol
//! error and closes the channel. So a fast producer on either side cannot exhaust the other
//! side's memory, and a slow consumer slows the producer down instead.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame, Frame, Kind, MAX_PAYLOAD};
use crate::ChannelError;

/// Protocol version spoken by this build; both sides must speak the same.
pub const VERSION: u16 = 1;
/// First bytes of a `Hello` payload.
pub const MAGIC: &[u8; 4] = b"PVCH";
/// Bytes a sender may have in flight per stream before the receiver credits more.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Credit is returned once this much has been consumed (fewer, larger `Window` frames).
const CREDIT_THRESHOLD: u32 = INITIAL_WINDOW / 4;
/// Streams one side may have open at once; more is a protocol error.
pub const MAX_STREAMS: usize = 4096;

/// Which end of the channel this is. The host allocates odd stream ids, the guest even
/// ones (stream 0 is the control stream), so both can open streams without coordination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

impl Side {
    fn first_id(self) -> u32 {
        match self {
            Side::Host => 1,
            Side::Guest => 2,
        }
    }
    fn owns(self, id: u32) -> bool {
        id != 0 && (id % 2 == 1) == (self == Side::Host)
    }
}

/// A cheap handle to the channel; clones share it.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

struct Inner {
    side: Side,
    writer: Mutex<Box<dyn Write + Send>>,
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Default)]
struct State {
    streams: HashMap<u32, StreamState>,
    control: VecDeque<Vec<u8>>,
    incoming: VecDeque<(u32, String)>,
    closed: Option<String>,
    next_id: u32,
}

struct StreamState {
    recv: VecDeque<Vec<u8>>,
    /// Offset into the front chunk already consumed.
    front_off: usize,
    /// Bytes the peer may still send before we credit more.
    recv_window: u32,
    /// Bytes consumed and not yet credited back.
    unacked: u32,
    recv_eof: bool,
    /// The peer's `Eof` came before any reset: reads end cleanly after the data.
    clean_eof: bool,
    /// Set by a reset from either side: reads and writes fail from then on.
    reset: Option<String>,
    /// The peer reset the stream (it will send nothing more on it).
    peer_reset: bool,
    send_credit: u32,
    sent_eof: bool,
    /// Live [`Stream`] handles (clones share the stream).
    handles: u32,
    dropped: bool,
}

impl StreamState {
    fn new() -> Self {
        Self {
            recv: VecDeque::new(),
            front_off: 0,
            recv_window: INITIAL_WINDOW,
            unacked: 0,
            recv_eof: false,
            clean_eof: false,
            reset: None,
            peer_reset: false,
            send_credit: INITIAL_WINDOW,
            sent_eof: false,
            handles: 0,
            dropped: false,
        }
    }
    fn finished(&self) -> bool {
        self.dropped && (self.recv_eof || self.peer_reset)
    }
}

impl Mux {
    /// Runs the version handshake on `reader`/`writer` and starts the reader thread.
    ///
    /// The guest speaks first (the host cannot know when the guest's serial port is open
    /// and in raw mode, and bytes sent before that would be lost or echoed); the host
    /// answers once it has checked the guest's `Hello`.
    pub fn handshake(
        side: Side,
        mut reader: Box<dyn Read + Send>,
        mut writer: Box<dyn Write + Send>,
    ) -> Result<Mux, ChannelError> {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&VERSION.to_le_bytes());
        if side == Side::Guest {
            write_frame(&mut writer, Kind::Hello, 0, &hello)?;
        }
        let first = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => return Err(ChannelError::Closed("peer closed before its hello".into())),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(ChannelError::Protocol(format!(
                    "the peer's first frame is not a channel hello ({e})"
                )))
            }
            Err(e) => return Err(ChannelError::Io(e)),
        };
        check_hello(&first)?;
        if side == Side::Host {
            write_frame(&mut writer, Kind::Hello, 0, &hello)?;
        }
        let inner = Arc::new(Inner {
            side,
            writer: Mutex::new(writer),
            state: Mutex::new(State {
                next_id: side.first_id(),
                ..State::default()
            }),
            cond: Condvar::new(),
        });
        let bg = inner.clone();
        std::thread::Builder::new()
            .name("channel-reader".into())
            .spawn(move || reader_loop(bg, reader))
            .map_err(ChannelError::Io)?;
        Ok(Mux { inner })
    }

    pub fn side(&self) -> Side {
        self.inner.side
    }

    /// Sends one control message (stream 0).
    pub fn send_control(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(ChannelError::Protocol(format!(
                "control message of {} bytes exceeds {MAX_PAYLOAD}",
                bytes.len()
            )));
        }
        self.inner.send(Kind::Control, 0, bytes)
    }

    /// The next control message; `timeout` bounds the wait.
    pub fn recv_control(&self, timeout: Option<Duration>) -> Result<Vec<u8>, ChannelError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.inner.lock();
        loop {
            if let Some(m) = st.control.pop_front() {
                return Ok(m);
            }
            if let Some(why) = &st.closed {
                return Err(ChannelError::Closed(why.clone()));
            }
            st = self.inner.wait(st, deadline)?;
        }
    }

    /// A new stream id of this side, registered locally; the peer learns of it from a
    /// control message that names it (or from its first `Data`/`Eof`).
    pub fn open_stream(&self) -> Result<Stream, ChannelError> {
        let mut st = self.inner.lock();
        if let Some(why) = &st.closed {
            return Err(ChannelError::Closed(why.clone()));
        }
        let id = st.next_id;
        st.next_id += 2;
        let mut s = StreamState::new();
        s.handles = 1;
        st.streams.insert(id, s);
        Ok(Stream {
            inner: self.inner.clone(),
            id,
        })
    }

    /// Opens a stream and announces it to the peer with an `Open` frame naming `purpose`.
    pub fn open(&self, purpose: &str) -> Result<Stream, ChannelError> {
        let s = self.open_stream()?;
        self.inner.send(Kind::Open, s.id, purpose.as_bytes())?;
        Ok(s)
    }

    /// The next stream the peer opened with [`Mux::open`], and its purpose.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<(Stream, String), ChannelError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.inner.lock();
        loop {
            if let Some((id, purpose)) = st.incoming.pop_front() {
                if let Some(s) = st.streams.get_mut(&id) {
                    s.handles = 1;
                }
                return Ok((
                    Stream {
                        inner: self.inner.clone(),
                        id,
                    },
                    purpose,
                ));
            }
            if let Some(why) = &st.closed {
                return Err(ChannelError::Closed(why.clone()));
            }
            st = self.inner.wait(st, deadline)?;
        }
    }

    /// The handle of a stream the peer named in a control message (one handle per stream).
    pub fn stream(&self, id: u32) -> Result<Stream, ChannelError> {
        if id == 0 {
            return Err(ChannelError::Protocol(
                "stream 0 is the control stream".into(),
            ));
        }
        let mut st = self.inner.lock();
        let n = st.streams.len();
        let entry = match st.streams.get_mut(&id) {
            Some(e) => e,
            None => {
                if n >= MAX_STREAMS {
                    return Err(ChannelError::Protocol("too many streams".into()));
                }
                st.streams.entry(id).or_insert_with(StreamState::new)
            }
        };
        if entry.handles > 0 || entry.dropped {
            return Err(ChannelError::Protocol(format!(
                "stream {id} is already in use"
            )));
        }
        entry.handles = 1;
        Ok(Stream {
            inner: self.inner.clone(),
            id,
        })
    }

    /// Why the channel closed, if it has.
    pub fn closed(&self) -> Option<String> {
        self.inner.lock().closed.clone()
    }

    /// Waits until the channel closes (the peer went away) or `timeout` passes; true if
    /// closed.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.lock();
        while st.closed.is_none() {
            match self.inner.wait(st, Some(deadline)) {
                Ok(g) => st = g,
                Err(_) => return self.inner.lock().closed.is_some(),
            }
        }
        true
    }

    /// Streams currently tracked (for tests and diagnostics).
    pub fn stream_count(&self) -> usize {
        self.inner.lock().streams.len()
    }

    /// Bytes buffered on the receive side across all streams (bounded by the windows).
    pub fn buffered_bytes(&self) -> usize {
        let st = self.inner.lock();
        st.streams
            .values()
            .map(|s| s.recv.iter().map(Vec::len).sum::<usize>() - s.front_off)
            .sum()
    }
}

fn check_hello(f: &Frame) -> Result<(), ChannelError> {
    if f.kind != Kind::Hello || f.stream != 0 || f.payload.len() != 6 || &f.payload[..4] != MAGIC {
        return Err(ChannelError::Protocol(
            "the peer's first frame is not a channel hello".into(),
        ));
    }
    let theirs = u16::from_le_bytes([f.payload[4], f.payload[5]]);
    if theirs != VERSION {
        return Err(ChannelError::Version {
            ours: VERSION,
            theirs,
        });
    }
    Ok(())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        g: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, State>, ChannelError> {
        match deadline {
            None => Ok(self.cond.wait(g).unwrap_or_else(|p| p.into_inner())),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(ChannelError::Timeout);
                }
                Ok(self
                    .cond
                    .wait_timeout(g, d - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0)
            }
        }
    }

    fn send(&self, kind: Kind, stream: u32, payload: &[u8]) -> Result<(), ChannelError> {
        if let Some(why) = &self.lock().closed {
            return Err(ChannelError::Closed(why.clone()));
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = write_frame(&mut *w, kind, stream, payload) {
            drop(w);
            self.close(format!("write failed: {e}"));
            return Err(ChannelError::Io(e));
        }
        Ok(())
    }

    fn close(&self, why: String) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(why);
        }
        drop(st);
        self.cond.notify_all();
    }

    /// Files one frame from the peer; an `Err` is a protocol violation.
    fn on_frame(&self, f: Frame) -> Result<(), String> {
        let mut reply: Option<(Kind, u32, Vec<u8>)> = None;
        {
            let mut st = self.lock();
            match f.kind {
                Kind::Hello => return Err("a second hello".into()),
                Kind::Control => {
                    if f.stream != 0 {
                        return Err("a control frame outside stream 0".into());
                    }
                    st.control.push_back(f.payload);
                }
                Kind::Open => {
                    if self.side.owns(f.stream) || f.stream == 0 {
                        return Err(format!("peer opened stream {} of our id space", f.stream));
                    }
                    if st.streams.contains_key(&f.stream) {
                        return Err(format!("peer reopened stream {}", f.stream));
                    }
                    if st.streams.len() >= MAX_STREAMS {
                        return Err("too many streams".into());
                    }
                    st.streams.insert(f.stream, StreamState::new());
                    let purpose = String::from_utf8_lossy(&f.payload).into_owned();
                    st.incoming.push_back((f.stream, purpose));
                }
                Kind::Data | Kind::Eof => {
                    let n = st.streams.len();
                    let s = match st.streams.get_mut(&f.stream) {
                        Some(s) => s,
                        // Data for one of our own streams that is gone: stale, drop it.
                        None if self.side.owns(f.stream) => return Ok(()),
                        None if f.stream == 0 => return Err("data on stream 0".into()),
                        None if n >= MAX_STREAMS => return Err("too many streams".into()),
                        None => st.streams.entry(f.stream).or_insert_with(StreamState::new),
                    };
                    if s.recv_eof {
                        return Err(format!("frame on stream {} after its eof", f.stream));
                    }
                    if f.kind == Kind::Eof {
                        s.recv_eof = true;
                        s.clean_eof = s.reset.is_none();
                    } else {
                        let len = f.payload.len() as u32;
                        if len > s.recv_window {
                            return Err(format!(
                                "peer sent {len} bytes on stream {} with only {} credited",
                                f.stream, s.recv_window
                            ));
                        }
                        s.recv_window -= len;
                        if s.dropped || (s.reset.is_some() && !s.recv_eof) {
                            // Nobody will read it: credit it straight back.
                            s.recv_window += len;
                            reply = Some((Kind::Window, f.stream, len.to_le_bytes().to_vec()));
                        } else if len > 0 {
                            s.recv.push_back(f.payload);
                        }
                    }
                    if s.finished() {
                        st.streams.remove(&f.stream);
                    }
                }
                Kind::Window => {
                    if f.payload.len() != 4 {
                        return Err("a window frame without a 4-byte credit".into());
                    }
                    let n = u32::from_le_bytes([
                        f.payload[0],
                        f.payload[1],
                        f.payload[2],
                        f.payload[3],
                    ]);
                    if let Some(s) = st.streams.get_mut(&f.stream) {
                        s.send_credit = s
                            .send_credit
                            .checked_add(n)
                            .filter(|c| *c <= INITIAL_WINDOW)
                            .ok_or_else(|| format!("peer over-credited stream {}", f.stream))?;
                    }
                }
                Kind::Reset => {
                    if let Some(s) = st.streams.get_mut(&f.stream) {
                        s.peer_reset = true;
                        if s.reset.is_none() {
                            let why = String::from_utf8_lossy(&f.payload).into_owned();
                            s.reset = Some(if why.is_empty() {
                                "reset by peer".into()
                            } else {
                                why
                            });
                        }
                        if !s.recv_eof {
                            s.recv.clear();
                            s.front_off = 0;
                        }
                        if s.finished() {
                            st.streams.remove(&f.stream);
                        }
                    }
                }
            }
        }
        self.cond.notify_all();
        if let Some((k, id, p)) = reply {
            // A failed write closes the channel; the reader notices on its next read.
            let _ = self.send(k, id, &p);
        }
        Ok(())
    }
}

fn reader_loop(inner: Arc<Inner>, mut reader: Box<dyn Read + Send>) {
    let why = loop {
        match read_frame(&mut reader) {
            Ok(Some(f)) => {
                if let Err(e) = inner.on_frame(f) {
                    break format!("protocol error: {e}");
                }
            }
            Ok(None) => break "the peer closed the channel".to_string(),
            Err(e) => break format!("read failed: {e}"),
        }
    };
    inner.close(why);
}

/// One multiplexed byte stream. `Read` blocks until data, end of stream, a reset or the
/// channel closing; `Write` blocks while the peer's window is full. Dropping the handle
/// sends `Eof` (if not sent) and, if the peer might still be sending, a `Reset` so it stops.
pub struct Stream {
    inner: Arc<Inner>,
    id: u32,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A second handle on the same stream (e.g. one thread reads, another writes). The
    /// stream is closed when the last handle is dropped.
    pub fn try_clone(&self) -> Result<Stream, ChannelError> {
        let mut st = self.inner.lock();
        let s = st
            .streams
            .get_mut(&self.id)
            .ok_or_else(|| ChannelError::Closed("stream is gone".into()))?;
        s.handles += 1;
        Ok(Stream {
            inner: self.inner.clone(),
            id: self.id,
        })
    }

    /// Half-closes: the peer reads end of stream after the data sent so far.
    pub fn shutdown_write(&mut self) -> Result<(), ChannelError> {
        {
            let mut st = self.inner.lock();
            match st.streams.get_mut(&self.id) {
                Some(s) if !s.sent_eof => s.sent_eof = true,
                _ => return Ok(()),
            }
        }
        self.inner.send(Kind::Eof, self.id, &[])
    }

    /// Aborts the stream both ways with a reason the peer sees.
    pub fn reset(&mut self, reason: &str) -> Result<(), ChannelError> {
        {
            let mut st = self.inner.lock();
            if let Some(s) = st.streams.get_mut(&self.id) {
                if s.reset.is_none() {
                    s.reset = Some(format!("reset locally: {reason}"));
                }
                s.recv.clear();
                s.front_off = 0;
            }
        }
        self.inner.cond.notify_all();
        self.inner.send(Kind::Reset, self.id, reason.as_bytes())
    }

    fn io_err(e: ChannelError) -> io::Error {
        match e {
            ChannelError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::ConnectionReset, other.to_string()),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.inner.lock();
        let (n, credit) = loop {
            let closed = st.closed.clone();
            let s = st
                .streams
                .get_mut(&self.id)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream is gone"))?;
            if let Some(front) = s.recv.front() {
                let avail = &front[s.front_off..];
                let n = avail.len().min(buf.len());
                buf[..n].copy_from_slice(&avail[..n]);
                s.front_off += n;
                if s.front_off == front.len() {
                    s.recv.pop_front();
                    s.front_off = 0;
                }
                s.unacked += n as u32;
                let credit = if s.unacked >= CREDIT_THRESHOLD && !s.recv_eof {
                    let c = s.unacked;
                    s.unacked = 0;
                    s.recv_window += c;
                    Some(c)
                } else {
                    None
                };
                break (n, credit);
            }
            // A reset wins over an `Eof` that followed it (a dropped handle sends one).
            if s.clean_eof {
                return Ok(0);
            }
            if let Some(why) = &s.reset {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, why.clone()));
            }
            if s.recv_eof {
                return Ok(0);
            }
            if let Some(why) = closed {
                return Err(Self::io_err(ChannelError::Closed(why)));
            }
            st = self.inner.wait(st, None).map_err(Self::io_err)?;
        };
        drop(st);
        if let Some(c) = credit {
            self.inner
                .send(Kind::Window, self.id, &c.to_le_bytes())
                .map_err(Self::io_err)?;
        }
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.inner.lock();
        let n = loop {
            let closed = st.closed.clone();
            let s = st
                .streams
                .get_mut(&self.id)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream is gone"))?;
            if let Some(why) = &s.reset {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
            }
            if s.sent_eof {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "write after shutdown",
                ));
            }
            if let Some(why) = closed {
                return Err(Self::io_err(ChannelError::Closed(why)));
            }
            if s.send_credit > 0 {
                let n = buf.len().min(MAX_PAYLOAD).min(s.send_credit as usize);
                s.send_credit -= n as u32;
                break n;
            }
            st = self.inner.wait(st, None).map_err(Self::io_err)?;
        };
        drop(st);
        self.inner
            .send(Kind::Data, self.id, &buf[..n])
            .map_err(Self::io_err)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let (send_eof, send_reset) = {
            let mut st = self.inner.lock();
            let Some(s) = st.streams.get_mut(&self.id) else {
                return;
            };
            s.handles = s.handles.saturating_sub(1);
            if s.handles > 0 {
                return;
            }
            s.dropped = true;
            s.recv.clear();
            s.front_off = 0;
            let send_eof = !s.sent_eof;
            s.sent_eof = true;
            let send_reset = !s.recv_eof && s.reset.is_none();
            if s.finished() {
                st.streams.remove(&self.id);
            }
            (send_eof, send_reset)
        };
        if send_eof {
            let _ = self.inner.send(Kind::Eof, self.id, &[]);
        }
        if send_reset {
            let _ = self
                .inner
                .send(Kind::Reset, self.id, b"closed by the reader");
        }
    }
}
