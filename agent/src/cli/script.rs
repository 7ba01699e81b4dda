//! `provider script check`: which commands of an ExeScript batch a manifest's script
//! constraints allow, and why the others are denied.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use exescript::Gate;
use policies::ReceivedManifest;
use serde::Serialize;

use super::output::{self, Table};
use super::{Ctx, Outcome};

#[derive(Debug, Subcommand)]
pub enum ScriptCmd {
    /// Check every command of a batch against the manifest's `compManifest.script`.
    Check {
        /// The manifest: its JSON, or the base64 text a requestor sends.
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// The ExeScript batch: a JSON array of commands.
        #[arg(long, value_name = "BATCH.json")]
        script: PathBuf,
    },
}

#[derive(Serialize)]
struct Row {
    index: usize,
    command: String,
    verdict: &'static str,
    reason: Option<String>,
}

pub fn run(ctx: &Ctx, cmd: ScriptCmd) -> anyhow::Result<Outcome> {
    let ScriptCmd::Check { manifest, script } = cmd;
    let bytes =
        std::fs::read(&manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let received = ReceivedManifest::from_file_bytes(&bytes)
        .with_context(|| format!("manifest {}", manifest.display()))?;
    let gate = match received.script() {
        None => Gate::allow_all(),
        Some(s) => exescript::compile(&s.commands, s.match_).with_context(|| {
            format!(
                "manifest {}: compManifest.script (a demand with it is rejected as script-invalid)",
                manifest.display()
            )
        })?,
    };
    let text = std::fs::read_to_string(&script)
        .with_context(|| format!("cannot read {}", script.display()))?;
    let batch = exescript::parse_batch(&text).with_context(|| format!("{}", script.display()))?;
    let rows: Vec<Row> = batch
        .iter()
        .zip(gate.check_each(&batch))
        .enumerate()
        .map(|(index, (command, verdict))| match verdict {
            Ok(()) => Row {
                index,
                command: command.render(),
                verdict: "allow",
                reason: None,
            },
            Err(denial) => Row {
                index,
                command: denial.command,
                verdict: "deny",
                reason: Some(denial.reason.to_string()),
            },
        })
        .collect();
    let denied = rows.iter().any(|r| r.verdict == "deny");
    if ctx.json {
        #[derive(Serialize)]
        struct Report<'a> {
            commands: &'a [Row],
        }
        output::json(&Report { commands: &rows })?;
    } else {
        let mut t = Table::new(&["#", "VERDICT", "COMMAND", "REASON"]);
        for r in &rows {
            t.row(vec![
                r.index.to_string(),
                r.verdict.into(),
                r.command.clone(),
                r.reason.clone().unwrap_or_default(),
            ]);
        }
        t.print();
    }
    Ok(if denied {
        Outcome::Rejected
    } else {
        Outcome::Done
    })
}
