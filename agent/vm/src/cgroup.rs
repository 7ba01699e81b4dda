//! A cgroup per job's VMM process, for the limits rlimits cannot give: tasks (`pids`),
//! which `RLIMIT_NPROC` counts per user (and not at all for root), and CPU time (`cpu`),
//! which no rlimit bounds as a rate.
//!
//! Each controller is looked up where the kernel has it: the cgroup v2 hierarchy when the
//! provider's own v2 cgroup lists it in `cgroup.controllers`, else a v1 hierarchy mounted
//! with it (hybrid hosts, like this project's build machines). The job's group is
//! `provider-job-<name>` under the provider's own group in that hierarchy, so a delegated
//! subtree (systemd's `Delegate=`) is used as it is meant to be. On v2 the controllers are
//! enabled in the provider's group's `cgroup.subtree_control`; where that is refused (a
//! group with processes of its own under the no-internal-process rule), the parent's is
//! tried, which is where systemd's `DelegateSubgroup=` puts the delegated controllers.
//!
//! The VMM joins its group between `fork` and `exec` by writing `0` to a `cgroup.procs`
//! opened beforehand ([`JobCgroup::procs_fds`]), so every thread QEMU ever has is counted.
//! The group is removed when the VM is gone; a killed provider's empty groups are removed
//! by the next one ([`sweep`]).
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The prefix of every job group's name.
pub const PREFIX: &str = "provider-job-";

/// Why a job's cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither hierarchy has the controller.
    #[error("no cgroup `{0}` controller is available to the provider (not in its cgroup v2 group's cgroup.controllers, no cgroup v1 hierarchy mounted with it)")]
    NoController(&'static str),
    /// A file of the hierarchy could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError::Io {
        action,
        path,
        source,
    }
}

/// One mounted hierarchy: where it is and which controllers it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// `true` for cgroup2.
    pub v2: bool,
    /// v1: the controllers of the mount's options; v2: empty (read from the group).
    pub controllers: Vec<String>,
}

/// The cgroup hierarchies in a `/proc/self/mountinfo` text.
pub fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // `id parent maj:min root mountpoint options [optional…] - fstype source super`
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rest: Vec<&str> = right.split(' ').collect();
        let (Some(mount), Some(fstype)) = (fields.get(4), rest.first()) else {
            continue;
        };
        let mount = PathBuf::from(unescape(mount));
        match *fstype {
            "cgroup2" => out.push(Hierarchy {
                mount,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => {
                let supers = rest.get(2).copied().unwrap_or("");
                out.push(Hierarchy {
                    mount,
                    v2: false,
                    controllers: supers
                        .split(',')
                        .filter(|o| {
                            !o.contains('=')
                                && !matches!(
                                    *o,
                                    "rw" | "ro"
                                        | "xattr"
                                        | "noprefix"
                                        | "clone_children"
                                        | "cpuset_v2_mode"
                                )
                        })
                        .map(str::to_owned)
                        .collect(),
                });
            }
            _ => {}
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The provider's own group in each hierarchy, from a `/proc/self/cgroup` text:
/// `(controllers, path)`, with `""` as the v2 line's controllers.
pub fn own_groups(proc_cgroup: &str) -> Vec<(String, String)> {
    proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((controllers.to_owned(), path.to_owned()))
        })
        .collect()
}

/// Where a controller lives for this process: the directory of the provider's own group.
fn locate(controller: &'static str) -> Result<(PathBuf, bool), CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
    let own = own_groups(&own);
    let all = hierarchies(&mountinfo);
    if let Some(h) = all.iter().find(|h| h.v2) {
        if let Some((_, path)) = own.iter().find(|(c, _)| c.is_empty()) {
            let dir = h.mount.join(path.trim_start_matches('/'));
            let listed = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            if listed.split_whitespace().any(|c| c == controller) {
                return Ok((dir, true));
            }
        }
    }
    for h in all.iter().filter(|h| !h.v2) {
        if !h.controllers.iter().any(|c| c == controller) {
            continue;
        }
        let path = own
            .iter()
            .find(|(cs, _)| cs.split(',').any(|c| c == controller))
            .map_or("/", |(_, p)| p.as_str());
        return Ok((h.mount.join(path.trim_start_matches('/')), false));
    }
    Err(CgroupError::NoController(controller))
}

/// Whether this process can put a VMM under a `controller` limit: the controller is
/// there, and a group can be made beside the provider's (checked by making one).
pub fn available(controller: &'static str) -> Result<(), CgroupError> {
    let g = JobCgroup::create(
        &format!("probe-{}", std::process::id()),
        &Limits {
            pids_max: (controller == "pids").then_some(u64::MAX),
            cpu_quota_us: (controller == "cpu").then_some(u64::MAX),
        },
    )?;
    g.remove();
    Ok(())
}

/// The limits of one job's group. `u64::MAX` means "the controller, unlimited".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `pids.max`.
    pub pids_max: Option<u64>,
    /// CPU time per [`crate::runtime::CPU_PERIOD_US`].
    pub cpu_quota_us: Option<u64>,
}

/// A job's group, in one or two hierarchies; removed by [`JobCgroup::remove`] or on drop.
#[derive(Debug)]
pub struct JobCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(io_err("write", path))
}

/// On v2, makes sure `dir`'s children may use `controller`: enables it in `dir`'s
/// `cgroup.subtree_control` (a no-op when it is already there).
fn enable_v2(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let on = fs::read_to_string(&path).map_err(io_err("read", &path))?;
    if on.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    write(&path, &format!("+{controller}"))
}

impl JobCgroup {
    /// Makes the group `provider-job-<name>` with `limits` in every hierarchy one of them
    /// needs. Nothing is left behind on failure.
    pub fn create(name: &str, limits: &Limits) -> Result<Self, CgroupError> {
        let mut g = JobCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let mut wanted: Vec<&'static str> = Vec::new();
        if limits.pids_max.is_some() {
            wanted.push("pids");
        }
        if limits.cpu_quota_us.is_some() {
            wanted.push("cpu");
        }
        let mut places: Vec<(PathBuf, bool, Vec<&'static str>)> = Vec::new();
        for c in wanted {
            let (base, v2) = locate(c)?;
            match places.iter_mut().find(|(b, _, _)| *b == base) {
                Some((_, _, cs)) => cs.push(c),
                None => places.push((base, v2, vec![c])),
            }
        }
        for (base, v2, controllers) in places {
            let mut parent = base.clone();
            if v2 {
                let mut enabled = controllers.iter().try_for_each(|c| enable_v2(&base, c));
                if enabled.is_err() {
                    if let Some(up) = base.parent() {
                        if controllers
                            .iter()
                            .try_for_each(|c| enable_v2(up, c))
                            .is_ok()
                        {
                            parent = up.to_owned();
                            enabled = Ok(());
                        }
                    }
                }
                enabled?;
            }
            let dir = parent.join(format!("{PREFIX}{name}"));
            fs::create_dir(&dir).map_err(io_err("create the cgroup", &dir))?;
            g.dirs.push(dir.clone());
            for c in &controllers {
                match (*c, v2) {
                    ("pids", _) => {
                        let v = limits.pids_max.unwrap_or(u64::MAX);
                        let text = if v == u64::MAX {
                            "max".to_owned()
                        } else {
                            v.to_string()
                        };
                        write(&dir.join("pids.max"), &text)?;
                    }
                    ("cpu", true) => {
                        let q = limits.cpu_quota_us.unwrap_or(u64::MAX);
                        let q = if q == u64::MAX {
                            "max".to_owned()
                        } else {
                            q.to_string()
                        };
                        write(
                            &dir.join("cpu.max"),
                            &format!("{q} {}", crate::runtime::CPU_PERIOD_US),
                        )?;
                    }
                    ("cpu", false) => {
                        write(
                            &dir.join("cpu.cfs_period_us"),
                            &crate::runtime::CPU_PERIOD_US.to_string(),
                        )?;
                        let q = limits.cpu_quota_us.unwrap_or(u64::MAX);
                        let q = if q == u64::MAX {
                            "-1".to_owned()
                        } else {
                            q.to_string()
                        };
                        write(&dir.join("cpu.cfs_quota_us"), &q)?;
                    }
                    _ => {}
                }
            }
            let procs = dir.join("cgroup.procs");
            let f = OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(io_err("open", &procs))?;
            g.procs.push(f);
        }
        Ok(g)
    }

    /// The open `cgroup.procs` files: a child that writes `0` to each between `fork` and
    /// `exec` is in the group from its first instruction.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The group's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the process `pid` into the group (for processes not started through
    /// [`Self::procs_fds`]).
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the group, waiting briefly for its last task to be gone (a killed VMM's
    /// threads leave the group as the kernel reaps them).
    pub fn remove(mut self) {
        self.remove_dirs();
    }

    fn remove_dirs(&mut self) {
        self.procs.clear();
        for d in self.dirs.drain(..) {
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Err(e) = fs::remove_dir(&d) {
                if e.kind() == io::ErrorKind::NotFound || Instant::now() >= deadline {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(cgroup = %d.display(), error = %e, "cannot remove a job's cgroup");
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        self.remove_dirs();
    }
}

/// Removes the empty job groups a killed provider left beside this one's (a group with a
/// task in it is busy and stays). Returns how many were removed.
pub fn sweep() -> usize {
    let mut gone = 0;
    for c in ["pids", "cpu"] {
        let Ok((base, _)) = locate(c) else { continue };
        for dir in [Some(base.as_path()), base.parent()].into_iter().flatten() {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().starts_with(PREFIX) && fs::remove_dir(e.path()).is_ok() {
                    gone += 1;
                }
            }
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
28 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
29 25 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
30 1 8:1 / /my\\040dir rw - ext4 /dev/sda1 rw
";

    #[test]
    fn hierarchies_and_own_groups_are_read_from_proc() {
        let h = hierarchies(HYBRID);
        assert_eq!(h.len(), 4);
        assert!(h[0].v2 && h[0].mount == Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(h[1].controllers, vec!["pids"]);
        assert_eq!(h[2].mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h[2].controllers, vec!["cpu", "cpuacct"]);
        assert!(h[3].controllers.is_empty());
        let own = own_groups("8:pids:/svc\n1:cpu,cpuacct:/\n0::/system.slice/p.service\n");
        assert_eq!(own[0], ("pids".into(), "/svc".into()));
        assert_eq!(own[2], ("".into(), "/system.slice/p.service".into()));
    }

    fn root_with(controller: &'static str) -> bool {
        // Making a group beside ours needs root (or a delegated subtree).
        let ok = fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            && locate(controller).is_ok();
        if !ok {
            eprintln!("SKIP: no writable `{controller}` cgroup controller here");
        }
        ok
    }

    /// A fork bomb in a group of 4 tasks: the fifth `fork` fails, and the group is gone
    /// afterwards.
    #[test]
    fn a_pids_group_stops_forks_past_its_limit() {
        if !root_with("pids") {
            return;
        }
        let g = JobCgroup::create(
            &format!("test-pids-{}", std::process::id()),
            &Limits {
                pids_max: Some(4),
                cpu_quota_us: None,
            },
        )
        .unwrap();
        let dirs = g.dirs().to_vec();
        assert_eq!(
            fs::read_to_string(dirs[0].join("pids.max")).unwrap().trim(),
            "4"
        );
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "read _; n=0; for i in 1 2 3 4 5 6 7 8; do sleep 5 & n=$((n+1)); done 2>/dev/null; echo started $n",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        g.add(child.id()).unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // The shell is one task; at most three `sleep`s fit beside it.
        let started = fs::read_to_string(dirs[0].join("pids.events")).unwrap_or_default();
        assert!(
            !out.status.success() || !text.contains("started 8"),
            "eight sleeps started in a group of 4: {text} {started}"
        );
        assert!(
            started.contains("max ") && !started.contains("max 0"),
            "{started}"
        );
        // Kill what is left (the group's own tasks, by pid), then the group can go.
        for pid in fs::read_to_string(dirs[0].join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid.parse().unwrap()),
                nix::sys::signal::SIGKILL,
            );
        }
        g.remove();
        assert!(!dirs[0].exists());
    }

    /// A busy loop under a 10 % quota is throttled (the kernel's own count says so).
    #[test]
    fn a_cpu_group_throttles_past_its_quota() {
        if !root_with("cpu") {
            return;
        }
        let g = JobCgroup::create(
            &format!("test-cpu-{}", std::process::id()),
            &Limits {
                pids_max: None,
                cpu_quota_us: Some(10_000),
            },
        )
        .unwrap();
        let dir = g.dirs()[0].clone();
        let mut child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "read _; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        g.add(child.id()).unwrap();
        drop(child.stdin.take());
        std::thread::sleep(Duration::from_millis(600));
        let _ = child.kill();
        let _ = child.wait();
        let stat = fs::read_to_string(dir.join("cpu.stat")).unwrap();
        let throttled: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(throttled > 0, "{stat}");
        g.remove();
        assert!(!dir.exists());
    }
}
