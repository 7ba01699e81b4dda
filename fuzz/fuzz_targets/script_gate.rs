//! Script constraints written as regular expressions, structure-aware: random regex
//! fragments from a small alphabet (so they compile often and match renderings often)
//! and random `run` commands over the same alphabet.
//!
//! The invariant is the gate's promise: it never allows a `run` that no constraint's
//! anchored pattern (`^(?:run (?:args))$`, compiled here on our own) matches, and with
//! no environment constraints it allows every `run` one of them does match.
#![no_main]

use arbitrary::Arbitrary;
use exescript::{compile, Command, Match, Run};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

#[derive(Debug, Arbitrary)]
enum Piece {
    Lit(u8),
    Dot,
    Star,
    Plus,
    Question,
    Alt,
    Open,
    Close,
    Class(u8, u8),
    Raw(String),
}

const ALPHABET: &[u8] = b"ab/ -.";

fn fragment(pieces: &[Piece]) -> String {
    let mut s = String::new();
    for p in pieces {
        match p {
            Piece::Lit(b) => s.push(ALPHABET[*b as usize % ALPHABET.len()] as char),
            Piece::Dot => s.push('.'),
            Piece::Star => s.push('*'),
            Piece::Plus => s.push('+'),
            Piece::Question => s.push('?'),
            Piece::Alt => s.push('|'),
            Piece::Open => s.push('('),
            Piece::Close => s.push(')'),
            Piece::Class(a, b) => {
                let a = ALPHABET[*a as usize % ALPHABET.len()] as char;
                let b = ALPHABET[*b as usize % ALPHABET.len()] as char;
                s.push_str(&format!("[{a}{b}]"));
            }
            Piece::Raw(text) => s.push_str(text),
        }
    }
    s
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Per constraint: its fragments, and whether it is written as a plain string
    /// (`run <fragment>`) or as an object (`{"run":{"args":…}}`).
    constraints: Vec<(bool, Vec<Piece>)>,
    /// Per command: entry point and argument, as alphabet indices.
    commands: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
}

fn word(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fuzz_target!(|input: Input| {
    let mut entries = Vec::new();
    let mut anchored = Vec::new();
    for (plain, pieces) in input.constraints.iter().take(8) {
        let args = fragment(pieces);
        if *plain {
            let text = format!("run {args}");
            anchored.push(format!("^(?:{text})$"));
            entries.push(json!(text));
        } else {
            anchored.push(format!("^(?:run (?:{args}))$"));
            entries.push(json!({"run": {"args": args}}));
        }
    }
    let Ok(gate) = compile(&entries, Match::Regex) else {
        return;
    };
    // Every constraint compiled, so every anchored pattern compiles on its own too.
    let patterns: Vec<regex::Regex> = anchored
        .iter()
        .map(|p| regex::Regex::new(p).expect("the gate compiled it"))
        .collect();
    for (entry, args) in input.commands.iter().take(8) {
        let run = Run {
            entry_point: format!("/{}", word(entry)),
            args: args.iter().map(|a| word(a)).collect(),
            env: Default::default(),
            capture: None,
        };
        let rendering = run.render();
        let command = Command::Run(run);
        let allowed = gate.check(&command).is_ok();
        let matched = patterns.iter().any(|p| p.is_match(&rendering));
        if allowed {
            assert!(
                matched,
                "allowed `{rendering}` that no anchored pattern matches"
            );
        }
        // A denial with a matching pattern is only right when the command itself is not
        // canonical (the gate refuses those before any constraint).
        if matched && !allowed {
            let denial = gate.check(&command).unwrap_err();
            assert!(
                matches!(
                    denial.reason,
                    exescript::DenialReason::EntryPointInvalid { .. }
                ),
                "denied `{rendering}` which {:?} matches: {denial}",
                anchored
            );
        }
    }
});
