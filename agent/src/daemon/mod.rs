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

use std::sync::Arc;

use anyhow::Context as _;
use libp2p::Multiaddr;

use crate::activity::{ActivityService, JobConfig};
use crate::audit::AuditLog;
use crate::audit::{self, AuditEvent};
use crate::market::negotiation::{Market, MarketConfig};
use crate::market::offer::{offer_properties, Resources};
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
    let jobs = job_config(&cfg).map_err(|e| {
        tracing::warn!("jobs cannot run on this host ({e:#}); demands will still be judged");
        format!("{e:#}")
    });

    let resources = Resources {
        mem_gib: f64::from(cfg.mem_mib) / 1024.0,
        storage_gib: 10.0,
        cpu_threads: cfg.cpus,
    };
    let offer = Offer {
        provider_id: provider_id.clone(),
        properties: offer_properties(&resources, &provider_id)
            .into_iter()
            .collect(),
        constraints: cfg.constraints_text.clone(),
    };
    let market = Arc::new(Market::new(
        data.clone(),
        offer,
        MarketConfig {
            proposal_ttl: cfg.proposal_ttl,
            agreement_ttl: cfg.agreement_ttl,
            demand_filter: cfg.constraints.clone(),
            max_proposals_per_peer: cfg.max_proposals_per_peer,
            ..MarketConfig::default()
        },
        audit.clone(),
    ));

    let (client, mut inbound, event_loop) = net::new(
        identity.clone(),
        NetConfig {
            mdns: cfg.mdns,
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
    for addr in client.listen_addrs().await? {
        let full = addr
            .with_p2p(identity.public().to_peer_id())
            .unwrap_or_else(|a| a);
        if announced.insert(full.to_string()) {
            announce(&full);
        }
    }
    audit::record(
        &audit,
        AuditEvent::DaemonStart {
            provider_id: &provider_id,
            pid: std::process::id(),
        },
    );

    let activities = ActivityService::new(
        jobs,
        cfg.max_jobs,
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

/// Every job's settings: the backend this host runs, the guest kernel and agent, and the
/// operator's limits.
fn job_config(c: &DaemonConfig) -> anyhow::Result<JobConfig> {
    let (backend, why) = vm::Backend::select(c.vmm, &vm::HostInfo::detect())?;
    tracing::info!("{why}");
    Ok(JobConfig {
        backend,
        kernel: vm::find_kernel(c.kernel.as_deref())?,
        guest_agent: vm::find_guest_agent(c.guest.as_deref())?,
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
        limits: egress::Limits::default(),
    })
}
