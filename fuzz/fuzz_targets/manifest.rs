//! The manifest parser and validator (`policies::ReceivedManifest`), differential against
//! Golem's JSON Schema: our parser is stricter on purpose, so the check is one-way — a
//! document we accept must be one the schema accepts.
//!
//! What we accept also goes on to what negotiation does with it: the script section is
//! compiled into a gate and the outbound section into an egress policy.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use policies::{Mode, ReceivedManifest, WhitelistMatcher};

static SCHEMA: &str =
    include_str!("../../../shared/vectors/golem/computation-payload-manifest.schema.json");

fn schema() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("Golem's schema compiles")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(received) = ReceivedManifest::from_file_bytes(data) else {
        return;
    };
    // The JSON we accepted, whichever form it came in.
    let doc: serde_json::Value =
        serde_json::from_slice(&received.json).expect("an accepted manifest is JSON");
    if let Err(error) = schema().validate(&doc) {
        panic!(
            "accepted a manifest Golem's schema rejects: {error} at {}\n{}",
            error.instance_path,
            String::from_utf8_lossy(&received.json)
        );
    }
    if let Some(script) = received.script() {
        let _ = exescript::compile(&script.commands, script.match_);
    }
    let _ = received.select_payload(&policies::Platform::host());
    let _ = received.check_time(chrono::Utc::now());
    for mode in [Mode::All, Mode::Whitelist] {
        let policy = egress::EgressPolicy::new(
            "fuzz",
            &received.outbound,
            mode,
            &WhitelistMatcher::new(&[]).expect("empty whitelist"),
            egress::AddressPolicy::new(Vec::new()),
            egress::Limits::default(),
        );
        let _ = policy.describe();
    }
});
