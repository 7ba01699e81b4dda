//! Builders shared by the integration tests, so each case reads as the command it checks.

use std::collections::BTreeMap;

use exescript::{Command, Run, Transfer};

pub fn run(entry_point: &str, args: &[&str]) -> Command {
    run_env(entry_point, args, &[])
}

pub fn run_env(entry_point: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    Command::Run(Run {
        entry_point: entry_point.to_owned(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        capture: None,
    })
}

pub fn transfer(from: &str, to: &str) -> Command {
    Command::Transfer(Transfer {
        from: from.to_owned(),
        to: to.to_owned(),
        format: None,
        depth: None,
        fileset: Vec::new(),
    })
}
