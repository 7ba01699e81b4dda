//! The host↔guest multiplexer (`channel::Mux`), both sides, structure-aware: a sequence of
//! frames from the peer (any kind, any stream id, any payload) interleaved with what the
//! local application does (open, accept, look up, write, half-close, reset, drop streams,
//! send and take control messages).
//!
//! Frames are handed to the mux's reader thread one at a time through a rendezvous
//! channel, so each local action sees the effect of every earlier frame. Checked: no
//! panic, no hang (every local action is non-blocking or bounded), the mux closes on a
//! protocol error or the peer's end, and everything the mux writes is well-formed frames
//! that never exceed the credit the peer gave.
#![no_main]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use channel::frame::{read_frame, Kind, MAX_PAYLOAD};
use channel::{Mux, Side, Stream, INITIAL_WINDOW, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    /// A frame from the peer: kind byte (1..=7 are known), stream id, payload.
    Frame {
        kind: u8,
        stream: u8,
        high: bool,
        payload: Vec<u8>,
    },
    /// A `Window` frame crediting `n` bytes on `stream`.
    Credit {
        stream: u8,
        n: u32,
    },
    /// A `Data` frame of `len` zero bytes on `stream`.
    Data {
        stream: u8,
        len: u16,
    },
    Open {
        purpose: String,
    },
    Accept,
    Lookup {
        stream: u8,
    },
    Write {
        slot: u8,
        len: u16,
    },
    ShutdownWrite {
        slot: u8,
    },
    Reset {
        slot: u8,
    },
    Drop {
        slot: u8,
    },
    SendControl {
        bytes: Vec<u8>,
    },
    RecvControl,
}

#[derive(Debug, Arbitrary)]
struct Input {
    guest: bool,
    /// Send a correct hello first (otherwise the first op's frame must be one).
    hello: bool,
    ops: Vec<Op>,
}

/// The mux's read half: one frame per `recv`, so the fuzz thread knows a frame was
/// processed once the next one is taken.
struct Feed {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for Feed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.buf = next;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&stream.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn id(stream: u8, high: bool) -> u32 {
    if high {
        u32::MAX - u32::from(stream)
    } else {
        u32::from(stream)
    }
}

fuzz_target!(|input: Input| {
    let side = if input.guest { Side::Guest } else { Side::Host };
    let (tx, rx) = sync_channel::<Vec<u8>>(0);
    let sink = Sink::default();
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    let mut ops = input.ops.into_iter().take(64).peekable();
    // The handshake reads the first frame on this thread, so it is queued before.
    let first = if input.hello {
        frame(Kind::Hello as u8, 0, &hello)
    } else {
        match ops.next() {
            Some(Op::Frame {
                kind,
                stream,
                high,
                payload,
            }) => frame(kind, id(stream, high), &payload),
            _ => return,
        }
    };
    let feeder = std::thread::spawn(move || {
        let _ = tx.send(first);
        tx
    });
    let feed = Feed {
        rx,
        buf: Vec::new(),
        at: 0,
    };
    let mux = match Mux::handshake(side, Box::new(feed), Box::new(sink.clone())) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            drop(feeder.join());
            return;
        }
    };
    let tx = feeder.join().expect("feeder");
    let mut streams: Vec<Stream> = Vec::new();
    let mut by_id: HashMap<u32, ()> = HashMap::new();
    for op in ops {
        let sent = match op {
            Op::Frame {
                kind,
                stream,
                high,
                payload,
            } => {
                let payload = &payload[..payload.len().min(MAX_PAYLOAD + 1)];
                Some(frame(kind, id(stream, high), payload))
            }
            Op::Credit { stream, n } => Some(frame(
                Kind::Window as u8,
                u32::from(stream),
                &n.to_le_bytes(),
            )),
            Op::Data { stream, len } => Some(frame(
                Kind::Data as u8,
                u32::from(stream),
                &vec![0; usize::from(len).min(MAX_PAYLOAD)],
            )),
            Op::Open { purpose } => {
                if let Ok(s) = mux.open(&purpose) {
                    by_id.insert(s.id(), ());
                    streams.push(s);
                }
                None
            }
            Op::Accept => {
                if let Ok((s, _)) = mux.accept(Some(Duration::ZERO)) {
                    streams.push(s);
                }
                None
            }
            Op::Lookup { stream } => {
                if let Ok(s) = mux.stream(u32::from(stream)) {
                    streams.push(s);
                }
                None
            }
            Op::Write { slot, len } => {
                // Small writes only: the peer may never credit more, and a write past the
                // window blocks by design. 64 ops of at most 1 KiB stay inside it.
                let n = streams.len();
                if n > 0 {
                    let _ = streams[usize::from(slot) % n].write(&vec![1; usize::from(len) % 1024]);
                }
                None
            }
            Op::ShutdownWrite { slot } => {
                let n = streams.len();
                if n > 0 {
                    let _ = streams[usize::from(slot) % n].shutdown_write();
                }
                None
            }
            Op::Reset { slot } => {
                let n = streams.len();
                if n > 0 {
                    let _ = streams[usize::from(slot) % n].reset("fuzz");
                }
                None
            }
            Op::Drop { slot } => {
                let n = streams.len();
                if n > 0 {
                    streams.swap_remove(usize::from(slot) % n);
                }
                None
            }
            Op::SendControl { bytes } => {
                let _ = mux.send_control(&bytes);
                None
            }
            Op::RecvControl => {
                let _ = mux.recv_control(Some(Duration::ZERO));
                None
            }
        };
        if let Some(bytes) = sent {
            if tx.send(bytes).is_err() {
                break; // the reader stopped: the mux closed
            }
        }
    }
    drop(tx);
    assert!(
        mux.wait_closed(Duration::from_secs(10)),
        "the mux did not close after the peer's end"
    );
    let _ = mux.stream_count();
    assert!(mux.buffered_bytes() <= mux.stream_count().max(1) * INITIAL_WINDOW as usize);
    drop(streams);
    // Everything the mux wrote is a sequence of valid frames, starting with its hello.
    let written = sink.0.lock().unwrap().clone();
    let mut rest = &written[..];
    let mut firstframe = true;
    let mut sent_on: HashMap<u32, u64> = HashMap::new();
    while let Some(f) = read_frame(&mut rest).expect("the mux writes whole frames") {
        if firstframe {
            assert_eq!(f.kind, Kind::Hello);
            firstframe = false;
        }
        if f.kind == Kind::Data {
            *sent_on.entry(f.stream).or_default() += f.payload.len() as u64;
        }
    }
    for (stream, bytes) in sent_on {
        // Without credit from the fuzzed peer beyond the writes' own bound, the mux must
        // not have sent more than the initial window plus what was credited.
        assert!(
            bytes <= u64::from(INITIAL_WINDOW) * 2,
            "stream {stream}: {bytes} bytes sent"
        );
    }
});
