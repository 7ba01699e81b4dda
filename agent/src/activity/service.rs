//! The activity service: `/provider/activity/1` requests from peers become jobs, one per
//! agreement, each on its own thread, with batches whose results requestors long-poll.
//!
//! [`ActivityService::handle`] answers one request, as `Market::handle` does for the
//! market; the daemon only hands it the requests and runs [`ActivityService::reap_expired`]
//! and, at shutdown, [`ActivityService::terminate_all`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{oneshot, watch};

use libp2p::identity::Keypair;

use super::meter::Meter;
use super::{Job, JobConfig, JobSpec, JobStopper};
use crate::audit::AuditLog;
use crate::audit::{self, AuditEvent};
use crate::market::negotiation::{new_id, Agreement, Market};
use crate::market::pricing::Metered;
use crate::store::DataDir;
use net::receipt::SignedReceipt;
use net::wire::{ActivityRequest, ActivityResponse, Code, CommandResult, Outcome, Reason};

/// Longest a results request waits for news.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A results page stops growing past this many output bytes (the response limit is 16 MiB).
const PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Output kept for one batch's results, all commands together; beyond it results carry no
/// output (marked truncated).
const BATCH_OUTPUT_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Default, Clone)]
struct Progress {
    results: Vec<CommandResult>,
    done: bool,
}

enum JobCmd {
    Exec {
        batch_id: String,
        commands: Vec<exescript::Command>,
        progress: Arc<watch::Sender<Progress>>,
    },
    Terminate {
        why: String,
        reply: Option<oneshot::Sender<Result<SignedReceipt, String>>>,
    },
}

struct Slot {
    peer: String,
    agreement: Arc<Agreement>,
    tx: std::sync::mpsc::Sender<JobCmd>,
    /// Ends the job at once from here, while its thread may be inside a long command.
    stopper: JobStopper,
    batches: Mutex<HashMap<String, Arc<watch::Sender<Progress>>>>,
    /// The job's usage so far.
    meter: Arc<Meter>,
    started_at: chrono::DateTime<Utc>,
}

/// A running job as the operator's status shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunningJob {
    pub activity_id: String,
    pub agreement_id: String,
    pub requestor_id: String,
    pub started_at: chrono::DateTime<Utc>,
    pub grant: crate::market::profile::Grant,
    pub preset: String,
    /// Usage since the VM was ready.
    pub usage: Metered,
    /// What it owes so far under its preset.
    pub amount: String,
    /// Whether a batch is running.
    pub busy: bool,
}

impl Slot {
    fn running(&self) -> bool {
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|b| !b.borrow().done)
    }
}

/// The provider's activities: every live job, and what it needs to start more.
#[derive(Clone)]
pub struct ActivityService {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every job's settings, or why jobs cannot run on this host.
    jobs: Result<JobConfig, String>,
    max_jobs: usize,
    /// Where agreements come from, and are ended when their job is.
    market: Arc<Market>,
    /// Signs receipts.
    identity: Keypair,
    provider_id: String,
    data: DataDir,
    audit: Arc<AuditLog>,
    /// Live jobs by activity id (`None` while the job's VM is starting).
    slots: Mutex<HashMap<String, Option<Arc<Slot>>>>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Arc<Slot>>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ActivityService {
    /// `jobs` is every job's settings, or why this host cannot run them (then demands are
    /// still judged, and `create` answers `no-backend` with the reason). At most
    /// `max_jobs` run at once.
    pub fn new(
        jobs: Result<JobConfig, String>,
        max_jobs: usize,
        market: Arc<Market>,
        identity: Keypair,
        data: DataDir,
        audit: Arc<AuditLog>,
    ) -> Self {
        let provider_id = identity.public().to_peer_id().to_string();
        Self {
            inner: Arc::new(Inner {
                jobs,
                max_jobs,
                market,
                identity,
                provider_id,
                data,
                audit,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Answers one activity request from `peer`.
    pub async fn handle(&self, peer: &str, request: ActivityRequest) -> ActivityResponse {
        handle(&self.inner, peer, request).await
    }

    /// Ends jobs whose agreement expired (their receipts are stored, not sent); runs until
    /// dropped.
    pub async fn reap_expired(&self) {
        reap_expired(&self.inner).await
    }

    /// The jobs running now (those still starting are not listed).
    pub fn running(&self) -> Vec<RunningJob> {
        let slots: Vec<(String, Arc<Slot>)> = self
            .inner
            .lock()
            .iter()
            .filter_map(|(id, s)| s.clone().map(|s| (id.clone(), s)))
            .collect();
        let mut jobs: Vec<RunningJob> = slots
            .into_iter()
            .map(|(id, s)| {
                let usage = s.meter.sample();
                RunningJob {
                    activity_id: id,
                    agreement_id: s.agreement.id.clone(),
                    requestor_id: s.peer.clone(),
                    started_at: s.started_at,
                    grant: s.agreement.grant,
                    preset: s.agreement.preset.name.clone(),
                    amount: s.agreement.preset.charge(&usage).amount,
                    usage,
                    busy: s.running(),
                }
            })
            .collect();
        jobs.sort_by_key(|a| a.started_at);
        jobs
    }

    /// Terminates every job and waits for their receipts; returns how many ended.
    pub async fn terminate_all(&self, why: &str) -> usize {
        terminate_all(&self.inner, why).await
    }
}

fn error(code: impl Into<Code>, message: impl Into<String>) -> ActivityResponse {
    ActivityResponse::Error {
        reason: Reason::new(code, message),
    }
}

/// The activity `id` if `peer` owns it. Another peer learns nothing about it.
fn slot(shared: &Inner, id: &str, peer: &str) -> Result<Arc<Slot>, ActivityResponse> {
    match shared.lock().get(id) {
        Some(Some(s)) if s.peer == peer => Ok(s.clone()),
        Some(None) => Err(error(
            Code::ActivityStarting,
            format!("activity {id} is still starting"),
        )),
        _ => Err(error(
            Code::UnknownActivity,
            format!("no activity {id} for peer {peer} (never created, terminated, or expired)"),
        )),
    }
}

async fn handle(shared: &Arc<Inner>, peer: &str, request: ActivityRequest) -> ActivityResponse {
    match request {
        ActivityRequest::Create { agreement_id } => create(shared, peer, &agreement_id).await,
        ActivityRequest::Exec { activity_id, batch } => {
            let slot = match slot(shared, &activity_id, peer) {
                Ok(s) => s,
                Err(e) => return e,
            };
            // Parsed here, once: the job gets the commands, not the JSON.
            let commands = match exescript::parse_batch(&batch.to_string()) {
                Ok(commands) => commands,
                Err(e) => {
                    return error(
                        policies::Code::ScriptInvalid,
                        format!("the batch is not valid ExeScript: {e}"),
                    )
                }
            };
            if slot.running() {
                return error(
                    Code::BatchRunning,
                    "a batch of this activity is still running; wait for its results first",
                );
            }
            let batch_id = new_id();
            let progress = Arc::new(watch::channel(Progress::default()).0);
            {
                // Results are kept until the next batch starts: a requestor reads a batch
                // before it sends the next, and the daemon's memory stays bounded by one
                // batch per job.
                let mut batches = slot.batches.lock().unwrap_or_else(|p| p.into_inner());
                batches.clear();
                batches.insert(batch_id.clone(), progress.clone());
            }
            let sent = slot.tx.send(JobCmd::Exec {
                batch_id: batch_id.clone(),
                commands,
                progress,
            });
            match sent {
                Ok(()) => ActivityResponse::BatchStarted { batch_id },
                Err(_) => error(
                    Code::ActivityEnded,
                    format!("activity {activity_id} has ended"),
                ),
            }
        }
        ActivityRequest::GetResults {
            activity_id,
            batch_id,
            from,
            wait_ms,
        } => {
            let slot = match slot(shared, &activity_id, peer) {
                Ok(s) => s,
                Err(e) => return e,
            };
            let progress = slot
                .batches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&batch_id)
                .cloned();
            let Some(progress) = progress else {
                return error(
                    Code::UnknownBatch,
                    format!("no batch {batch_id} in activity {activity_id}"),
                );
            };
            let mut rx = progress.subscribe();
            let wait = Duration::from_millis(wait_ms).min(MAX_WAIT);
            let _ =
                tokio::time::timeout(wait, rx.wait_for(|p| p.done || p.results.len() > from)).await;
            let p = rx.borrow();
            let mut page = Vec::new();
            let mut bytes = 0;
            for r in p.results.iter().skip(from) {
                bytes += r.stdout.len() + r.stderr.len();
                if !page.is_empty() && bytes > PAGE_BYTES {
                    break;
                }
                page.push(r.clone());
            }
            let done = p.done && from + page.len() >= p.results.len();
            ActivityResponse::Results {
                results: page,
                done,
            }
        }
        ActivityRequest::Terminate { activity_id } => {
            let slot = match slot(shared, &activity_id, peer) {
                Ok(s) => s,
                Err(e) => return e,
            };
            shared.lock().remove(&activity_id);
            match terminate(&slot, "terminated by the requestor").await {
                Ok(receipt) => ActivityResponse::Terminated {
                    receipt: Box::new(receipt),
                },
                Err(e) => error(Code::TerminateFailed, e),
            }
        }
    }
}

/// Ends the job and waits for its receipt. A running batch is cut short (its command
/// fails, the rest are skipped) rather than waited out: the requestor asked to stop, the
/// agreement ran out, or the daemon is going down.
async fn terminate(slot: &Slot, why: &str) -> Result<SignedReceipt, String> {
    if slot.running() {
        slot.stopper.stop(why);
    }
    let (tx, rx) = oneshot::channel();
    slot.tx
        .send(JobCmd::Terminate {
            why: why.into(),
            reply: Some(tx),
        })
        .map_err(|_| "the job had already ended".to_string())?;
    rx.await
        .map_err(|_| "the job ended without a receipt".to_string())?
}

async fn create(shared: &Arc<Inner>, peer: &str, agreement_id: &str) -> ActivityResponse {
    let agreement = match shared.market.agreement(agreement_id, peer, Utc::now()) {
        Ok(a) => a,
        Err(reason) => return ActivityResponse::Error { reason },
    };
    let mut cfg = match &shared.jobs {
        Ok(c) => c.clone(),
        Err(why) => {
            return error(
                Code::NoBackend,
                format!("this provider cannot run VMs right now: {why}"),
            )
        }
    };
    // The VM is the agreement's share of the hardware profile, a hard limit.
    cfg.mem_mib = agreement.grant.mem_mib();
    cfg.cpus = agreement.grant.cpu_threads;
    cfg.storage_bytes = agreement.grant.storage_bytes();
    // What the VM is confined by: the offered preset's runtime profile.
    cfg.runtime = shared.market.runtime().limits();
    if let Err(reason) = shared.market.hold_capacity(&agreement, Utc::now()) {
        return ActivityResponse::Error { reason };
    }
    let activity_id = new_id();
    {
        let mut slots = shared.lock();
        if slots
            .values()
            .flatten()
            .any(|s| s.agreement.id == agreement.id)
        {
            return error(
                Code::ActivityExists,
                format!("agreement {agreement_id} already has an activity"),
            );
        }
        if slots.len() >= shared.max_jobs {
            return error(
                Code::Busy,
                format!(
                    "this provider runs {} jobs, its limit; try again later",
                    slots.len()
                ),
            );
        }
        slots.insert(activity_id.clone(), None);
    }
    let asked = std::time::Instant::now();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    let spec = JobSpec {
        activity_id: activity_id.clone(),
        agreement_id: agreement.id.clone(),
        provider_id: shared.provider_id.clone(),
        requestor_id: peer.to_owned(),
        manifest_base64: agreement.manifest_base64.clone(),
        mode: agreement
            .matched_rule
            .as_ref()
            .map_or(policies::Mode::None, |r| r.mode()),
        whitelist: agreement.whitelist.clone(),
        expires_at: agreement.expires_at,
    };
    let thread = {
        let shared = shared.clone();
        let agreement = agreement.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("job-{}", &activity_id[..8]))
            .spawn(move || job_thread(shared, spec, agreement, cfg, rt, (ready_tx, asked), rx))
    };
    if let Err(e) = thread {
        shared.lock().remove(&activity_id);
        shared.market.release_capacity(&agreement.id);
        return error(Code::Internal, format!("cannot start a job thread: {e}"));
    }
    match ready_rx.await {
        Ok(Ok((stopper, meter))) => {
            shared.lock().insert(
                activity_id.clone(),
                Some(Arc::new(Slot {
                    peer: peer.to_owned(),
                    agreement,
                    tx,
                    stopper,
                    batches: Mutex::new(HashMap::new()),
                    meter,
                    started_at: Utc::now(),
                })),
            );
            ActivityResponse::Created { activity_id }
        }
        Ok(Err(reason)) => {
            shared.lock().remove(&activity_id);
            shared.market.release_capacity(&agreement.id);
            ActivityResponse::Error { reason }
        }
        Err(_) => {
            shared.lock().remove(&activity_id);
            shared.market.release_capacity(&agreement.id);
            error(
                Code::JobStartFailed,
                "the job thread ended before the VM was ready",
            )
        }
    }
}

/// Where a job's thread says that its VM is ready (or why it is not).
type Ready = oneshot::Sender<Result<(JobStopper, Arc<Meter>), Reason>>;

/// Owns one job from VM start to receipt.
fn job_thread(
    shared: Arc<Inner>,
    spec: JobSpec,
    agreement: Arc<Agreement>,
    cfg: JobConfig,
    rt: tokio::runtime::Handle,
    // Told when the VM is ready; the create request's time, for the start latency.
    (ready, asked): (Ready, std::time::Instant),
    rx: std::sync::mpsc::Receiver<JobCmd>,
) {
    let activity_id = spec.activity_id.clone();
    let agreement_id = spec.agreement_id.clone();
    let job = match Job::start(spec, &cfg, &shared.data, shared.audit.clone(), rt) {
        Ok(job) => job,
        Err(e) => {
            let reason = e.public_reason();
            // The operator's audit line has the whole error; the requestor gets the code
            // and a message without the host's paths or socket errors.
            audit::record(
                &shared.audit,
                AuditEvent::ActivityFailed {
                    activity_id: &activity_id,
                    agreement_id: &agreement_id,
                    code: &reason.code,
                    error: format!("{e:#}"),
                },
            );
            let _ = ready.send(Err(reason));
            return;
        }
    };
    audit::record(
        &shared.audit,
        AuditEvent::ActivityCreated {
            activity_id: &activity_id,
            agreement_id: &agreement_id,
            start_ms: asked.elapsed().as_millis() as u64,
            runtime_profile: &shared.market.runtime().name,
        },
    );
    // The job's directory says what it runs under, beside its console log.
    let mut rp = serde_json::to_value(shared.market.runtime()).expect("a profile serializes");
    rp["name"] = shared.market.runtime().name.clone().into();
    let rp_path = job.dir().join("runtime-profile.json");
    if let Err(e) = crate::store::atomic_write(
        &rp_path,
        &serde_json::to_vec_pretty(&rp).expect("JSON serializes"),
    ) {
        tracing::warn!(path = %rp_path.display(), error = %e, "cannot record the runtime profile");
    }
    // Metering starts with the guest agent ready: the boot is not the requestor's.
    let meter = Arc::new(job.meter());
    if ready.send(Ok((job.stopper(), meter.clone()))).is_err() {
        // The requestor's request went away while the VM booted: nobody holds this job.
        let _ = finish(
            &shared,
            job,
            &agreement,
            &meter,
            "the create request was abandoned",
        );
        return;
    }
    let mut why = "the provider dropped the job".to_string();
    let mut reply = None;
    for cmd in rx.iter() {
        match cmd {
            JobCmd::Exec {
                batch_id,
                commands,
                progress,
            } => {
                let mut kept = 0usize;
                let mut sink = |mut r: CommandResult| {
                    // Each command's output is already cut at `max_output`; a batch of many
                    // commands is cut as a whole too, so one job cannot fill the daemon's
                    // memory. The receipt's hashes still cover every byte.
                    kept += r.stdout.len() + r.stderr.len();
                    if kept > BATCH_OUTPUT_BYTES {
                        r.stdout.clear();
                        r.stderr.clear();
                        r.truncated = true;
                    }
                    progress.send_modify(|p| p.results.push(r))
                };
                let outcome = job.exec(&batch_id, &commands, &mut sink);
                progress.send_modify(|p| {
                    if let Err(e) = &outcome {
                        fill_failed(&mut p.results, commands.len(), &format!("{e:#}"));
                    }
                    p.done = true;
                });
            }
            JobCmd::Terminate { why: w, reply: r } => {
                why = w;
                reply = r;
                break;
            }
        }
    }
    let receipt = finish(&shared, job, &agreement, &meter, &why);
    if let Some(reply) = reply {
        let _ = reply.send(receipt);
    }
}

/// When the job itself failed mid-batch, the commands without a result get one: the first
/// failed with the job's error, the rest skipped.
fn fill_failed(results: &mut Vec<CommandResult>, len: usize, error: &str) {
    let now = Utc::now();
    let mut first = true;
    for index in results.len()..len {
        let (outcome, reason) = if first {
            (Outcome::Failed, Reason::new(Code::JobFailed, error))
        } else {
            (
                Outcome::Skipped,
                Reason::new(Code::Skipped, "an earlier command of the batch failed"),
            )
        };
        first = false;
        results.push(CommandResult {
            index,
            command: String::new(),
            outcome,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            reason: Some(reason),
            started_at: now,
            ended_at: now,
        });
    }
}

/// Tears the job down, signs and stores its receipt, with the usage and the amount due.
fn finish(
    shared: &Inner,
    job: Job,
    agreement: &Agreement,
    meter: &Meter,
    why: &str,
) -> Result<SignedReceipt, String> {
    // Before the teardown, while the VMM process can still be read.
    let usage = meter.sample();
    let mut receipt = job.terminate(why);
    receipt.charge = Some(agreement.preset.charge(&usage));
    receipt.runtime_profile = Some(shared.market.runtime().name.clone());
    let activity_id = receipt.activity_id.clone();
    shared.market.end_agreement(&receipt.agreement_id);
    let signed = SignedReceipt::sign(receipt, &shared.identity).map_err(|e| e.to_string())?;
    let dir = shared.data.root().join("receipts");
    let path = dir.join(format!("{activity_id}.json"));
    let written = std::fs::create_dir_all(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec_pretty(&signed).map_err(|e| e.to_string()))
        .and_then(|bytes| crate::store::atomic_write(&path, &bytes).map_err(|e| e.to_string()));
    if let Err(e) = &written {
        tracing::error!(path = %path.display(), error = %e, "cannot store the receipt");
    }
    audit::record(
        &shared.audit,
        AuditEvent::ActivityTerminated {
            activity_id: &activity_id,
            agreement_id: &signed.receipt.agreement_id,
            why,
            receipt: &path,
        },
    );
    Ok(signed)
}

async fn reap_expired(shared: &Inner) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Utc::now();
        let expired: Vec<Arc<Slot>> = {
            let mut slots = shared.lock();
            let ids: Vec<String> = slots
                .iter()
                .filter_map(|(id, s)| {
                    s.as_ref()
                        .filter(|s| s.agreement.expires_at <= now)
                        .map(|_| id.clone())
                })
                .collect();
            ids.iter()
                .filter_map(|id| slots.remove(id).flatten())
                .collect()
        };
        for slot in expired {
            tracing::info!(agreement = %slot.agreement.id, "agreement expired: terminating its job");
            slot.stopper.stop("the agreement expired");
            let _ = slot.tx.send(JobCmd::Terminate {
                why: "the agreement expired".into(),
                reply: None,
            });
        }
    }
}

async fn terminate_all(shared: &Inner, why: &str) -> usize {
    let slots: Vec<Arc<Slot>> = shared.lock().drain().filter_map(|(_, s)| s).collect();
    let n = slots.len();
    let waits = slots.iter().map(|s| terminate(s, why));
    for r in futures::future::join_all(waits).await {
        if let Err(e) = r {
            tracing::warn!("a job ended without a receipt: {e}");
        }
    }
    n
}
