//! `provider egress serve`: run one manifest's egress proxy standalone, so an operator can
//! try what a job would be allowed to reach (and tests can drive the real binary).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use policies::{Mode, ReceivedManifest, WhitelistMatcher};

use super::{Ctx, Outcome};
use crate::audit::AuditLog;
use crate::units::ByteSize;
use egress::{AddressPolicy, Cidr, EgressPolicy, Limits, Proxy};

#[derive(Debug, Subcommand)]
pub enum EgressCmd {
    /// Serve the egress proxy for one manifest's `net.inet.out` until interrupted.
    ///
    /// Prints `listening on <ADDR>` once ready, then what the policy allows. Every
    /// decision is appended to the audit log.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The manifest: its JSON, or the base64 text a requestor sends.
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// The operator's outbound mode for this job: `all` grants what the manifest asks,
    /// `whitelist` only hosts on the domain whitelist, `none` nothing.
    #[arg(long, value_name = "MODE", default_value = "whitelist",
          value_parser = ["all", "whitelist", "none"])]
    mode: String,
    /// Also allow addresses in this range (repeatable), e.g. 127.0.0.0/8 for a local test
    /// upstream. Covers only its own address family.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allow_cidr: Vec<Cidr>,
    /// Job id written into audit lines.
    #[arg(long, value_name = "ID", default_value = "egress-serve")]
    job: String,
    /// Audit log to append to [default: audit.jsonl in the data dir].
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Concurrent CONNECT tunnels and WebSocket upgrades.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_tunnels)]
    max_tunnels: usize,
    /// Body and tunnel bytes over the job's life, both directions (suffixes K, M, G, T
    /// are powers of 1024).
    #[arg(long, value_name = "BYTES", default_value = "64G")]
    max_bytes: ByteSize,
    /// Close a connection after this many seconds without a byte moving.
    #[arg(long, value_name = "SECONDS", default_value_t = Limits::default().idle_timeout.as_secs())]
    idle_timeout: u64,
    /// Concurrent client connections.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Worker threads. One job's traffic rarely needs more than one core, and one thread
    /// saves the cross-thread wake-ups that add latency to every request.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
}

pub fn run(ctx: &Ctx, cmd: EgressCmd) -> anyhow::Result<Outcome> {
    match cmd {
        EgressCmd::Serve(args) => serve(ctx, args),
    }
}

fn serve(ctx: &Ctx, args: ServeArgs) -> anyhow::Result<Outcome> {
    let bytes = std::fs::read(&args.manifest)
        .with_context(|| format!("read {}", args.manifest.display()))?;
    let manifest = ReceivedManifest::from_file_bytes(&bytes)
        .with_context(|| format!("{}", args.manifest.display()))?;
    manifest
        .check_time(chrono::Utc::now())
        .with_context(|| format!("{}", args.manifest.display()))?;
    let mode = match args.mode.as_str() {
        "all" => Mode::All,
        "none" => Mode::None,
        _ => Mode::Whitelist,
    };
    let whitelist = if mode == Mode::Whitelist {
        ctx.data.load_whitelist()?.matcher()?
    } else {
        WhitelistMatcher::new(&[])?
    };
    let limits = Limits {
        max_tunnels: args.max_tunnels,
        max_bytes: args.max_bytes.bytes(),
        idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
        max_connections: args.max_connections,
        ..Limits::default()
    };
    let policy = EgressPolicy::new(
        args.job,
        &manifest.outbound,
        mode,
        &whitelist,
        AddressPolicy::new(args.allow_cidr),
        limits,
    );
    let audit_path = args.audit.unwrap_or_else(|| ctx.data.audit_path());
    let audit = Arc::new(AuditLog::open(&audit_path)?);
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        // Whoever started us may stop reading stdout once it has the address; the proxy
        // must keep serving, so these lines are best effort.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {local}");
        for line in policy.describe() {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "audit log: {}", audit_path.display());
        let _ = out.flush();
        drop(out);
        let proxy = Proxy::new(policy, audit);
        tokio::select! {
            () = egress::serve_listener(listener, proxy) => {}
            r = tokio::signal::ctrl_c() => r.context("wait for Ctrl-C")?,
        }
        anyhow::Ok(())
    })?;
    Ok(Outcome::Done)
}
