//! [`Job`]: one agreement's VM from boot to receipt.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use exescript::{Command, Gate};
use tokio::runtime::Handle;

use super::bridge::EgressBridge;
use super::capture::{sha256_hex, Capture};
use super::{transfer, ActivityError, JobConfig, JobSpec};
use crate::audit::AuditLog;
use crate::audit::{self, AuditEvent, JobEvent};
use crate::images::fetch::FetchLimits;
use crate::images::{self, ImageStore};
use crate::store::DataDir;
use egress::{EgressPolicy, Proxy};
use net::codes::Code;
use net::receipt::{CommandRecord, EgressRecord, Receipt, Usage, RECEIPT_VERSION};
use net::wire::{CommandResult, Outcome, Reason};
use vm::{RunSpec, Vm};

/// How long the guest gets to power off before its VM is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long teardown waits for the egress connections' final audit lines.
const EGRESS_DRAIN: Duration = Duration::from_secs(3);

/// A running job: its VM, its egress proxy and gate, and what it has done so far.
pub struct Job {
    spec: JobSpec,
    /// Shared only with [`JobStopper`]s, which hold it weakly.
    vm: Option<Arc<Vm>>,
    /// Why the job is being stopped, once a [`JobStopper`] said so.
    stopping: Arc<Mutex<Option<String>>>,
    gate: Gate,
    proxy: Arc<Proxy>,
    bridge: EgressBridge,
    /// The job's own audit log: keeps its egress records, forwards to `audit`.
    tee: Arc<AuditLog>,
    audit: Arc<AuditLog>,
    rt: Handle,
    dir: PathBuf,
    initramfs: PathBuf,
    /// Keeps the job's image in the cache until the job is gone.
    _lease: images::cache::ImageLease,
    /// The image's `Env` and `WorkingDir` (a GVMI's; empty for a tarball), for `run`.
    image_config: vm::rootfs::ImageConfig,
    manifest_sha256: String,
    image_hash: String,
    backend: &'static str,
    mem_mib: u32,
    cpus: u32,
    command_timeout: Duration,
    max_output_bytes: usize,
    max_transfer_bytes: u64,
    tls: tokio_native_tls::TlsConnector,
    started_at: DateTime<Utc>,
    /// When the VM was launched (for `wall_ms`).
    launched: Instant,
    boot_ms: u64,
    /// How the VM started: `warm (snapshot KEY)` or `cold boot: WHY`.
    start: String,
    /// One batch at a time: the commands of a job run in the order they were sent.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: Vec<CommandRecord>,
    commands_run: u32,
    /// Set once the VM has failed under a command; later batches are refused.
    vm_lost: Option<String>,
}

/// Ends a job from another thread, e.g. while its owner is blocked in [`Job::exec`]: the
/// VM is killed at once, the command running fails (`job-stopped`), the rest of the batch
/// is skipped and later batches are refused. The owner then calls [`Job::terminate`] as
/// usual for the receipt.
#[derive(Clone)]
pub struct JobStopper {
    vm: Weak<Vm>,
    stopping: Arc<Mutex<Option<String>>>,
}

impl JobStopper {
    /// Stops the job; `why` is what its commands and later batches are told. The first
    /// reason given wins.
    pub fn stop(&self, why: &str) {
        {
            let mut s = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
            if s.is_none() {
                *s = Some(why.to_owned());
            }
        }
        if let Some(vm) = self.vm.upgrade() {
            if let Err(e) = vm.kill() {
                tracing::warn!(error = %e, "stopping a job");
            }
        }
    }
}

/// Whether a batch goes on after a command.
enum Next {
    Continue,
    /// Skip the rest with this reason.
    Stop(Reason),
}

impl Job {
    /// Starts the job: manifest, payload, image (verified), initramfs, VM, egress.
    ///
    /// Fails closed: an expired or unparsable manifest, a script that does not compile, a
    /// payload for another platform, an image whose hash differs, or a VM that does not come
    /// up within `boot_timeout` each stop the job before any command can run.
    pub fn start(
        spec: JobSpec,
        config: &JobConfig,
        data: &DataDir,
        audit: Arc<AuditLog>,
        rt: Handle,
    ) -> Result<Job, ActivityError> {
        let started_at = Utc::now();
        check_activity_id(&spec.activity_id)?;
        if started_at >= spec.expires_at {
            return Err(ActivityError::Expired(spec.expires_at));
        }
        let manifest = policies::ReceivedManifest::from_base64(&spec.manifest_base64)?;
        // The verdict checked this at negotiation; the manifest may have expired since.
        manifest.check_time(started_at)?;
        let gate = match manifest.script() {
            Some(script) => exescript::compile(&script.commands, script.match_)?,
            None => Gate::allow_all(),
        };
        let tls = transfer::tls_connector(&config.transfer_ca_files)
            .map_err(ActivityError::TransferTls)?;
        let payload = images::select_payload(&manifest, &policies::Platform::host())?;
        let mut store = ImageStore::for_requestor(
            data,
            FetchLimits {
                addresses: config.addresses.clone(),
                max_bytes: config.max_image_bytes,
                disk_reserve: config.image_disk_reserve,
            },
        );
        store.progress = false;
        store.plain_http = config.plain_http_registries.clone();
        let image = store.fetch_payload(payload)?;
        // Held for the job's life: the cache never evicts an image a job uses.
        let lease = store.lease(&image)?;
        match store.prune(config.image_cache_bytes) {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(
                    evicted = gone.len(),
                    "image cache over its size; evicted the least recently used"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "image cache eviction"),
        }

        let jobs = data.root().join("jobs");
        let dir = jobs.join(&spec.activity_id);
        std::fs::create_dir_all(&jobs).map_err(|source| ActivityError::JobDir {
            path: jobs.clone(),
            source,
        })?;
        // `create_dir`, not `_all`: two jobs must never share a directory.
        std::fs::create_dir(&dir).map_err(|source| ActivityError::JobDir {
            path: dir.clone(),
            source,
        })?;
        let files = vm::GuestFiles {
            kernel: config.kernel.clone(),
            modules: config.modules.clone(),
            agent: config.guest_agent.clone(),
        };
        let machine = images::MachineSize {
            mem_mib: config.mem_mib,
            cpus: config.cpus,
            storage_bytes: config.storage_bytes,
            max_unpacked: config.max_image_bytes,
        };
        let (mut machine_spec, image_config) =
            match images::prepare_machine(&store, &image, &config.backend, &files, machine, &dir) {
                Ok(p) => p,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e.into());
                }
            };
        machine_spec.runtime = config.runtime.clone();
        let initrd = machine_spec.initramfs.clone();

        let tee = Arc::new(AuditLog::tee(audit.clone()));
        let policy = EgressPolicy::new(
            spec.activity_id.clone(),
            &manifest.outbound,
            spec.mode,
            &spec.whitelist,
            config.addresses.clone(),
            config.limits.clone(),
        );
        let proxy = Proxy::new(policy, tee.clone());
        let bridge = EgressBridge::new(proxy.clone(), rt.clone());

        let launched = Instant::now();
        let (booted, start) = launch(config, &machine_spec, &spec.activity_id, &bridge);
        // Once booted the initramfs lives in guest memory; on failure it is of no use.
        let _ = std::fs::remove_file(&initrd);
        let vm = match booted {
            Ok(vm) => vm,
            Err(e) => {
                bridge.close();
                let _ = std::fs::remove_file(dir.join("upper.img"));
                return Err(e.into());
            }
        };
        let job = Job {
            manifest_sha256: sha256_hex(&manifest.json),
            image_hash: payload.hash.clone(),
            backend: vm.backend(),
            boot_ms: launched.elapsed().as_millis() as u64,
            start,
            vm: Some(Arc::new(vm)),
            stopping: Arc::default(),
            gate,
            proxy,
            bridge,
            tee,
            audit,
            rt,
            dir,
            initramfs: initrd,
            _lease: lease,
            image_config,
            mem_mib: config.mem_mib,
            cpus: config.cpus,
            command_timeout: config.command_timeout,
            max_output_bytes: config.max_output_bytes,
            max_transfer_bytes: config.max_transfer_bytes,
            tls,
            started_at,
            launched,
            state: Mutex::new(State::default()),
            spec,
        };
        audit::record(
            &job.audit,
            AuditEvent::Job(JobEvent::Started {
                activity_id: &job.spec.activity_id,
                agreement_id: &job.spec.agreement_id,
                requestor_id: &job.spec.requestor_id,
                manifest_sha256: &job.manifest_sha256,
                image_hash: &job.image_hash,
                backend: job.backend,
                boot_ms: job.boot_ms,
                start: &job.start,
                egress: job.proxy.policy().describe(),
            }),
        );
        Ok(job)
    }

    pub fn activity_id(&self) -> &str {
        &self.spec.activity_id
    }

    /// The job's directory (`<data>/jobs/<activity id>/`; the guest console is
    /// `console.log` in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A handle that can end this job from another thread (see [`JobStopper`]).
    pub fn stopper(&self) -> JobStopper {
        JobStopper {
            vm: self.vm.as_ref().map(Arc::downgrade).unwrap_or_default(),
            stopping: self.stopping.clone(),
        }
    }

    fn stopped(&self) -> Option<String> {
        self.stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Measures the job's usage from now on (see [`super::meter`]).
    pub fn meter(&self) -> super::meter::Meter {
        super::meter::Meter::new(self.vm.as_ref().and_then(|vm| vm.pid()), self.proxy.clone())
    }

    /// The job's egress bridge (for watching its live connections).
    pub fn egress(&self) -> &EgressBridge {
        &self.bridge
    }

    /// Runs a batch (its ExeScript commands, parsed by the caller: see
    /// `exescript::parse_batch`), reporting each command's result through `on_result` as
    /// soon as it ends. Every command passes the gate first; the first one denied, failed
    /// or `terminate` ends the batch, and each later command is reported `skipped`.
    /// Batches of one job run one after the other.
    pub fn exec(
        &self,
        batch_id: &str,
        commands: &[Command],
        on_result: &mut dyn FnMut(CommandResult),
    ) -> Result<(), ActivityError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = self.stopped() {
            return Err(ActivityError::Stopped(why));
        }
        if let Some(why) = &state.vm_lost {
            return Err(ActivityError::VmGone(why.clone()));
        }
        if Utc::now() >= self.spec.expires_at {
            return Err(ActivityError::Expired(self.spec.expires_at));
        }
        let mut stop: Option<Reason> = None;
        for (index, command) in commands.iter().enumerate() {
            let started_at = Utc::now();
            if stop.is_none() {
                if let Some(why) = self.stopped() {
                    stop = Some(Reason::new(
                        Code::JobStopped,
                        format!("not run: the job is ending ({why})"),
                    ));
                }
            }
            let (result, hashes) = match &stop {
                Some(why) => (
                    self.skipped(index, command, why.clone(), started_at),
                    Hashes::empty(),
                ),
                None => {
                    let (result, hashes, next) = self.one(&mut state, index, command, started_at);
                    if let Next::Stop(why) = next {
                        stop = Some(why);
                    }
                    (result, hashes)
                }
            };
            self.record(&mut state, batch_id, &result, hashes);
            on_result(result);
        }
        Ok(())
    }

    /// Judges and runs one command.
    fn one(
        &self,
        state: &mut State,
        index: usize,
        command: &Command,
        started_at: DateTime<Utc>,
    ) -> (CommandResult, Hashes, Next) {
        let rendering = command.render();
        let base = CommandResult {
            index,
            command: rendering.clone(),
            outcome: Outcome::Ok,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            reason: None,
            started_at,
            ended_at: started_at,
        };
        let fail = |outcome: Outcome, reason: Reason, skip_code: Code| {
            let skip = Reason::new(
                skip_code,
                format!(
                    "not run: command {index} (`{rendering}`) {}",
                    reason.message
                ),
            );
            let result = CommandResult {
                outcome,
                reason: Some(reason),
                ended_at: Utc::now(),
                ..base.clone()
            };
            (result, Hashes::empty(), Next::Stop(skip))
        };
        if let Err(denial) = self.gate.check(command) {
            let reason = Reason::new(
                denial.reason.code(),
                format!("`{}` is denied: {}", denial.command, denial.reason),
            );
            return fail(Outcome::Denied, reason, Code::AfterDenied);
        }
        if Utc::now() >= self.spec.expires_at {
            let reason = Reason::new(
                Code::AgreementExpired,
                format!("the agreement expired at {}", self.spec.expires_at),
            );
            return fail(Outcome::Denied, reason, Code::AfterDenied);
        }
        let Some(vm) = &self.vm else {
            // Unreachable while `exec` borrows a live job; kept as a refusal, not a panic.
            let reason = Reason::new(Code::VmError, "the job's VM is gone");
            return fail(Outcome::Failed, reason, Code::AfterFailed);
        };
        match command {
            Command::Deploy(d) => {
                if !d.net.is_empty() || !d.hosts.is_empty() {
                    let reason = Reason::new(
                        Code::DeployUnsupported,
                        "deploy with `net` or `hosts` (virtual networks) is not supported: the VM has no network device, only the egress proxy",
                    );
                    return fail(Outcome::Failed, reason, Code::AfterFailed);
                }
                // The VM was deployed and started by `Job::start`.
                self.ok(base)
            }
            Command::Start(_) | Command::Sign(_) => self.ok(base),
            Command::Terminate(_) => {
                let (r, h, _) = self.ok(base);
                let skip = Reason::new(
                    Code::AfterTerminate,
                    format!("not run: command {index} (`terminate`) ended the batch"),
                );
                (r, h, Next::Stop(skip))
            }
            Command::Run(run) => {
                state.commands_run += 1;
                let mut spec = RunSpec::new(
                    std::iter::once(run.entry_point.clone()).chain(run.args.iter().cloned()),
                );
                // The image's environment first: the command's own entries win.
                spec.env = self.image_config.env.clone();
                spec.env
                    .extend(run.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                if let Some(dir) = &self.image_config.working_dir {
                    spec.cwd = dir.clone();
                }
                let until_expiry = (self.spec.expires_at - Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                spec.timeout = Some(
                    self.command_timeout
                        .min(until_expiry)
                        .max(Duration::from_millis(1)),
                );
                let mut out = Capture::new(self.max_output_bytes);
                let mut err = Capture::new(self.max_output_bytes);
                let status = vm.run(&spec, &mut out, &mut err);
                let (stdout, t_out, stdout_sha256) = out.finish();
                let (stderr, t_err, stderr_sha256) = err.finish();
                let hashes = Hashes {
                    stdout_sha256,
                    stderr_sha256,
                };
                let mut result = CommandResult {
                    stdout,
                    stderr,
                    truncated: t_out || t_err,
                    ended_at: Utc::now(),
                    ..base
                };
                let failure = match status {
                    Ok(st) if st.timed_out => Some(Reason::new(
                        Code::Timeout,
                        format!(
                            "killed after {:?} (the job's command timeout or the agreement's end)",
                            spec.timeout.unwrap_or_default()
                        ),
                    )),
                    Ok(st) => {
                        result.exit_code = Some(st.shell_code());
                        match (st.code, st.signal) {
                            (Some(0), _) => None,
                            (Some(c), _) => {
                                Some(Reason::new(Code::ExitCode, format!("exited with code {c}")))
                            }
                            (None, Some(s)) => {
                                Some(Reason::new(Code::Signal, format!("killed by signal {s}")))
                            }
                            (None, None) => Some(Reason::new(
                                Code::ExitCode,
                                "ended without an exit code or signal",
                            )),
                        }
                    }
                    Err(_) if self.stopped().is_some() => {
                        state.vm_lost = self.stopped();
                        Some(Reason::new(
                            Code::JobStopped,
                            format!(
                                "the job was stopped while this command ran: {}",
                                self.stopped().unwrap_or_default()
                            ),
                        ))
                    }
                    Err(e) => {
                        if matches!(e, vm::VmError::Unresponsive(_) | vm::VmError::Channel(_)) {
                            state.vm_lost = Some(e.to_string());
                        }
                        Some(Reason::new(Code::VmError, e.to_string()))
                    }
                };
                match failure {
                    None => (result, hashes, Next::Continue),
                    Some(reason) => {
                        let skip = Reason::new(
                            Code::AfterFailed,
                            format!(
                                "not run: command {index} (`{}`) failed: {}",
                                result.command, reason.message
                            ),
                        );
                        result.outcome = Outcome::Failed;
                        result.reason = Some(reason);
                        (result, hashes, Next::Stop(skip))
                    }
                }
            }
            Command::Transfer(t) => {
                let plan = match transfer::plan(t) {
                    Ok(p) => p,
                    Err(reason) => return fail(Outcome::Failed, reason, Code::AfterFailed),
                };
                state.commands_run += 1;
                // Removed when dropped, whatever happens to the transfer.
                let moved = tempfile::Builder::new()
                    .prefix(".transfer-")
                    .tempfile_in(&self.dir)
                    .map_err(|e| {
                        Reason::new(
                            Code::TransferFailed,
                            format!("a temporary file in {}: {e}", self.dir.display()),
                        )
                    })
                    .and_then(|tmp| {
                        transfer::fetch(
                            &self.rt,
                            self.proxy.clone(),
                            &self.tls,
                            &plan.url,
                            tmp.path(),
                            self.max_transfer_bytes,
                        )?;
                        vm.upload(tmp.path(), &plan.guest_path)
                            .map_err(|e| Reason::new(Code::TransferFailed, e.to_string()))
                    });
                match moved {
                    Ok(bytes) => {
                        let (mut r, mut h, n) = self.ok(base);
                        r.stdout = format!("{bytes} bytes to {}\n", plan.guest_path);
                        // The receipt's hash is of what the requestor was shown.
                        h.stdout_sha256 = sha256_hex(r.stdout.as_bytes());
                        (r, h, n)
                    }
                    Err(reason) => fail(Outcome::Failed, reason, Code::AfterFailed),
                }
            }
        }
    }

    fn ok(&self, base: CommandResult) -> (CommandResult, Hashes, Next) {
        (
            CommandResult {
                ended_at: Utc::now(),
                ..base
            },
            Hashes::empty(),
            Next::Continue,
        )
    }

    fn skipped(
        &self,
        index: usize,
        command: &Command,
        why: Reason,
        at: DateTime<Utc>,
    ) -> CommandResult {
        CommandResult {
            index,
            command: command.render(),
            outcome: Outcome::Skipped,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            reason: Some(why),
            started_at: at,
            ended_at: at,
        }
    }

    /// Keeps the command for the receipt and writes its audit line.
    fn record(&self, state: &mut State, batch_id: &str, r: &CommandResult, h: Hashes) {
        audit::record(
            &self.audit,
            AuditEvent::Command {
                activity_id: &self.spec.activity_id,
                batch_id,
                index: r.index,
                command: &r.command,
                outcome: r.outcome,
                code: r.reason.as_ref().map(|reason| &reason.code),
                exit_code: r.exit_code,
            },
        );
        state.records.push(CommandRecord {
            batch_id: batch_id.to_owned(),
            index: r.index,
            command: r.command.clone(),
            outcome: r.outcome,
            exit_code: r.exit_code,
            reason: r.reason.clone(),
            started_at: r.started_at,
            ended_at: r.ended_at,
            stdout_sha256: h.stdout_sha256,
            stderr_sha256: h.stderr_sha256,
        });
    }

    /// Ends the job: the VM is powered off (killed if it does not stop within a few
    /// seconds), its egress connections are closed, the initramfs is removed, and the
    /// receipt of everything it did is returned, unsigned (the caller signs it).
    pub fn terminate(mut self, why: &str) -> Receipt {
        self.teardown();
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()));
        let ended_at = Utc::now();
        let egress: Vec<EgressRecord> = self
            .tee
            .records()
            .into_iter()
            .map(|r| EgressRecord {
                time: r.time,
                method: r.method,
                destination: r.destination,
                decision: r.decision,
                rule: r.rule,
                reason: r.reason,
                bytes_up: r.bytes_up,
                bytes_down: r.bytes_down,
            })
            .collect();
        let receipt = Receipt {
            version: RECEIPT_VERSION,
            agreement_id: self.spec.agreement_id.clone(),
            activity_id: self.spec.activity_id.clone(),
            provider_id: self.spec.provider_id.clone(),
            requestor_id: self.spec.requestor_id.clone(),
            manifest_sha256: self.manifest_sha256.clone(),
            image_hash: self.image_hash.clone(),
            backend: self.backend.to_owned(),
            started_at: self.started_at,
            ended_at,
            termination: why.to_owned(),
            commands: state.records,
            egress,
            usage: Usage {
                mem_mib: self.mem_mib,
                cpus: self.cpus,
                wall_ms: self.launched.elapsed().as_millis() as u64,
                boot_ms: self.boot_ms,
                egress_bytes: self.proxy.bytes_used(),
                commands_run: state.commands_run,
            },
            // Filled by the activity service, which knows the agreement's preset.
            charge: None,
            runtime_profile: None,
        };
        audit::record(
            &self.audit,
            AuditEvent::Job(JobEvent::Ended {
                activity_id: &self.spec.activity_id,
                termination: why,
                commands: receipt.commands.len(),
                egress_decisions: receipt.egress.len(),
                wall_ms: receipt.usage.wall_ms,
            }),
        );
        receipt
    }

    /// Stops the VM and the egress bridge and removes the job's temporary files. Safe to
    /// call twice.
    fn teardown(&mut self) {
        if let Some(vm) = self.vm.take() {
            match Arc::try_unwrap(vm) {
                Ok(vm) => {
                    if let Err(e) = vm.shutdown(POWEROFF_GRACE) {
                        tracing::warn!(activity = %self.spec.activity_id, error = %e, "VM teardown");
                    }
                }
                // A stopper is using it this instant: kill it here; it is dropped (and
                // killed again, harmlessly) when the stopper lets go.
                Err(vm) => {
                    if let Err(e) = vm.kill() {
                        tracing::warn!(activity = %self.spec.activity_id, error = %e, "VM teardown");
                    }
                }
            }
        }
        // The channel is closed now, so every pump thread ends; closing the bridge ends
        // the proxy tasks still waiting on an upstream.
        self.bridge.close();
        let deadline = Instant::now() + EGRESS_DRAIN;
        while self.bridge.active_connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.initramfs);
        // The writable layer dies with the VM (it is as large as the job's storage).
        let upper = self.dir.join("upper.img");
        if let Some(used) = vm::upper::allocated(&upper) {
            tracing::info!(activity = %self.spec.activity_id, bytes = used, "writable layer removed");
        }
        let _ = std::fs::remove_file(&upper);
    }
}

impl Drop for Job {
    /// A job dropped without [`Job::terminate`] (a daemon error path) still leaves no VM
    /// behind.
    fn drop(&mut self) {
        if self.vm.is_some() {
            tracing::warn!(activity = %self.spec.activity_id, "job dropped without terminate; tearing its VM down");
            self.teardown();
        }
    }
}

/// Output hashes for the receipt.
struct Hashes {
    stdout_sha256: String,
    stderr_sha256: String,
}

impl Hashes {
    fn empty() -> Self {
        let e = sha256_hex(b"");
        Self {
            stdout_sha256: e.clone(),
            stderr_sha256: e,
        }
    }
}

/// The activity id names a directory: nothing that could climb out of `jobs/`.
/// Starts the job's VM: restored from the warm-start snapshot when a sound one exists,
/// else booted cold. Returns the VM and the line the job's log gets about it. A snapshot
/// that is missing or fails its checks is never used; it is rebuilt in the background
/// once this job's boot is over (so the two do not share the CPUs). A restore that fails
/// before the guest runs falls back to a cold boot.
fn launch(
    config: &JobConfig,
    spec: &vm::MachineSpec,
    activity_id: &str,
    bridge: &EgressBridge,
) -> (Result<Vm, vm::VmError>, String) {
    let cold = |why: String| {
        let vm = config
            .backend
            .launch(spec)
            .and_then(|m| Vm::boot(m, config.boot_timeout, bridge.handler()));
        (vm, why)
    };
    let (warm, opts) = match (&config.warm, &config.backend) {
        (Some(w), vm::Backend::Qemu(o)) => (w, o),
        (None, vm::Backend::Qemu(_)) => return cold("cold boot: warm start is off".into()),
        (_, vm::Backend::Kvm) => {
            return cold("cold boot: warm start needs the QEMU backend".into())
        }
    };
    let result = match warm.choose(spec.mem_mib, spec.cpus) {
        vm::warm::Start::Warm(snap) => match snap.restore(spec, opts, activity_id) {
            Ok((machine, times)) => {
                let line = format!(
                    "warm start: restored snapshot {} in {} ms",
                    snap.key(),
                    times.restore.as_millis()
                );
                let vm = Vm::boot(machine, config.boot_timeout, bridge.handler());
                match &vm {
                    // The agent explained why it stopped (an image that does not mount,
                    // …): this job's doing, not the snapshot's, and no reason for a
                    // requestor's bad image to turn warm start off for everyone.
                    Err(vm::VmError::Boot { setup: Some(_), .. }) | Ok(_) => {}
                    Err(e) => warm.restore_failed(&snap, &e.to_string()),
                }
                (vm, line)
            }
            Err(e) => {
                warm.restore_failed(&snap, &e.to_string());
                // Only the console and QEMU's stderr were written in the job dir; the
                // guest never ran past its parked point, so the disks are untouched.
                cold(format!("cold boot: the restore failed: {e}"))
            }
        },
        vm::warm::Start::Cold(why) => {
            let r = cold(why);
            warm.rebuild_in_background(spec.mem_mib, spec.cpus);
            r
        }
    };
    tracing::info!(activity_id, "{}", result.1);
    result
}

fn check_activity_id(id: &str) -> Result<(), ActivityError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ActivityError::BadActivityId(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon shares a job between its request handlers.
    #[test]
    fn a_job_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Job>();
    }

    #[test]
    fn activity_ids_cannot_leave_the_jobs_dir() {
        for good in ["a1", "act-2026.11_23", &"x".repeat(128)] {
            check_activity_id(good).unwrap();
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(129), "é"] {
            assert!(check_activity_id(bad).is_err(), "{bad:?}");
        }
    }
}
