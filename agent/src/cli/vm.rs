//! `provider vm run` (one command in a fresh VM), `provider vm selftest` (what this
//! host offers and which backend `auto` picks) and `provider vm snapshot` (build the
//! daemon's warm-start snapshot ahead, `vm::warm`).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use policies::manifest::PayloadHash;
use serde::Serialize;

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::images::ImageStore;
use crate::units::{ByteSize, HumanDuration, MemSize};
use vm::host::HostInfo;
use vm::{Backend, RunSpec, Vm, Vmm};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Run one command in a fresh VM built from a rootfs tarball; stream its output and
    /// exit with its exit code (124 when it timed out, 128+N when signal N ended it).
    Run(Box<RunArgs>),
    /// Show what this host offers for VMs (KVM/PVM, QEMU, guest kernel, guest agent) and
    /// which backend `--vmm auto` picks. Exit code 1 when no backend can run a VM.
    Selftest,
    /// Build the warm-start snapshot the daemon restores jobs from (the daemon also builds
    /// it on its first job): the same kernel, agent, modules, memory, vCPUs and QEMU as
    /// `provider run` with these settings. A sound one is kept unless `--rebuild`.
    Snapshot(SnapshotArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The daemon's settings file, so the snapshot matches its jobs; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, value_parser = vmm_parser())]
    vmm: Option<Vmm>,
    /// Guest kernel (bzImage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The static guest agent.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Guest memory of a job (suffix K, M, G; plain numbers are MiB) [default: the
    /// daemon's, 512M].
    #[arg(long, value_name = "SIZE")]
    mem: Option<MemSize>,
    /// vCPUs of a job [default: the daemon's, 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: Option<u32>,
    /// Build it even when a sound one exists.
    #[arg(long)]
    rebuild: bool,
}

/// What `vm snapshot` reports (`--json`).
#[derive(Debug, Serialize)]
struct SnapshotReport {
    key: String,
    dir: PathBuf,
    /// Whether this run built it (else a sound one was there).
    built: bool,
    /// Why it was built, or kept.
    reason: String,
    build_ms: Option<u64>,
    state_bytes: u64,
    mem_mib: u32,
    cpus: u32,
    kernel: PathBuf,
    agent: PathBuf,
    modules: Option<PathBuf>,
    qemu: PathBuf,
}

/// `--vmm`: the values of [`Vmm`], each with its help.
pub(crate) fn vmm_parser() -> impl clap::builder::TypedValueParser<Value = Vmm> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new([
        PossibleValue::new("auto").help("QEMU (with KVM where it boots Linux, else TCG)"),
        PossibleValue::new("qemu"),
        PossibleValue::new("kvm").help("The project's own VMM; refused at once where KVM is PVM"),
    ])
    .map(|s| s.parse::<Vmm>().expect("one of the possible values"))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image: a squashfs, a GVMI or a rootfs tarball (.tar, .tar.gz): a path, file://
    /// or http(s):// URL; or an OCI image, `oci://REGISTRY/REPO:TAG[@sha256:DIGEST]`.
    #[arg(long, value_name = "PATH|URL")]
    image: String,
    /// A registry (`host[:port]`) to speak plain HTTP to for `oci://` images (loopback
    /// ones always are). Repeatable.
    #[arg(long = "plain-http", value_name = "REGISTRY")]
    plain_http: Vec<String>,
    /// Expected hash `sha3:<hex>` (224/256/384/512 by length); checked before the image is
    /// used. Without it the image is stored under its SHA3-256.
    #[arg(long, value_name = "sha3:HEX")]
    hash: Option<String>,
    #[arg(long, default_value = "auto", value_parser = vmm_parser())]
    vmm: Vmm,
    /// Guest kernel (bzImage) [default: the cache filled by scripts/fetch-guest-kernel.sh].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The static guest agent [default: $PROVIDER_GUEST, next to this binary, or the
    /// cargo build location].
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Guest memory (suffix K, M, G; plain numbers are MiB).
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: MemSize,
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Kill the command after this long (e.g. 60s, 500ms, 2m; plain numbers are seconds).
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    timeout: HumanDuration,
    /// Environment for the command (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the image [default: the image's WorkingDir, else /].
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// The writable layer over the image (suffix K, M, G).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    storage: ByteSize,
    /// Boot deadline: the guest agent must be ready within this long.
    #[arg(long, value_name = "DURATION", default_value = "120s")]
    boot_timeout: HumanDuration,
    /// Print the phases' timings on stderr when done.
    #[arg(long)]
    timings: bool,
    /// Run under this runtime profile (built in, or the data dir's runtime-profiles/),
    /// as a job of a preset naming it would [default: no profile: Landlock on the job dir,
    /// the default sandbox, a writable root].
    #[arg(long, value_name = "NAME")]
    runtime_profile: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

pub fn run(ctx: &Ctx, cmd: VmCmd) -> anyhow::Result<Outcome> {
    match cmd {
        VmCmd::Run(args) => run_one(ctx, *args),
        VmCmd::Selftest => selftest(ctx),
        VmCmd::Snapshot(args) => snapshot(ctx, args),
    }
}

fn snapshot(ctx: &Ctx, args: SnapshotArgs) -> anyhow::Result<Outcome> {
    let mut cfg = crate::daemon::config::DaemonConfig::from_file(args.config.as_deref())
        .map_err(anyhow::Error::msg)?;
    if let Some(v) = args.vmm {
        cfg.vmm = v;
    }
    if args.kernel.is_some() {
        cfg.kernel = args.kernel;
    }
    if args.guest.is_some() {
        cfg.guest = args.guest;
    }
    if let Some(m) = args.mem {
        cfg.mem_mib = m.mib();
    }
    if let Some(c) = args.cpus {
        cfg.cpus = c;
    }
    cfg.warm_start = true;
    let jobs = crate::daemon::job_config(&cfg, &ctx.data)?;
    let Some(warm) = jobs.warm else {
        anyhow::bail!(
            "warm start needs the QEMU backend; this host's jobs run under {}",
            jobs.backend.describe()
        );
    };
    let (store, inputs) = (warm.store(), warm.inputs());
    let kept = if args.rebuild {
        Err("--rebuild".to_owned())
    } else {
        store.open(inputs).map_err(|e| e.to_string())
    };
    let (snap, built, reason, build_ms) = match kept {
        Ok(s) => (
            s,
            false,
            "a sound snapshot exists (its hashes match)".to_owned(),
            None,
        ),
        Err(why) => {
            let started = Instant::now();
            let s = store
                .build(inputs, cfg.boot_timeout)
                .context("build the warm-start snapshot")?;
            (s, true, why, Some(started.elapsed().as_millis() as u64))
        }
    };
    let report = SnapshotReport {
        key: snap.key().to_owned(),
        dir: snap.dir.clone(),
        built,
        reason,
        build_ms,
        state_bytes: std::fs::metadata(snap.state_path())
            .map(|m| m.len())
            .unwrap_or(0),
        mem_mib: inputs.mem_mib,
        cpus: inputs.cpus,
        kernel: inputs.files.kernel.clone(),
        agent: inputs.files.agent.clone(),
        modules: inputs.files.modules.clone(),
        qemu: inputs.qemu.binary.clone(),
    };
    if ctx.json {
        output::json(&report)?;
    } else {
        let mut t = Table::new(&["FIELD", "VALUE"]);
        t.row(vec!["key".into(), report.key.clone()]);
        t.row(vec!["dir".into(), report.dir.display().to_string()]);
        t.row(vec![
            "built".into(),
            match report.build_ms {
                Some(ms) => format!("yes, in {ms} ms ({})", report.reason),
                None => format!("no: {}", report.reason),
            },
        ]);
        t.row(vec![
            "state".into(),
            format!("{} bytes", report.state_bytes),
        ]);
        t.row(vec![
            "machine".into(),
            format!("{} MiB, {} vCPUs", report.mem_mib, report.cpus),
        ]);
        t.print();
    }
    Ok(Outcome::Done)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not K=V")),
    }
}

/// Where a `vm run` job keeps its files: `<data-dir>/jobs/vm-<ms>-<pid>/`.
fn job_dir(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let dir = ctx
        .data
        .root()
        .join("jobs")
        .join(format!("vm-{ms}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Timings of one `vm run`, for `--timings` and the benchmark.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Timings {
    pub image: Duration,
    pub initramfs: Duration,
    pub launch: Duration,
    pub boot_to_ready: Duration,
    pub first_byte: Option<Duration>,
    pub command: Duration,
    pub total: Duration,
}

fn run_one(ctx: &Ctx, args: RunArgs) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let mut t = Timings::default();
    let expected = args
        .hash
        .as_deref()
        .map(PayloadHash::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--hash: {e}"))?;
    // The backend is settled first, so a host that cannot run this VM says so at once.
    let info = HostInfo::detect();
    let (backend, why) = Backend::select(args.vmm, &info)?;
    tracing::info!("{why}");
    let runtime = match &args.runtime_profile {
        Some(name) => crate::market::runtime::RuntimeProfile::load(&ctx.data, name)?.limits(),
        None => vm::runtime::RuntimeLimits::default(),
    };
    // The image's bytes are verified before anything reads them as a tarball.
    let mut store = ImageStore::new(&ctx.data);
    store.plain_http = args.plain_http.clone();
    // `--json` output is for programs, which want no progress bar even on a terminal.
    store.progress = !ctx.json;
    let image = store
        .fetch(&args.image, expected.as_ref())
        .with_context(|| format!("image {}", args.image))?;
    // Kept from `images prune` while this job runs.
    let _lease = store.lease(&image)?;
    t.image = start.elapsed();

    let kernel = vm::find_kernel(args.kernel.as_deref())?;
    let agent = vm::find_guest_agent(args.guest.as_deref())?;

    let modules = match &backend {
        Backend::Qemu(_) => vm::find_modules(&kernel)?,
        Backend::Kvm => None,
    };

    let job = job_dir(ctx)?;
    let mark = Instant::now();
    let files = vm::GuestFiles {
        kernel,
        modules,
        agent,
    };
    let size = crate::images::MachineSize {
        mem_mib: args.mem.mib(),
        cpus: args.cpus,
        storage_bytes: args.storage.bytes(),
        max_unpacked: u64::MAX,
    };
    let (mut spec, image_config) =
        match crate::images::prepare_machine(&store, &image, &backend, &files, size, &job) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&job);
                return Err(e.into());
            }
        };
    spec.runtime = runtime;
    let initrd = spec.initramfs.clone();
    t.initramfs = mark.elapsed();
    let mark = Instant::now();
    let machine = backend.launch(&spec)?;
    t.launch = mark.elapsed();
    let vm = Vm::boot(machine, args.boot_timeout.get(), vm::refuse_streams())?;
    t.boot_to_ready = vm.boot_time;
    // The initramfs is in guest memory now.
    let _ = std::fs::remove_file(&initrd);
    let upper = job.join("upper.img");

    let mut run = RunSpec::new(args.command.clone());
    run.env = image_config.env.clone();
    run.env.extend(args.env.iter().cloned());
    run.cwd = match (&args.workdir, &image_config.working_dir) {
        (Some(w), _) => w.clone(),
        (None, Some(w)) => w.clone(),
        (None, None) => "/".into(),
    };
    run.timeout = Some(args.timeout.get());
    let first = std::sync::OnceLock::new();
    let mut stdout = FirstByte {
        inner: std::io::stdout(),
        first: &first,
        start,
    };
    let mut stderr = FirstByte {
        inner: std::io::stderr(),
        first: &first,
        start,
    };
    let mark = Instant::now();
    let result = vm.run(&run, &mut stdout, &mut stderr);
    t.command = mark.elapsed();
    t.first_byte = first.get().copied();
    let console = vm.console_log();
    let shutdown = vm.shutdown(Duration::from_secs(10));
    let _ = std::fs::remove_file(&upper);
    t.total = start.elapsed();
    if args.timings {
        eprintln!(
            "timings: image {:?}, initramfs {:?}, launch {:?}, boot to ready {:?}, first byte {:?}, command {:?}, total {:?}",
            t.image, t.initramfs, t.launch, t.boot_to_ready, t.first_byte, t.command, t.total
        );
    }
    let status = result.with_context(|| format!("console log: {}", console.display()))?;
    shutdown?;
    if status.timed_out {
        eprintln!(
            "provider: the command timed out after {:?} and was killed",
            args.timeout.get()
        );
        return Ok(Outcome::Code(124));
    }
    let code = status.shell_code();
    Ok(Outcome::Code(code.clamp(0, 255) as u8))
}

/// Passes output through and remembers when the first byte came (stdout or stderr).
struct FirstByte<'a, W: std::io::Write> {
    inner: W,
    first: &'a std::sync::OnceLock<Duration>,
    start: Instant,
}

impl<W: std::io::Write> std::io::Write for FirstByte<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            let _ = self.first.set(self.start.elapsed());
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn selftest(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let info = HostInfo::detect();
    if ctx.json {
        output::json(&info)?;
    } else {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        let mut t = Table::new(&["CHECK", "RESULT"]);
        t.row(vec!["kvm".into(), yes(info.kvm.present)]);
        t.row(vec!["kvm accessible".into(), yes(info.kvm.accessible)]);
        t.row(vec!["kvm is pvm".into(), yes(info.kvm.pvm)]);
        match &info.qemu {
            Some(q) => {
                t.row(vec![
                    "qemu".into(),
                    format!("{} ({})", q.path.display(), q.version),
                ]);
                t.row(vec!["qemu sandbox".into(), yes(q.sandbox)]);
            }
            None => t.row(vec!["qemu".into(), "not found".into()]),
        }
        t.row(vec![
            "kernel".into(),
            info.kernel
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "not found (scripts/fetch-guest-kernel.sh)".into()),
        ]);
        t.row(vec![
            "guest agent".into(),
            info.guest_agent
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "not found (see docs/vm.md)".into()),
        ]);
        t.row(vec![
            "auto picks".into(),
            info.auto
                .as_ref()
                .map(|c| c.reason.clone())
                .unwrap_or_else(|| "nothing: no backend can run a VM here".into()),
        ]);
        t.print();
        std::io::stdout().flush()?;
    }
    Ok(if info.auto.is_some() {
        Outcome::Done
    } else {
        Outcome::Rejected
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_parse() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("=x").is_err());
    }
}
