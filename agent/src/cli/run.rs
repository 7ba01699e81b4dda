//! `provider run`: the daemon. Settings come from `--config FILE` (JSON, see
//! `docs/daemon.md`) and the flags here, which win over the file.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::vm::vmm_parser;
use super::{Ctx, Outcome};
use crate::daemon::{self, DaemonConfig};
use egress::Cidr;
use vm::Vmm;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Multiaddr to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/7465].
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Settings file (JSON); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Do not announce or discover peers with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Boot every job cold instead of restoring the warm-start snapshot.
    #[arg(long)]
    no_warm_start: bool,
    /// Let jobs' egress reach this private/loopback range (repeatable; e.g. a local mirror).
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<Cidr>,
    #[arg(long, value_parser = vmm_parser())]
    vmm: Option<Vmm>,
    /// Guest kernel (bzImage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The static guest agent.
    #[arg(long, value_name = "PATH")]
    guest: Option<PathBuf>,
    /// Jobs running at once (overrides the hardware profile's).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_jobs: Option<u64>,
    /// The preset the offer publishes (`provider preset list`).
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
    /// Serve Prometheus metrics on `GET http://ADDR/metrics` (off by default), e.g.
    /// 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// A bootstrap peer, `/ip4/…/tcp/…/p2p/<peer id>` (repeatable; added to the config's).
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Serve as a circuit relay v2 for peers behind NAT (run it only on a publicly
    /// reachable host: the relay carries their traffic).
    #[arg(long)]
    relay: bool,
    /// Let AutoNAT treat private addresses as reachable (a network with no global
    /// addresses, such as a test network).
    #[arg(long)]
    nat_private_addresses: bool,
}

pub fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<Outcome> {
    let mut cfg = DaemonConfig::from_file(args.config.as_deref()).map_err(anyhow::Error::msg)?;
    if !args.listen.is_empty() {
        cfg.listen = args.listen;
    }
    if args.no_mdns {
        cfg.mdns = false;
    }
    if args.no_warm_start {
        cfg.warm_start = false;
    }
    cfg.allow_cidr.extend(args.allow_cidr);
    if let Some(v) = args.vmm {
        cfg.vmm = v;
    }
    cfg.kernel = args.kernel.or(cfg.kernel);
    cfg.guest = args.guest.or(cfg.guest);
    if let Some(n) = args.max_jobs {
        cfg.max_jobs = Some(n as usize);
    }
    if let Some(p) = args.preset {
        cfg.preset = Some(p);
    }
    if let Some(m) = args.metrics {
        cfg.metrics = Some(m);
    }
    for a in &args.bootstrap {
        daemon::config::check_bootstrap(a).map_err(|e| anyhow::anyhow!("--bootstrap {e}"))?;
    }
    cfg.bootstrap.extend(args.bootstrap);
    cfg.relay |= args.relay;
    cfg.nat_private_addresses |= args.nat_private_addresses;
    let json = ctx.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(daemon::run(ctx.data.clone(), cfg, move |addr| {
        use std::io::Write as _;
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "listening", "address": addr.to_string()})
            );
        } else {
            println!("listening on {addr}");
        }
        let _ = std::io::stdout().flush();
    }))?;
    // Jobs' threads may still be unwinding their VMs' last bytes; they were terminated.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(Outcome::Done)
}
