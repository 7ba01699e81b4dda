//! Activities: an agreement becomes a job, a job runs ExeScript batches, and its end
//! leaves a receipt.
//!
//! A [`Job`] owns one payload VM from boot to teardown:
//!
//! - [`Job::start`] reads the agreement's manifest, picks the payload for this host, fetches
//!   and verifies its image, builds the job's initramfs in `<data>/jobs/<activity id>/`,
//!   boots the VM and attaches the job's egress proxy to the guest's proxy listener (the
//!   [`bridge`]);
//! - [`Job::exec`] runs a batch command by command: every command passes the manifest's
//!   ExeScript gate before it reaches the guest; a denial or a failure ends the batch;
//! - [`Job::terminate`] tears the VM down and returns the unsigned [`Receipt`] of
//!   everything the job did (commands, egress decisions, usage); the caller signs it;
//! - a [`JobStopper`] (from [`Job::stopper`]) ends the job from another thread while a
//!   batch runs, so a terminate or a shutdown need not wait for a long command.
//!
//! - [`recover_interrupted`], at daemon start, marks ended the jobs a killed daemon left.
//!
//! The API is blocking: the daemon calls it from its own threads. Egress is served on the
//! tokio runtime handed to [`Job::start`]. The lifecycle, the command semantics, the limits
//! and the audit lines are described in `docs/activity.md`.

pub mod bridge;
mod capture;
mod job;
pub mod meter;
mod recover;
mod service;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use bridge::EgressBridge;
pub use job::{Job, JobStopper};
pub use recover::{recover_interrupted, INTERRUPTED};
pub use service::{ActivityService, RunningJob};

use egress::{AddressPolicy, Limits};
#[cfg(doc)]
use net::receipt::Receipt;
use vm::Backend;

/// The operator's settings for every job (the daemon's configuration).
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub backend: Backend,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// The static guest agent (`provider-guest`).
    pub guest_agent: PathBuf,
    /// The kernel modules of the disk path (`vm::find_modules`); `None` for a kernel with
    /// the drivers built in.
    pub modules: Option<PathBuf>,
    /// The job's writable layer (the offer's `golem.inf.storage.gib`): a payload that fills
    /// it gets `ENOSPC` inside the VM.
    pub storage_bytes: u64,
    pub mem_mib: u32,
    pub cpus: u32,
    /// The guest agent must be ready within this long of the VM's launch.
    pub boot_timeout: Duration,
    /// A `run` is killed after this long (or at the agreement's expiry, if sooner).
    pub command_timeout: Duration,
    /// Output kept per stream and command in its result; the receipt's hashes cover all of
    /// it.
    pub max_output_bytes: usize,
    /// Largest file one `transfer` may bring into the VM.
    pub max_transfer_bytes: u64,
    /// Trust anchors for `https://` transfers beside the system's (PEM files), e.g. an
    /// internal mirror's CA.
    pub transfer_ca_files: Vec<PathBuf>,
    /// Address ranges the operator opens to payloads (`--allow-cidr`), for their egress and
    /// for the fetch of their images alike.
    pub addresses: AddressPolicy,
    /// Largest payload image fetched for a requestor (`max_image_size`).
    pub max_image_bytes: u64,
    /// Free disk an image fetch must leave in the data dir (`image_disk_reserve`).
    pub image_disk_reserve: u64,
    /// The image cache's size (`image_cache_size`): least recently used images not in use
    /// are evicted beyond it.
    pub image_cache_bytes: u64,
    /// Registries pulled from over plain HTTP besides loopback ones.
    pub plain_http_registries: Vec<String>,
    /// Bounds on the job's egress proxy.
    pub limits: Limits,
    /// The offered preset's runtime profile, as the VM enforces it.
    pub runtime: vm::runtime::RuntimeLimits,
    /// Restore jobs from a snapshot of the booted guest (QEMU only; `None`: every job
    /// boots cold). See `vm::warm`.
    pub warm: Option<vm::warm::WarmStart>,
}

/// One agreement's job, as the market hands it over.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Names the job's directory, so only `[A-Za-z0-9._-]` (not `.` or `..`), at most 128.
    pub activity_id: String,
    pub agreement_id: String,
    /// This provider's peer id.
    pub provider_id: String,
    /// The requestor's peer id.
    pub requestor_id: String,
    /// The demand's `golem.srv.comp.payload`: base64 of the manifest JSON.
    pub manifest_base64: String,
    /// The outbound mode of the operator rule that accepted the demand.
    pub mode: policies::Mode,
    /// The operator's domain whitelist (consulted for mode `whitelist`).
    pub whitelist: policies::WhitelistMatcher,
    /// The agreement's end: no command runs past it.
    pub expires_at: DateTime<Utc>,
}

/// Why a job could not start or a batch could not run.
#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    #[error("activity id `{0}` is not usable as a job directory name (use [A-Za-z0-9._-], at most 128 characters)")]
    BadActivityId(String),
    #[error("the agreement's manifest: {0}")]
    Manifest(#[from] policies::ManifestError),
    #[error("the manifest's compManifest.script does not compile: {0}")]
    Script(#[from] exescript::CompileError),
    #[error("the payload image: {0}")]
    Image(#[from] vm::image::ImageError),
    #[error("the job directory {path}: {source}")]
    JobDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the TLS client for https transfers: {0}")]
    TransferTls(String),
    #[error("the job's initramfs: {0}")]
    Initramfs(#[from] vm::initramfs::InitramfsError),
    #[error("the job's VM: {0}")]
    Vm(#[from] vm::VmError),
    #[error("the agreement expired at {0}; no more commands run")]
    Expired(DateTime<Utc>),
    #[error("the job is ending ({0}); no more batches run")]
    Stopped(String),
    #[error("the job's VM is gone ({0}); terminate the activity for its receipt")]
    VmGone(String),
}

impl From<crate::images::PrepareError> for ActivityError {
    fn from(e: crate::images::PrepareError) -> Self {
        match e {
            crate::images::PrepareError::Image(e) => ActivityError::Image(e),
            crate::images::PrepareError::Initramfs(e) => ActivityError::Initramfs(e),
            crate::images::PrepareError::Vm(e) => ActivityError::Vm(e),
        }
    }
}

impl ActivityError {
    /// What the requestor is told when a job cannot start: a stable code and a message
    /// without the provider's paths or socket errors (the audit log keeps the whole error).
    pub fn public_reason(&self) -> net::wire::Reason {
        use net::wire::{Code, Reason};
        match self {
            ActivityError::Image(e) => Reason::new(crate::images::code(e), e.public_message()),
            ActivityError::Manifest(e) => {
                Reason::new(policies::Code::ManifestInvalid, e.to_string())
            }
            ActivityError::Script(e) => Reason::new(policies::Code::ScriptInvalid, e.to_string()),
            ActivityError::Expired(_) => Reason::new(Code::AgreementExpired, self.to_string()),
            ActivityError::BadActivityId(_) => Reason::new(Code::JobStartFailed, self.to_string()),
            ActivityError::Initramfs(vm::initramfs::InitramfsError::Image(e)) => {
                Reason::new(crate::images::code(e), e.public_message())
            }
            ActivityError::Vm(vm::VmError::Boot {
                setup: Some(why), ..
            }) if why.contains("payload image") || why.contains("payload's image") => Reason::new(
                Code::PayloadImageInvalid,
                format!("the guest could not mount the payload's image: {why}"),
            ),
            ActivityError::Vm(vm::VmError::Unenforceable { profile, .. }) => Reason::new(
                Code::JobStartFailed,
                format!("the provider's runtime profile `{profile}` cannot be enforced on its host (the provider's log has the cause)"),
            ),
            ActivityError::Vm(_) => Reason::new(
                Code::JobStartFailed,
                "the job's VM did not start (the provider's log has the cause)",
            ),
            _ => Reason::new(
                Code::JobStartFailed,
                "the provider could not prepare the job (its log has the cause)",
            ),
        }
    }
}
