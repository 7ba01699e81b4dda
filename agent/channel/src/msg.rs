//! Control messages (JSON on stream 0). The host sends [`HostMsg`], the guest [`GuestMsg`];
//! requests carry an `id` the guest's answers repeat.

use serde::{Deserialize, Serialize};

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMsg {
    /// Run `argv` chrooted in the payload root. Output goes to the host-allocated streams
    /// `stdout` and `stderr` as it is produced; the answer is [`GuestMsg::Exited`] (after
    /// both streams' `Eof`) or [`GuestMsg::Failed`] if it could not start.
    Run {
        id: u64,
        argv: Vec<String>,
        /// Replaces the default environment entry by entry (`PATH`, `HOME`, the proxy
        /// variables); other entries are added.
        env: Vec<(String, String)>,
        /// Working directory inside the payload root.
        cwd: String,
        /// Kill the command (its whole process group) after this many milliseconds.
        timeout_ms: Option<u64>,
        stdout: u32,
        stderr: u32,
    },
    /// Receive a file: the host sends its bytes on `stream` and then `Eof`; the guest
    /// writes them to `path` (created or truncated, parents created) with `mode`.
    /// Answer: [`GuestMsg::Done`] or [`GuestMsg::Failed`].
    Upload {
        id: u64,
        path: String,
        mode: u32,
        stream: u32,
    },
    /// Send a file: the guest writes the bytes of `path` on `stream`, then `Eof`.
    /// Answer: [`GuestMsg::Done`] or [`GuestMsg::Failed`] (after a `Reset` of the stream).
    Download { id: u64, path: String, stream: u32 },
    /// Kill every command, sync and power the VM off. No answer: the channel closes.
    Poweroff,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMsg {
    /// Sent once after the handshake: the guest agent is PID 1, mounts are up, it listens.
    Ready { agent: String, kernel: String },
    /// The command of request `id` ended.
    Exited { id: u64, status: ExitStatus },
    /// A transfer finished; `bytes` moved.
    Done { id: u64, bytes: u64 },
    /// Request `id` failed (could not start, bad path, I/O error).
    Failed { id: u64, error: String },
    /// Something the host should log (no request).
    Log { message: String },
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// The guest killed it at its deadline.
    pub timed_out: bool,
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Where the in-guest proxy's connections are carried: the purpose of their `Open` frames.
pub const PROXY_PURPOSE: &str = "proxy";
/// The address the guest agent's proxy listener binds.
pub const PROXY_ADDR: &str = "127.0.0.1:3128";
