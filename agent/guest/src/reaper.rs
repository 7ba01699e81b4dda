//! PID 1 reaps every orphan. One thread waits for any child; statuses of commands the agent
//! started go to whoever waits on them, other zombies are simply reaped.
//!
//! std's `Command::spawn` itself waits for a child whose `exec` failed, so reaping must
//! never race a spawn in progress: the reaper peeks at an exited child without reaping it
//! (`waitid(WNOWAIT)`), then reaps it only while holding the spawn lock, under which
//! [`spawn`] starts and registers a command.

use std::collections::BTreeMap;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

struct Reaper {
    spawn_lock: Mutex<()>,
    /// Registered commands: `None` while running, the status once reaped.
    children: Mutex<BTreeMap<i32, Option<WaitStatus>>>,
    cond: Condvar,
}

static REAPER: Reaper = Reaper {
    spawn_lock: Mutex::new(()),
    children: Mutex::new(BTreeMap::new()),
    cond: Condvar::new(),
};

/// Starts the reaper thread (once, at boot).
pub fn start() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_loop)
        .map(drop)
}

fn reap_loop() {
    let r = &REAPER;
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(peek) => {
                let Some(pid) = peek.pid() else { continue };
                let _spawning = r.spawn_lock.lock().unwrap_or_else(|p| p.into_inner());
                // Err / not final: already reaped by std after a failed exec.
                if let Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) =
                    waitpid(pid, Some(WaitPidFlag::WNOHANG))
                {
                    let mut t = r.children.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(slot) = t.get_mut(&pid.as_raw()) {
                        *slot = Some(status);
                        r.cond.notify_all();
                    }
                }
            }
            Err(Errno::ECHILD) => {
                // No children at all: sleep until a spawn (or a short while, for orphans).
                let t = r.children.lock().unwrap_or_else(|p| p.into_inner());
                let _ = r.cond.wait_timeout(t, Duration::from_millis(200));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Spawns `cmd` and registers it; its status comes from [`wait`].
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let r = &REAPER;
    let _guard = r.spawn_lock.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    r.children
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(child.id() as i32, None);
    r.cond.notify_all();
    Ok(child)
}

/// Waits for registered `pid` until `deadline`; `None` if it is still running then.
pub fn wait(pid: i32, deadline: Option<Instant>) -> Option<WaitStatus> {
    let r = &REAPER;
    let mut t = r.children.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        match t.get(&pid) {
            Some(Some(status)) => {
                let s = *status;
                t.remove(&pid);
                return Some(s);
            }
            Some(None) => {}
            None => return None,
        }
        t = match deadline {
            None => r.cond.wait(t).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return None;
                }
                r.cond
                    .wait_timeout(t, d - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}

/// The pid as nix wants it.
pub fn pid(child: &Child) -> Pid {
    Pid::from_raw(child.id() as i32)
}
