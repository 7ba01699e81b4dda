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

/// What a parked guest (a warm-start snapshot, `provider.warm=1`) writes on the channel
/// port once it is ready to be snapshotted, before any frame: the host snapshots it then.
pub const PARKED_LINE: &[u8] = b"provider-guest parked\n";
/// The longest [`WarmIdentity`] line the guest accepts.
pub const MAX_IDENTITY_LINE: usize = 4096;
/// Bytes of the seed in [`WarmIdentity`].
pub const SEED_BYTES: usize = 64;

/// Host → a restored guest, once, before the channel handshake: one line of JSON ending in
/// `\n`. The guest mixes `seed` into its kernel's entropy pool and reseeds the CRNG, sets
/// the clock, and only then does anything else (so no two jobs restored from one
/// snapshot share random state or a stale clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmIdentity {
    /// [`SEED_BYTES`] bytes from the host's CSPRNG, hex.
    pub seed: String,
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
    /// The job's id (the activity id), for the guest's log.
    pub job_id: String,
    /// The runtime profile's `read_only_rootfs` (a cold boot's `provider.ro=1`): the
    /// snapshot's command line is the same for every job, so it comes here.
    pub read_only: bool,
    /// The runtime profile's guest `pids_max` (a cold boot's `provider.pids=N`).
    pub pids_max: Option<u32>,
}

impl WarmIdentity {
    /// The seed's bytes, checked: exactly [`SEED_BYTES`] bytes of hex.
    pub fn seed_bytes(&self) -> Result<Vec<u8>, String> {
        let s = self.seed.as_bytes();
        if s.len() != SEED_BYTES * 2 {
            return Err(format!(
                "the identity's seed is {} hex digits, not {}",
                s.len(),
                SEED_BYTES * 2
            ));
        }
        let digit = |c: u8| -> Result<u8, String> {
            (c as char)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or_else(|| format!("the identity's seed has a non-hex byte {c:#04x}"))
        };
        s.chunks(2)
            .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
            .collect()
    }

    /// The line the host writes.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("serialising plain strings");
        v.push(b'\n');
        v
    }

    /// Parses the line the guest read (without its `\n`).
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        let id: WarmIdentity = serde_json::from_slice(line)
            .map_err(|e| format!("the warm-start identity is not valid: {e}"))?;
        id.seed_bytes()?;
        if id.pids_max == Some(0) {
            return Err("the warm-start identity's pids_max is 0 (a number from 1)".into());
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_and_a_bad_seed_is_refused() {
        let id = WarmIdentity {
            seed: "ab".repeat(SEED_BYTES),
            unix_nanos: 1_700_000_000_000_000_000,
            job_id: "job-1".into(),
            read_only: true,
            pids_max: Some(64),
        };
        let line = id.to_line();
        assert_eq!(line.last(), Some(&b'\n'));
        let back = WarmIdentity::parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, id);
        assert_eq!(back.seed_bytes().unwrap(), vec![0xab; SEED_BYTES]);
        let short = WarmIdentity {
            seed: "ab".into(),
            ..id.clone()
        };
        assert!(WarmIdentity::parse(&short.to_line()[..])
            .unwrap_err()
            .contains("2 hex digits, not 128"));
        let bad = WarmIdentity {
            seed: "zz".repeat(SEED_BYTES),
            ..id
        };
        assert!(bad.seed_bytes().unwrap_err().contains("non-hex"));
        assert!(WarmIdentity::parse(br#"{"seed":"00","extra":1}"#)
            .unwrap_err()
            .contains("not valid"));
    }
}
