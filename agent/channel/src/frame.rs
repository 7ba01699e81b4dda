//! Frames on the wire: a 9-byte header (payload length `u32` LE, kind `u8`, stream id `u32`
//! LE) and the payload. See `docs/guest-protocol.md`.

use std::io::{self, Read, Write};

/// Largest payload a frame may carry; a longer length is a protocol error (a corrupted or
/// hostile peer cannot make the reader allocate more than this).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 9;

/// What a frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Stream 0: magic `PVCH` and the protocol version (`u16` LE). First frame each way.
    Hello = 1,
    /// Stream 0: one JSON control message.
    Control = 2,
    /// A new stream opened by the sender; the payload names its purpose (UTF-8).
    Open = 3,
    /// Bytes of a stream, within the receiver's window.
    Data = 4,
    /// `u32` LE: the receiver consumed this many more bytes; the sender may send them.
    Window = 5,
    /// The sender will send no more data on this stream (half close).
    Eof = 6,
    /// Abort the stream in both directions; the payload is a reason (UTF-8).
    Reset = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Control,
            3 => Kind::Open,
            4 => Kind::Data,
            5 => Kind::Window,
            6 => Kind::Eof,
            7 => Kind::Reset,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, stream: u32, payload: Vec<u8>) -> Self {
        Self {
            kind,
            stream,
            payload,
        }
    }
}

/// Encodes a frame into `out` (header then payload). Panics only on a caller bug (payload
/// over [`MAX_PAYLOAD`]); the mux never builds such frames.
pub fn encode(kind: Kind, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "frame payload over MAX_PAYLOAD"
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(&stream.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Writes one frame with a single `write_all` (so frames from several threads never
/// interleave when the caller holds the writer's lock).
pub fn write_frame(w: &mut dyn Write, kind: Kind, stream: u32, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    encode(kind, stream, payload, &mut buf);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a header starts.
pub fn read_frame(r: &mut dyn Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "channel closed inside a frame header",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let kind = Kind::from_u8(header[4]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", header[4]),
        )
    })?;
    let stream = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Frame {
        kind,
        stream,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_exact_layout() {
        let mut buf = Vec::new();
        encode(Kind::Data, 7, b"abc", &mut buf);
        assert_eq!(buf, [3, 0, 0, 0, 4, 7, 0, 0, 0, b'a', b'b', b'c']);
        let f = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(f, Frame::new(Kind::Data, 7, b"abc".to_vec()));
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn oversized_unknown_and_truncated_frames_are_errors() {
        let mut big = Vec::new();
        big.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_le_bytes());
        big.extend_from_slice(&[4, 1, 0, 0, 0]);
        let e = read_frame(&mut &big[..]).unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");

        let unknown = [0, 0, 0, 0, 99, 0, 0, 0, 0];
        let e = read_frame(&mut &unknown[..]).unwrap_err();
        assert!(e.to_string().contains("unknown frame kind 99"), "{e}");

        let truncated = [5, 0, 0, 0, 4, 1];
        let e = read_frame(&mut &truncated[..]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
