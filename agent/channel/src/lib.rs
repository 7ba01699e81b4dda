//! The host↔guest channel: a framed, multiplexed protocol over one byte stream (the VM's
//! second serial port, `ttyS1`), shared by the host (the `vm` crate) and the guest agent
//! (`provider-guest`). The wire format is documented in `docs/guest-protocol.md`.
//!
//! - [`frame`]: length-prefixed frames with a kind and a stream id;
//! - [`Mux`]: a version handshake, a control queue, many byte streams with credit-based
//!   flow control;
//! - [`msg`]: the JSON control messages.
#![forbid(unsafe_code)]

pub mod frame;
pub mod msg;
mod mux;

pub use msg::{ExitStatus, GuestMsg, HostMsg};
pub use mux::{Mux, Side, Stream, INITIAL_WINDOW, MAGIC, MAX_STREAMS, VERSION};

use std::time::Duration;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("channel protocol error: {0}")]
    Protocol(String),
    #[error("channel protocol version mismatch: this side speaks v{ours}, the peer v{theirs}")]
    Version { ours: u16, theirs: u16 },
    #[error("channel closed: {0}")]
    Closed(String),
    #[error("timed out waiting on the channel")]
    Timeout,
    #[error("bad control message: {0}")]
    Message(String),
}

impl Mux {
    /// Sends a typed control message.
    pub fn send_msg<T: serde::Serialize>(&self, msg: &T) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| ChannelError::Message(e.to_string()))?;
        self.send_control(&bytes)
    }

    /// Receives a typed control message.
    pub fn recv_msg<T: serde::de::DeserializeOwned>(
        &self,
        timeout: Option<Duration>,
    ) -> Result<T, ChannelError> {
        let bytes = self.recv_control(timeout)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ChannelError::Message(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }
}
