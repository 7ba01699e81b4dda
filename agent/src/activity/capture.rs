//! A command's output as a result and a receipt keep it: the first `max` bytes for the
//! requestor, a SHA-256 and a count over every byte.

use std::io::{self, Write};

use openssl::sha::Sha256;

/// Collects one output stream of a command.
pub(crate) struct Capture {
    kept: Vec<u8>,
    max: usize,
    total: u64,
    hasher: Sha256,
}

impl Capture {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            kept: Vec::new(),
            max,
            total: 0,
            hasher: Sha256::new(),
        }
    }

    /// The kept text (UTF-8, lossy), whether bytes were cut, and the hex SHA-256 of all.
    pub(crate) fn finish(self) -> (String, bool, String) {
        let truncated = self.total > self.kept.len() as u64;
        (
            String::from_utf8_lossy(&self.kept).into_owned(),
            truncated,
            hex(&self.hasher.finish()),
        )
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.total += buf.len() as u64;
        let room = self.max.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&buf[..room.min(buf.len())]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&openssl::sha::sha256(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_head_and_hashes_everything() {
        let mut c = Capture::new(4);
        c.write_all(b"hello ").unwrap();
        c.write_all(b"world").unwrap();
        let (text, truncated, hash) = c.finish();
        assert_eq!(text, "hell");
        assert!(truncated);
        assert_eq!(hash, sha256_hex(b"hello world"));

        let (text, truncated, hash) = Capture::new(64).finish();
        assert_eq!((text.as_str(), truncated), ("", false));
        assert_eq!(
            hash,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
