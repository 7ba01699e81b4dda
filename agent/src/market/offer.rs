//! The provider's offer: the properties a requestor's constraints are evaluated against.
//!
//! Property names follow Golem's (`golem.inf.*`, `golem.runtime.*`, `golem.srv.*`) so
//! demands written for yagna providers select this one too.

use serde_json::{json, Value};

use super::constraints::Properties;

/// What this provider sells to one job at most.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    pub mem_gib: f64,
    pub storage_gib: f64,
    pub cpu_threads: u32,
}

impl Resources {
    /// The host's memory (from `/proc/meminfo`) and CPU count; storage as given.
    pub fn of_host(storage_gib: f64) -> std::io::Result<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let mem_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .ok_or_else(|| std::io::Error::other("/proc/meminfo has no MemTotal line"))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Ok(Self {
            mem_gib: mem_kib as f64 / (1024.0 * 1024.0),
            storage_gib,
            cpu_threads: threads,
        })
    }
}

/// The offer's properties for `resources` on this host's platform.
pub fn offer_properties(resources: &Resources, node_name: &str) -> Properties {
    let props = json!({
        "golem.node.id.name": node_name,
        "golem.inf.mem.gib": resources.mem_gib,
        "golem.inf.storage.gib": resources.storage_gib,
        "golem.inf.cpu.threads": resources.cpu_threads,
        "golem.inf.cpu.architecture": std::env::consts::ARCH,
        "golem.runtime.name": "vm",
        "golem.runtime.capabilities": ["manifest-support"],
        "golem.srv.caps.payload-manifest": true,
        "golem.srv.comp.platform.os": std::env::consts::OS,
    });
    match props {
        Value::Object(map) => map.into_iter().collect(),
        _ => unreachable!("json! of an object literal is an object"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::constraints::Filter;

    #[test]
    fn a_typical_golem_demand_selects_this_offer() {
        let res = Resources::of_host(10.0).unwrap();
        assert!(res.mem_gib > 0.1 && res.cpu_threads >= 1, "{res:?}");
        let props = offer_properties(&res, "test-provider");
        let demand = format!(
            "(&(golem.inf.mem.gib>=0.1)(golem.runtime.name=vm)(golem.srv.caps.payload-manifest=true)(golem.inf.cpu.architecture={}))",
            std::env::consts::ARCH
        );
        assert!(Filter::parse(&demand).unwrap().matches(&props));
        let too_big = format!("(golem.inf.mem.gib>={})", res.mem_gib * 2.0);
        assert!(!Filter::parse(&too_big).unwrap().matches(&props));
    }
}
