//! The daemon's settings: a JSON file (`provider run --config FILE`) and flags that
//! override it. Unknown keys are refused so a misspelt setting is an error, not a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::market::constraints::Filter;
use crate::units::{ByteSize, HumanDuration, MemSize};
use egress::Cidr;
use vm::Vmm;

/// `provider run`'s configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ConfigFile {
    /// Multiaddrs to listen on (default `/ip4/0.0.0.0/tcp/7465`).
    pub listen: Option<Vec<String>>,
    /// mDNS discovery on the local network.
    pub mdns: Option<bool>,
    /// Start jobs from a snapshot of the booted guest (QEMU only; default true).
    pub warm_start: Option<bool>,
    /// `auto`, `qemu` or `kvm`.
    pub vmm: Option<Vmm>,
    pub kernel: Option<PathBuf>,
    pub guest: Option<PathBuf>,
    /// Memory of one job's VM when its demand asks for none (the least a job gets), e.g.
    /// `512M`.
    pub mem: Option<MemSize>,
    pub cpus: Option<u32>,
    /// Jobs running at once (overrides the hardware profile's `max_jobs`).
    pub max_jobs: Option<usize>,
    /// The preset the offer publishes (`provider preset list`); default: `default` if the
    /// operator made one, else the built-in `free`.
    pub preset: Option<String>,
    /// CIDRs the egress proxy may connect to although they are private or loopback.
    pub allow_cidr: Option<Vec<String>>,
    pub command_timeout: Option<HumanDuration>,
    pub boot_timeout: Option<HumanDuration>,
    /// Output kept per command and stream, e.g. `1M`.
    pub max_output: Option<ByteSize>,
    /// Largest file one `transfer` may move, e.g. `1G`.
    pub max_transfer: Option<ByteSize>,
    /// Largest payload image fetched for a requestor, e.g. `4G`.
    pub max_image_size: Option<ByteSize>,
    /// Free disk an image fetch must leave in the data dir, e.g. `1G`.
    pub image_disk_reserve: Option<ByteSize>,
    /// The image cache's size, e.g. `20G`: beyond it the least recently used images no job
    /// uses are evicted.
    pub image_cache_size: Option<ByteSize>,
    /// Registries (`host[:port]`) pulled from over plain HTTP for `oci://` images, besides
    /// loopback ones (which always are); every other is spoken to over HTTPS.
    pub plain_http_registries: Option<Vec<String>>,
    /// One job's writable layer when its demand asks for no more, e.g. `2G` (the least a
    /// job gets; its share of the hardware profile's `storage_gib`), reserved in the data
    /// dir while the job runs.
    pub storage: Option<ByteSize>,
    pub agreement_ttl: Option<HumanDuration>,
    pub proposal_ttl: Option<HumanDuration>,
    /// Open proposals one requestor peer may hold.
    pub max_proposals_per_peer: Option<usize>,
    /// LDAP-style filter over demands' properties.
    pub constraints: Option<String>,
    /// Where the Prometheus endpoint listens, e.g. `127.0.0.1:9464` (off when absent).
    pub metrics: Option<String>,
    /// Bootstrap peers (multiaddrs ending in `/p2p/<peer id>`) to join the DHT and the
    /// offer gossip through; relays among them carry this provider when it is behind NAT.
    pub bootstrap: Option<Vec<String>>,
    /// Serve as a circuit relay v2 for peers behind NAT (a publicly reachable peer only).
    pub relay: Option<bool>,
    /// Let AutoNAT count private addresses as reachable (networks without global
    /// addresses, such as a test network); default false.
    pub nat_private_addresses: Option<bool>,
}

/// The settled configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub listen: Vec<String>,
    pub mdns: bool,
    /// Restore jobs from the warm-start snapshot (`vm::warm`).
    pub warm_start: bool,
    pub vmm: Vmm,
    pub kernel: Option<PathBuf>,
    pub guest: Option<PathBuf>,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Overrides the hardware profile's `max_jobs` when set.
    pub max_jobs: Option<usize>,
    pub preset: Option<String>,
    pub allow_cidr: Vec<Cidr>,
    pub command_timeout: Duration,
    pub boot_timeout: Duration,
    pub max_output_bytes: u64,
    pub max_transfer_bytes: u64,
    pub max_image_bytes: u64,
    pub image_disk_reserve: u64,
    pub storage_bytes: u64,
    pub image_cache_bytes: u64,
    pub plain_http_registries: Vec<String>,
    pub agreement_ttl: Duration,
    pub proposal_ttl: Duration,
    pub max_proposals_per_peer: usize,
    pub constraints: Option<Filter>,
    /// The text `constraints` was parsed from (the offer carries it).
    pub constraints_text: String,
    /// The Prometheus endpoint's address; off when `None`.
    pub metrics: Option<std::net::SocketAddr>,
    pub bootstrap: Vec<String>,
    pub relay: bool,
    pub nat_private_addresses: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/0.0.0.0/tcp/7465".into()],
            mdns: true,
            warm_start: true,
            vmm: Vmm::Auto,
            kernel: None,
            guest: None,
            mem_mib: 512,
            cpus: 1,
            max_jobs: None,
            preset: None,
            allow_cidr: Vec::new(),
            command_timeout: Duration::from_secs(300),
            boot_timeout: Duration::from_secs(120),
            max_output_bytes: 1024 * 1024,
            max_transfer_bytes: 1024 * 1024 * 1024,
            max_image_bytes: 4 << 30,
            image_disk_reserve: 1 << 30,
            storage_bytes: 2 << 30,
            image_cache_bytes: 20 << 30,
            plain_http_registries: Vec::new(),
            agreement_ttl: Duration::from_secs(3600),
            proposal_ttl: Duration::from_secs(60),
            max_proposals_per_peer: 100,
            constraints: None,
            constraints_text: String::new(),
            metrics: None,
            bootstrap: Vec::new(),
            relay: false,
            nat_private_addresses: false,
        }
    }
}

impl DaemonConfig {
    /// The defaults overridden by `file` (if given).
    pub fn from_file(path: Option<&Path>) -> Result<Self, String> {
        let mut cfg = Self::default();
        let Some(path) = path else {
            return Ok(cfg);
        };
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let file: ConfigFile = serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: at {}: {}", path.display(), e.path(), e.inner()))?;
        let at = |key: &str, e: String| format!("{}: {key}: {e}", path.display());
        if let Some(v) = file.listen {
            cfg.listen = v;
        }
        if let Some(v) = file.mdns {
            cfg.mdns = v;
        }
        if let Some(v) = file.warm_start {
            cfg.warm_start = v;
        }
        if let Some(v) = file.vmm {
            cfg.vmm = v;
        }
        cfg.kernel = file.kernel.or(cfg.kernel);
        cfg.guest = file.guest.or(cfg.guest);
        if let Some(v) = file.mem {
            cfg.mem_mib = v.mib();
        }
        if let Some(v) = file.cpus {
            if !(1..=64).contains(&v) {
                return Err(at("cpus", format!("{v} is not between 1 and 64")));
            }
            cfg.cpus = v;
        }
        if let Some(v) = file.max_jobs {
            if v == 0 {
                return Err(at("max_jobs", "must be at least 1".into()));
            }
            cfg.max_jobs = Some(v);
        }
        if let Some(v) = file.preset {
            cfg.preset = Some(v);
        }
        if let Some(v) = file.allow_cidr {
            cfg.allow_cidr = v
                .iter()
                .map(|c| {
                    c.parse::<Cidr>()
                        .map_err(|e| at("allow_cidr", e.to_string()))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = file.command_timeout {
            cfg.command_timeout = v.get();
        }
        if let Some(v) = file.boot_timeout {
            cfg.boot_timeout = v.get();
        }
        if let Some(v) = file.agreement_ttl {
            cfg.agreement_ttl = v.get();
        }
        if let Some(v) = file.proposal_ttl {
            cfg.proposal_ttl = v.get();
        }
        if let Some(v) = file.max_output {
            cfg.max_output_bytes = v.bytes();
        }
        if let Some(v) = file.max_proposals_per_peer {
            if v == 0 {
                return Err(at("max_proposals_per_peer", "must be at least 1".into()));
            }
            cfg.max_proposals_per_peer = v;
        }
        if let Some(v) = file.max_transfer {
            cfg.max_transfer_bytes = v.bytes();
        }
        if let Some(v) = file.max_image_size {
            cfg.max_image_bytes = v.bytes();
        }
        if let Some(v) = file.image_disk_reserve {
            cfg.image_disk_reserve = v.bytes();
        }
        if let Some(v) = file.plain_http_registries {
            for r in &v {
                crate::images::oci::reference::OciRef::parse(&format!("oci://{r}/x:t")).map_err(
                    |_| {
                        at(
                            "plain_http_registries",
                            format!("`{r}` is not a registry host[:port]"),
                        )
                    },
                )?;
            }
            cfg.plain_http_registries = v.iter().map(|r| r.to_ascii_lowercase()).collect();
        }
        if let Some(v) = file.metrics {
            cfg.metrics = Some(v.parse().map_err(|e| {
                at(
                    "metrics",
                    format!("`{v}` is not an address with a port (e.g. 127.0.0.1:9464): {e}"),
                )
            })?);
        }
        if let Some(v) = file.image_cache_size {
            cfg.image_cache_bytes = v.bytes();
        }
        if let Some(v) = file.storage {
            if v.bytes() < vm::upper::MIN_BYTES {
                return Err(at(
                    "storage",
                    format!(
                        "{} bytes is below the smallest writable layer ({} bytes, 16M)",
                        v.bytes(),
                        vm::upper::MIN_BYTES
                    ),
                ));
            }
            cfg.storage_bytes = v.bytes();
        }
        if let Some(v) = file.bootstrap {
            for a in &v {
                check_bootstrap(a).map_err(|e| at("bootstrap", e))?;
            }
            cfg.bootstrap = v;
        }
        if let Some(v) = file.relay {
            cfg.relay = v;
        }
        if let Some(v) = file.nat_private_addresses {
            cfg.nat_private_addresses = v;
        }
        if let Some(v) = file.constraints.filter(|c| !c.trim().is_empty()) {
            cfg.constraints =
                Some(Filter::parse(&v).map_err(|e| at("constraints", e.to_string()))?);
            cfg.constraints_text = v;
        }
        Ok(cfg)
    }
}

/// A bootstrap address must be a multiaddr naming its peer, or the peer to expect (and
/// trust as a relay) is unknown.
pub fn check_bootstrap(addr: &str) -> Result<(), String> {
    let parsed: libp2p::Multiaddr = addr
        .parse()
        .map_err(|e| format!("{addr} is not a multiaddr ({e})"))?;
    match parsed.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(_)) => Ok(()),
        _ => Err(format!(
            "{addr} does not end in /p2p/<peer id>; use the address the bootstrap peer prints"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_overrides_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(
            &p,
            r#"{"listen":["/ip4/127.0.0.1/tcp/0"],"mdns":false,"mem":"256M","max_jobs":3,
               "allow_cidr":["127.0.0.0/8"],"command_timeout":"30s","max_output":"64K"}"#,
        )
        .unwrap();
        let c = DaemonConfig::from_file(Some(&p)).unwrap();
        assert_eq!(c.listen, ["/ip4/127.0.0.1/tcp/0"]);
        assert!(!c.mdns);
        assert_eq!((c.mem_mib, c.max_jobs), (256, Some(3)));
        assert_eq!(c.command_timeout, Duration::from_secs(30));
        assert_eq!(c.max_output_bytes, 64 * 1024);
        assert_eq!(c.allow_cidr.len(), 1);

        std::fs::write(&p, r#"{"max_job":3}"#).unwrap();
        let e = DaemonConfig::from_file(Some(&p)).unwrap_err();
        assert!(e.contains("max_job"), "{e}");
        std::fs::write(&p, r#"{"bootstrap":["/ip4/192.0.2.1/tcp/7465"]}"#).unwrap();
        let e = DaemonConfig::from_file(Some(&p)).unwrap_err();
        assert!(e.contains("bootstrap") && e.contains("/p2p/"), "{e}");
        std::fs::write(
            &p,
            r#"{"bootstrap":["/ip4/192.0.2.1/tcp/7465/p2p/12D3KooWGzh9SAvBGkuZ1jKMpZ2Tze5jJ6DnBC5f5XZrbAtHgsj6"],"relay":true}"#,
        )
        .unwrap();
        let c = DaemonConfig::from_file(Some(&p)).unwrap();
        assert_eq!(c.bootstrap.len(), 1);
        assert!(c.relay && !c.nat_private_addresses);
        std::fs::write(&p, r#"{"mem":"lots"}"#).unwrap();
        let e = DaemonConfig::from_file(Some(&p)).unwrap_err();
        assert!(e.contains("mem"), "{e}");
    }
}
