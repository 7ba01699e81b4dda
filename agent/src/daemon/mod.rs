//! `provider run`: the daemon that joins the network, the market and the job runtime.
//!
//! Wiring only: the settings become a [`Market`] and an [`ActivityService`], and each
//! inbound request is handed to the one its protocol names. One tokio runtime carries the
//! libp2p event loop and one task per inbound request, so a slow request (a VM booting)
//! never holds up others. Each job lives on its own OS thread for its whole life (see
//! [`crate::activity`]).
//!
//! Every verdict, agreement, command decision, egress decision and job end is a line in
//! `<data-dir>/audit.jsonl`; every job that started leaves a signed receipt in
//! `<data-dir>/receipts/`, also when the agreement expires or the daemon is stopped.

pub mod config;
pub mod metrics;
pub mod status;

use std::sync::Arc;

use anyhow::Context as _;
use libp2p::Multiaddr;

use crate::activity::{ActivityService, JobConfig};
use crate::audit::AuditLog;
use crate::audit::{self, AuditEvent};
use crate::market::negotiation::{Market, MarketConfig};
use crate::market::offer::offer_properties;
use crate::market::pricing::Presets;
use crate::market::profile::{Grant, HardwareProfile, HostCapacity};
use crate::store::DataDir;
pub use config::DaemonConfig;
use net::wire::{ActivityResponse, Code, MarketResponse, Offer, Reason};
use net::{Inbound, InboundRequest, NetConfig};

/// What the daemon shares with its request tasks.
struct Shared {
    market: Arc<Market>,
    activities: ActivityService,
    /// Judging is CPU-bound (openssl); more threads than cores only add threads, memory
    /// arenas and context switches, so a burst of demands queues here instead.
    judging: tokio::sync::Semaphore,
}

/// Runs the daemon until SIGTERM or SIGINT. `announce` gets each address it listens on
/// (with `/p2p/<peer id>`), once listening.
pub async fn run(
    data: DataDir,
    cfg: DaemonConfig,
    announce: impl Fn(&Multiaddr),
) -> anyhow::Result<()> {
    // Before anything is announced: a SIGTERM right after start must still stop cleanly.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    // Everything that can be wrong with the input is checked before anything is written
    // (identity key, audit log): a start that fails leaves the data dir as it was.
    let listen: Vec<Multiaddr> = cfg
        .listen
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("--listen {a}: not a multiaddr"))
        })
        .collect::<anyhow::Result<_>>()?;
    // Refuse to start with rules that do not load: the operator learns now, not at the
    // first demand.
    data.load_judge()
        .context("the operator's rules, whitelist or keystore do not load")?;
    std::fs::create_dir_all(data.root())
        .with_context(|| format!("create the data dir {}", data.root().display()))?;
    let (profile, preset, job_floor, runtime) = sizing(&data, &cfg)?;
    let identity = net::load_or_create_identity(&data.root().join("identity.key"))?;
    let provider_id = identity.public().to_peer_id().to_string();
    let audit = Arc::new(
        AuditLog::open(&data.audit_path())
            .with_context(|| format!("open {}", data.audit_path().display()))?,
    );
    // Before serving anyone: jobs a killed predecessor left are marked ended.
    let interrupted = crate::activity::recover_interrupted(&data, &audit);
    if !interrupted.is_empty() {
        tracing::warn!(jobs = ?interrupted, "marked ended the jobs the previous daemon left running");
    }
    // Their VMMs died with the killed daemon; their cgroups are empty now.
    let swept = vm::cgroup::sweep();
    if swept > 0 {
        tracing::info!(
            groups = swept,
            "removed the cgroups of VMMs a previous daemon left"
        );
    }
    // Bound before anything is announced: a port in use is an error at start.
    let metrics = match cfg.metrics {
        Some(addr) => {
            let listener = metrics::bind(addr)
                .await
                .with_context(|| format!("--metrics {addr}: cannot listen"))?;
            let addr = listener.local_addr().unwrap_or(addr);
            let m = Arc::new(metrics::Metrics::new());
            let observer = m.clone();
            audit.observe(Arc::new(move |line| observer.observe(line)));
            Some((listener, m, addr))
        }
        None => None,
    };
    let jobs = job_config(&cfg, &data).map_err(|e| {
        tracing::warn!("jobs cannot run on this host ({e:#}); demands will still be judged");
        format!("{e:#}")
    });
    if let Some(w) = jobs.as_ref().ok().and_then(|j| j.warm.as_ref()) {
        w.prime();
    }

    let offer = Offer {
        provider_id: provider_id.clone(),
        properties: offer_properties(&profile, &preset, &provider_id)
            .into_iter()
            .collect(),
        constraints: cfg.constraints_text.clone(),
    };
    tracing::info!(
        cpu_threads = profile.cpu_threads,
        mem_gib = profile.mem_gib,
        storage_gib = profile.storage_gib,
        max_jobs = profile.max_jobs,
        preset = %preset.name,
        "offering"
    );
    let published_properties = offer.properties.clone();
    let published_constraints = offer.constraints.clone();
    let market = Arc::new(Market::new(
        data.clone(),
        offer,
        MarketConfig {
            proposal_ttl: cfg.proposal_ttl,
            agreement_ttl: cfg.agreement_ttl,
            demand_filter: cfg.constraints.clone(),
            max_proposals_per_peer: cfg.max_proposals_per_peer,
            profile: profile.clone(),
            job_floor,
            preset,
            runtime,
            ..MarketConfig::default()
        },
        audit.clone(),
    ));

    let bootstrap: Vec<Multiaddr> = cfg
        .bootstrap
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("--bootstrap {a}: not a multiaddr"))
        })
        .collect::<anyhow::Result<_>>()?;
    let (client, mut inbound, event_loop) = net::new(
        identity.clone(),
        NetConfig {
            mdns: cfg.mdns,
            relay_server: cfg.relay,
            only_global_ips: !cfg.nat_private_addresses,
            // Each request is handed to its own task at once, so the queue only absorbs
            // bursts; a deep one means a burst of demands is served rather than told busy.
            inbound_queue: 4096,
            ..NetConfig::default()
        },
    )?;
    let net_task = tokio::spawn(event_loop.run());
    for addr in listen {
        client
            .listen(addr.clone())
            .await
            .with_context(|| format!("listen on {addr}"))?;
    }
    // An unspecified address (0.0.0.0) listens on every interface: announce each, since a
    // requestor on another machine needs the LAN one, not loopback.
    let mut announced = std::collections::BTreeSet::new();
    let mut listening = Vec::new();
    for addr in client.listen_addrs().await? {
        let full = addr
            .with_p2p(identity.public().to_peer_id())
            .unwrap_or_else(|a| a);
        if announced.insert(full.to_string()) {
            announce(&full);
            listening.push(full.to_string());
        }
    }
    // Unreachable bootstrap peers are not fatal: the others, mDNS or a later retry by the
    // DHT may still connect this provider; the operator reads why in the log.
    for addr in bootstrap {
        match client.bootstrap(addr.clone()).await {
            Ok(peer) => tracing::info!(%peer, "joined the network through the bootstrap peer"),
            Err(e) => tracing::warn!(%addr, "bootstrap peer not reached: {e}"),
        }
    }
    client
        .set_offer(published_properties, published_constraints)
        .await?;
    audit::record(
        &audit,
        AuditEvent::DaemonStart {
            provider_id: &provider_id,
            pid: std::process::id(),
        },
    );

    let data_for_status = data.clone();
    let activities = ActivityService::new(
        jobs,
        profile.max_jobs,
        market.clone(),
        identity,
        data,
        audit.clone(),
    );
    let shared = Arc::new(Shared {
        market,
        activities: activities.clone(),
        judging: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
    });
    let reaper = tokio::spawn(async move { activities.reap_expired().await });
    let metrics_addr = metrics.as_ref().map(|(_, _, a)| a.to_string());
    let metrics_task = metrics.map(|(listener, m, addr)| {
        tracing::info!("metrics on http://{addr}/metrics");
        let shared = shared.clone();
        let refresh: Arc<dyn Fn(&metrics::Metrics) + Send + Sync> = Arc::new(move |m| {
            let now = chrono::Utc::now();
            m.running_jobs.set(shared.activities.running().len() as i64);
            m.cpu_threads_in_use
                .set(i64::from(shared.market.ledger().in_use(now).cpu_threads));
        });
        tokio::spawn(metrics::serve(listener, m, refresh))
    });
    // Held while the status file is written; `true` once the daemon stops, so a write
    // still in flight on a blocking thread cannot bring the file back after its removal.
    let status_stopped = Arc::new(std::sync::Mutex::new(false));
    let status = {
        let stopped = status_stopped.clone();
        let shared = shared.clone();
        let data = data_for_status.clone();
        let started_at = chrono::Utc::now();
        let peer_id = provider_id.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status::INTERVAL);
            loop {
                tick.tick().await;
                let now = chrono::Utc::now();
                let s = status::Status {
                    pid: std::process::id(),
                    peer_id: peer_id.clone(),
                    listen: listening.clone(),
                    started_at,
                    updated_at: now,
                    profile: profile.clone(),
                    in_use: shared.market.ledger().in_use(now).into(),
                    offer: shared.market.offer().clone(),
                    jobs: shared.activities.running(),
                    metrics: metrics_addr.clone(),
                };
                let data = data.clone();
                // Sampling reads /proc and the write fsyncs: off the event loop.
                let stopped = stopped.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let stopped = stopped.lock().unwrap_or_else(|p| p.into_inner());
                    if !*stopped {
                        s.write(&data);
                    }
                })
                .await;
            }
        })
    };

    loop {
        tokio::select! {
            request = inbound.recv() => match request {
                Some(request) => {
                    let shared = shared.clone();
                    tokio::spawn(async move { serve(shared, request).await });
                }
                None => {
                    tracing::error!("the network event loop stopped");
                    break;
                }
            },
            _ = term.recv() => {
                tracing::info!("SIGTERM: terminating jobs and stopping");
                break;
            }
            _ = int.recv() => {
                tracing::info!("interrupted: terminating jobs and stopping");
                break;
            }
        }
    }
    reaper.abort();
    status.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = status.await;
    {
        let mut stopped = status_stopped.lock().unwrap_or_else(|p| p.into_inner());
        *stopped = true;
        let _ = std::fs::remove_file(status::path(&data_for_status));
    }
    let ended = shared
        .activities
        .terminate_all("the provider was shut down")
        .await;
    audit::record(
        &audit,
        AuditEvent::DaemonStop {
            jobs_terminated: ended,
        },
    );
    net_task.abort();
    drop(client);
    Ok(())
}

async fn serve(shared: Arc<Shared>, request: Inbound) {
    let peer = request.peer.to_string();
    match request.request {
        InboundRequest::Market(req) => {
            let _permit = shared.judging.acquire().await;
            let s = shared.clone();
            let response = tokio::task::spawn_blocking(move || {
                s.market.handle(&peer, req, chrono::Utc::now())
            })
            .await
            .unwrap_or_else(|e| MarketResponse::Error {
                reason: Reason::new(Code::Internal, format!("the request failed: {e}")),
            });
            let _ = request.responder.respond(response);
        }
        InboundRequest::Activity(req) => {
            let response = shared.activities.handle(&peer, req).await;
            if let ActivityResponse::Error { reason } = &response {
                tracing::info!(%peer, code = %reason.code, "activity request refused: {}", reason.message);
            }
            let _ = request.responder.respond(response);
        }
    }
}

/// What the daemon sells: the hardware profile (the data dir's, else the host's default),
/// checked against the host; the offered preset; the least a job gets; the preset's
/// runtime profile. Every problem is
/// an error before anything is started.
fn sizing(
    data: &DataDir,
    cfg: &DaemonConfig,
) -> anyhow::Result<(
    HardwareProfile,
    crate::market::pricing::Preset,
    Grant,
    crate::market::runtime::RuntimeProfile,
)> {
    let host = HostCapacity::detect(data.root())?;
    let mut profile = match HardwareProfile::load(data)? {
        Some(p) => p,
        None => HardwareProfile::default_for(&host, cfg.max_jobs.unwrap_or(2)),
    };
    if let Some(n) = cfg.max_jobs {
        profile.max_jobs = n;
    }
    profile.check_host(&host).with_context(|| {
        format!(
            "the hardware profile ({}) sells more than this host has; change it with `provider profile set`",
            HardwareProfile::path(data).display()
        )
    })?;
    let floor = Grant {
        cpu_threads: cfg.cpus,
        mem_gib: f64::from(cfg.mem_mib) / 1024.0,
        storage_gib: cfg.storage_bytes as f64 / (1u64 << 30) as f64,
    };
    if !profile.holds(&floor) {
        anyhow::bail!(
            "one job's size (cpus {}, mem {} MiB, storage {} GiB) is more than the hardware profile sells ({} threads, {} GiB, {} GiB); lower `cpus`/`mem`/`storage` or raise the profile",
            floor.cpu_threads, cfg.mem_mib, floor.storage_gib,
            profile.cpu_threads, profile.mem_gib, profile.storage_gib
        );
    }
    let preset = Presets::load(data)?.offered(cfg.preset.as_deref())?;
    let rp_name = preset.runtime_profile.as_deref().unwrap_or("default");
    let runtime = crate::market::runtime::RuntimeProfile::load(data, rp_name)
        .with_context(|| format!("preset `{}`'s runtime profile", preset.name))?;
    if let Some(why) = crate::market::negotiation::runtime_cap(&runtime, &floor) {
        anyhow::bail!(
            "one job's size does not fit: {why}; lower `mem`/`storage` or raise the profile's caps"
        );
    }
    Ok((profile, preset, floor, runtime))
}

/// Every job's settings: the backend this host runs, the guest kernel and agent, and the
/// operator's limits.
pub(crate) fn job_config(c: &DaemonConfig, data: &DataDir) -> anyhow::Result<JobConfig> {
    let (backend, why) = vm::Backend::select(c.vmm, &vm::HostInfo::detect())?;
    tracing::info!("{why}");
    let kernel = vm::find_kernel(c.kernel.as_deref())?;
    let modules = match &backend {
        vm::Backend::Qemu(_) => vm::find_modules(&kernel)?,
        vm::Backend::Kvm => None,
    };
    let guest_agent = vm::find_guest_agent(c.guest.as_deref())?;
    // Built on first use, not here: a daemon that never runs a job spends nothing on it,
    // and the first job boots cold as it would have anyway (docs/payload-runtime.md).
    let warm = match &backend {
        vm::Backend::Qemu(qemu) if c.warm_start => {
            let w = vm::warm::WarmStart::new(
                vm::warm::SnapshotStore::new(data.root().join("snapshots")),
                vm::warm::SnapshotInputs {
                    files: vm::GuestFiles {
                        kernel: kernel.clone(),
                        modules: modules.clone(),
                        agent: guest_agent.clone(),
                    },
                    mem_mib: c.mem_mib,
                    cpus: c.cpus,
                    qemu: qemu.clone(),
                    ram: vm::warm::RamMode::Stream,
                },
                c.boot_timeout,
            );
            Some(w)
        }
        _ => None,
    };
    Ok(JobConfig {
        modules,
        backend,
        kernel,
        guest_agent,
        warm,
        storage_bytes: c.storage_bytes,
        mem_mib: c.mem_mib,
        cpus: c.cpus,
        boot_timeout: c.boot_timeout,
        command_timeout: c.command_timeout,
        max_output_bytes: usize::try_from(c.max_output_bytes).unwrap_or(usize::MAX),
        max_transfer_bytes: c.max_transfer_bytes,
        // https transfers trust the system's anchors only until the daemon has a flag for
        // extra CAs.
        transfer_ca_files: Vec::new(),
        addresses: egress::AddressPolicy::new(c.allow_cidr.clone()),
        max_image_bytes: c.max_image_bytes,
        image_disk_reserve: c.image_disk_reserve,
        image_cache_bytes: c.image_cache_bytes,
        plain_http_registries: c.plain_http_registries.clone(),
        limits: egress::Limits::default(),
        runtime: Default::default(),
    })
}
