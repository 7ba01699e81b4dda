//! The provider's offer: the properties a requestor's constraints are evaluated against.
//!
//! Property names follow Golem's (`golem.inf.*`, `golem.runtime.*`, `golem.srv.*`,
//! `golem.com.*`) so demands written for yagna providers select this one too. The
//! resources are the hardware profile's — the whole of what is sold, not one job's share
//! (see [`super::profile`]) — and the pricing is the offered preset's (see
//! [`super::pricing`]).

use serde_json::{json, Value};

use super::constraints::Properties;
use super::pricing::Preset;
use super::profile::{HardwareProfile, CPU_THREADS, MEM_GIB, STORAGE_GIB};

/// The offer's properties for `profile` and `preset` on this host's platform.
pub fn offer_properties(profile: &HardwareProfile, preset: &Preset, node_name: &str) -> Properties {
    let props = json!({
        "golem.node.id.name": node_name,
        MEM_GIB: profile.mem_gib,
        STORAGE_GIB: profile.storage_gib,
        CPU_THREADS: profile.cpu_threads,
        "golem.inf.cpu.architecture": std::env::consts::ARCH,
        "golem.runtime.name": "vm",
        "golem.runtime.capabilities": ["manifest-support"],
        "golem.srv.caps.payload-manifest": true,
        "golem.srv.comp.platform.os": std::env::consts::OS,
        "golem.srv.caps.max-jobs": profile.max_jobs,
    });
    let mut out: Properties = match props {
        Value::Object(map) => map.into_iter().collect(),
        _ => unreachable!("json! of an object literal is an object"),
    };
    out.extend(preset.offer_properties());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::constraints::Filter;

    #[test]
    fn the_offer_advertises_the_profile_and_a_typical_golem_demand_selects_it() {
        let profile = HardwareProfile {
            cpu_threads: 2,
            mem_gib: 3.5,
            storage_gib: 20.0,
            max_jobs: 2,
        };
        let props = offer_properties(&profile, &Preset::builtin(), "test-provider");
        assert_eq!(props[MEM_GIB], json!(3.5));
        assert_eq!(props[CPU_THREADS], json!(2));
        assert_eq!(props[STORAGE_GIB], json!(20.0));
        assert_eq!(props["golem.com.pricing.model"], json!("linear"));
        let demand = format!(
            "(&(golem.inf.mem.gib>=0.1)(golem.runtime.name=vm)(golem.srv.caps.payload-manifest=true)(golem.inf.cpu.architecture={}))",
            std::env::consts::ARCH
        );
        assert!(Filter::parse(&demand).unwrap().matches(&props));
        assert!(!Filter::parse("(golem.inf.mem.gib>=7)")
            .unwrap()
            .matches(&props));
    }
}
