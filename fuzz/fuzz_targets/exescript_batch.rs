//! An ExeScript batch as a requestor sends it, checked by a gate compiled from script
//! constraints as a manifest carries them. The input is `constraints JSON` NUL `batch
//! JSON`; a first byte `r` (before the constraints) selects regex as the default match.
//!
//! Checks: `check_batch` stops at the first command `check_each` denies, and a command
//! that passes renders into the same text twice (the gate compares renderings).
#![no_main]

use exescript::{compile, parse_batch, Match};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (how, data) = match data.split_first() {
        Some((b'r', rest)) => (Match::Regex, rest),
        _ => (Match::Strict, data),
    };
    let (constraints, batch) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"[]"[..], data),
    };
    let Ok(batch) = std::str::from_utf8(batch) else {
        return;
    };
    let commands = parse_batch(batch);
    let gate = match serde_json::from_slice::<Vec<serde_json::Value>>(constraints) {
        Ok(list) => match compile(&list, how) {
            Ok(gate) => gate,
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        },
        Err(_) => exescript::Gate::allow_all(),
    };
    let Ok(commands) = commands else {
        return;
    };
    let first = gate.check_batch(&commands);
    let each: Vec<_> = gate.check_each(&commands).collect();
    match first {
        Ok(()) => assert!(each.iter().all(Result::is_ok)),
        Err(denial) => {
            let at = each.iter().position(Result::is_err).expect("a denial");
            assert_eq!(at, denial.index);
            assert_eq!(each[at].as_ref().unwrap_err(), &denial);
            let _ = denial.to_string();
            let _ = denial.reason.code().as_str();
        }
    }
    for command in &commands {
        assert_eq!(command.render(), command.to_string());
        // A parsed batch serializes back to a batch that parses to the same commands.
        let again = serde_json::to_string(&[command]).expect("serializes");
        assert_eq!(
            parse_batch(&again).expect("reparses"),
            vec![command.clone()]
        );
    }
});
