//! How fast the gate judges a command: checks per second and per-check latency on one thread,
//! against a 50-constraint regex list and a 50-constraint strict list (and, for comparison,
//! a regex list whose constraints name envs, which takes the slower "which patterns matched"
//! path).
//!
//! Run with `cargo bench -p exescript --bench gate`. Half of the checked commands are allowed
//! and half are near misses (an extra argument, a suffix, another tool), so both the allow
//! and the denial paths (which builds a `Denial`) are measured.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use exescript::{compile, Command, Gate, Match, Run};
use serde_json::{json, Value};

const CONSTRAINTS: usize = 50;
/// Distinct commands cycled through, so the branch predictor cannot learn one answer.
const POOL: usize = 1024;
const THROUGHPUT_CHECKS: usize = 2_000_000;
const LATENCY_CHECKS: usize = 1_000_000;

fn main() {
    println!("exescript gate: one thread, {CONSTRAINTS} run constraints per list, {POOL} distinct commands (half allowed)");
    println!(
        "{:<12} {:>11} {:>13} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "list", "compile", "checks/s", "p50", "p99", "p99.9", "max", "allowed"
    );
    scenario("regex", regex_constraints(false), Match::Regex, |i| {
        regex_command(i)
    });
    scenario(
        "strict",
        strict_constraints(),
        Match::Strict,
        strict_command,
    );
    scenario("regex+env", regex_constraints(true), Match::Regex, |i| {
        regex_command(i)
    });
}

fn scenario(name: &str, constraints: Vec<Value>, default: Match, command: fn(usize) -> Command) {
    let started = Instant::now();
    let gate = compile(&constraints, default).expect("bench constraints compile");
    let compile_time = started.elapsed();

    let pool: Vec<Command> = (0..POOL).map(command).collect();
    let allowed = pool.iter().filter(|c| gate.check(c).is_ok()).count();

    // Warm up: the regex engine builds its lazy DFA states on first use.
    run_checks(&gate, &pool, POOL * 16);

    let started = Instant::now();
    run_checks(&gate, &pool, THROUGHPUT_CHECKS);
    let elapsed = started.elapsed();
    let per_second = THROUGHPUT_CHECKS as f64 / elapsed.as_secs_f64();

    // Each check timed on its own; the clock's own cost (tens of ns) is included, so the
    // percentiles err on the slow side.
    let mut samples: Vec<Duration> = Vec::with_capacity(LATENCY_CHECKS);
    for i in 0..LATENCY_CHECKS {
        let command = &pool[i % POOL];
        let started = Instant::now();
        let verdict = gate.check(black_box(command));
        samples.push(started.elapsed());
        black_box(verdict).ok();
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];

    println!(
        "{:<12} {:>11} {:>13.0} {:>8} {:>8} {:>8} {:>9} {:>5}/{}",
        name,
        fmt(compile_time),
        per_second,
        fmt(pct(0.50)),
        fmt(pct(0.99)),
        fmt(pct(0.999)),
        fmt(samples[samples.len() - 1]),
        allowed,
        POOL
    );
}

fn run_checks(gate: &Gate, pool: &[Command], checks: usize) {
    for i in 0..checks {
        black_box(gate.check(black_box(&pool[i % POOL]))).ok();
    }
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns}ns")
    } else if ns < 10_000_000 {
        format!("{}µs", ns / 1_000)
    } else {
        format!("{}ms", ns / 1_000_000)
    }
}

/// Tools of a realistic shape: a program, fixed flags, file names and numbers that vary.
fn regex_constraints(with_env: bool) -> Vec<Value> {
    (0..CONSTRAINTS)
        .map(|i| {
            let pattern = format!(
                r"run /opt/app/tool{i} --input /data/in{i}/[a-z0-9_]+\.csv --threads [0-9]{{1,2}}( --verbose)?"
            );
            if with_env && names_env(i) {
                json!({ "run": { "args": pattern.trim_start_matches("run "), "env": { "MODE": format!("m{i}") } } })
            } else {
                Value::String(pattern)
            }
        })
        .collect()
}

fn regex_command(i: usize) -> Command {
    let tool = (i * 7) % CONSTRAINTS;
    let mut args = vec![
        "--input".to_owned(),
        format!("/data/in{tool}/batch_{i}.csv"),
        "--threads".to_owned(),
        format!("{}", i % 64),
    ];
    // Every other command is a near miss the anchors must catch.
    match i % 4 {
        1 => args.push("; reboot".to_owned()),
        3 => args[1] = format!("/data/in{tool}/../../etc/passwd"),
        _ => {}
    }
    let env = if names_env(tool) {
        BTreeMap::from([("MODE".to_owned(), format!("m{tool}"))])
    } else {
        BTreeMap::new()
    };
    Command::Run(Run {
        entry_point: format!("/opt/app/tool{tool}"),
        args,
        env,
        capture: None,
    })
}

/// Every fifth tool's constraint names an env in the `regex+env` list. (Not
/// `is_multiple_of`: the workspace promises Rust 1.80.)
fn names_env(tool: usize) -> bool {
    matches!(tool % 5, 0)
}

fn strict_constraints() -> Vec<Value> {
    (0..CONSTRAINTS)
        .map(|i| Value::String(strict_rendering(i)))
        .collect()
}

fn strict_rendering(i: usize) -> String {
    format!("run /opt/app/tool{i} --input /data/in{i}/batch.csv --threads 8")
}

fn strict_command(i: usize) -> Command {
    let tool = (i * 7) % CONSTRAINTS;
    let mut args = vec![
        "--input".to_owned(),
        format!("/data/in{tool}/batch.csv"),
        "--threads".to_owned(),
        "8".to_owned(),
    ];
    match i % 4 {
        1 => args.push("--verbose".to_owned()),
        3 => args[3] = "9".to_owned(),
        _ => {}
    }
    Command::Run(Run {
        entry_point: format!("/opt/app/tool{tool}"),
        args,
        env: BTreeMap::new(),
        capture: None,
    })
}
