//! A minimal QMP client (QEMU's JSON machine protocol) on the monitor socket a warm-start
//! QEMU gets as an inherited fd: the capabilities handshake, commands with their answer
//! (events in between are skipped), and `getfd`, which hands QEMU a file descriptor with
//! `SCM_RIGHTS` (how the snapshot's state file reaches a sandboxed QEMU that may not open
//! or spawn anything itself).

use std::io::{self, BufRead, BufReader, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::{json, Value};

/// What went wrong talking to QEMU's monitor.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: QEMU closed its monitor (it exited?)")]
    Closed,
    #[error("QMP: QEMU sent something that is not JSON: {0}")]
    Garbage(String),
    #[error("QMP `{command}` failed: {message}")]
    Command { command: String, message: String },
}

pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Reads the greeting and negotiates capabilities; every later read waits at most
    /// `timeout`.
    pub fn connect(sock: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        sock.set_read_timeout(Some(timeout))?;
        let mut q = Qmp {
            writer: sock.try_clone()?,
            reader: BufReader::new(sock),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Garbage(format!("greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Garbage(line.trim().to_owned()))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut req = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .map_err(|e| QmpError::Garbage(e.to_string()))?;
        req.push(b'\n');
        self.writer.write_all(&req)?;
        self.answer(command)
    }

    fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("(no description)")
                        .to_owned(),
                });
            }
            // An asynchronous event: not the answer.
        }
    }

    /// `getfd`: QEMU keeps `fd` (a duplicate) under `name`, for `migrate fd:NAME`.
    pub fn send_fd(&mut self, name: &str, fd: RawFd) -> Result<(), QmpError> {
        let mut req =
            serde_json::to_vec(&json!({"execute": "getfd", "arguments": {"fdname": name}}))
                .map_err(|e| QmpError::Garbage(e.to_string()))?;
        req.push(b'\n');
        let fds = [fd];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(&req)];
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent != req.len() {
            // The fd went with the first byte; the rest is plain data.
            self.writer.write_all(&req[sent..])?;
        }
        self.answer("getfd")?;
        Ok(())
    }
}
