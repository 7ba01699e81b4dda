//! The LDAP-style constraint language of demands (`provider::market::constraints`).
//!
//! Round trip: what parses prints as text that parses to the same filter, and printing
//! that again gives the same text. Evaluation over a fixed property map (numbers,
//! strings, booleans, lists) must not panic, and `unmet` is empty exactly when the
//! filter matches.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use provider::market::constraints::{Filter, Properties};
use serde_json::json;

fn props() -> &'static Properties {
    static P: OnceLock<Properties> = OnceLock::new();
    P.get_or_init(|| {
        let mut p = Properties::new();
        p.insert("golem.inf.mem.gib".into(), json!(8.0));
        p.insert("golem.inf.cpu.threads".into(), json!(2));
        p.insert("golem.runtime.name".into(), json!("vm"));
        p.insert("golem.node.id.name".into(), json!("provider-a*b"));
        p.insert(
            "golem.com.payment.platform".into(),
            json!(["erc20-holesky-tglm", "x"]),
        );
        p.insert("golem.srv.caps.multi-activity".into(), json!(true));
        p.insert("a".into(), json!(""));
        p.insert("b".into(), json!(null));
        p.insert("c".into(), json!({"k": 1}));
        p.insert("n".into(), json!(-1.5e300));
        p
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(filter) = Filter::parse(text) else {
        return;
    };
    let printed = filter.to_string();
    let again = Filter::parse(&printed)
        .unwrap_or_else(|e| panic!("`{text}` printed as `{printed}`, which does not parse: {e}"));
    assert_eq!(filter, again, "`{text}` printed as `{printed}`");
    assert_eq!(printed, again.to_string());
    let props = props();
    let matches = filter.matches(props);
    assert_eq!(matches, again.matches(props));
    let unmet = filter.unmet(props);
    if matches {
        assert!(unmet.is_empty());
    } else {
        assert!(
            !unmet.is_empty(),
            "`{printed}` fails but names nothing unmet"
        );
    }
});
