//! The `provider` command line: argument model (clap derive) and dispatch.
//!
//! Exit codes: 0 success (or an accepted manifest), 1 a rejected manifest, 2 bad input, a
//! usage error or an I/O error. Every error is one line on stderr.

mod audit;
pub(crate) mod egress;
mod images;
mod keystore;
pub(crate) mod manifest;
pub(crate) mod output;
mod preset;
mod profile;
mod registry;
mod rule;
mod run;
mod script;
mod selftest;
mod status;
pub mod vm;
mod whitelist;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::store::DataDir;

/// Provider agent: sell compute on a peer-to-peer network, under your rules.
#[derive(Debug, Parser)]
#[command(name = "provider", version, about)]
pub struct Cli {
    /// Data dir (rules, whitelist, keystore, jobs, audit log).
    #[arg(long, global = true, env = "PROVIDER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trusted certificate authorities (the keystore, `cert-dir/`).
    #[command(subcommand)]
    Keystore(keystore::KeystoreCmd),
    /// Outbound network, blacklist and allow-only rules.
    #[command(subcommand)]
    Rule(rule::RuleCmd),
    /// Domains the `whitelist` outbound mode allows.
    #[command(subcommand)]
    Whitelist(whitelist::WhitelistCmd),
    /// Check a Computation Payload Manifest against this provider's rules.
    #[command(subcommand)]
    Manifest(manifest::ManifestCmd),
    /// Check ExeScript commands against a manifest's script constraints.
    #[command(subcommand)]
    Script(script::ScriptCmd),
    /// The egress proxy: run one manifest's network policy standalone.
    #[command(subcommand)]
    Egress(egress::EgressCmd),
    /// Payloads in a VM: run one command in a fresh VM, or check what this host offers.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// The image cache: list what is stored, evict what no job uses.
    #[command(subcommand)]
    Images(images::ImagesCmd),
    /// Logins to OCI registries for `oci://` images.
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Run the provider daemon: join the network, negotiate, run jobs.
    Run(run::RunArgs),
    /// The hardware profile: how much of this machine is sold.
    #[command(subcommand)]
    Profile(profile::ProfileCmd),
    /// Price lists (yagna's linear model) the offer publishes.
    #[command(subcommand)]
    Preset(preset::PresetCmd),
    /// What the running daemon is doing: peer id, addresses, offer, running jobs.
    Status,
    /// Running and finished jobs, from the data dir.
    #[command(subcommand)]
    Jobs(status::JobsCmd),
    /// The audit log, filtered.
    Audit(audit::AuditArgs),
    /// Check that this host can run the daemon and its jobs; say how to fix what is missing.
    SelfTest(selftest::SelfTestArgs),
}

/// Outcome of a command that ran to the end.
pub enum Outcome {
    Done,
    /// `manifest check` rejected the demand, or `script check` denied a command.
    Rejected,
    /// Exit with this code (`vm run` passes its command's exit code through).
    Code(u8),
}

/// Context every command gets.
pub struct Ctx {
    pub data: DataDir,
    pub json: bool,
}

/// Parses the process arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Rejected) => ExitCode::from(1),
        Ok(Outcome::Code(c)) => ExitCode::from(c),
        Err(e) => {
            eprintln!("error: {}", one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let ctx = Ctx {
        data: DataDir::resolve(cli.data_dir)?,
        json: cli.json,
    };
    match cli.command {
        Command::Keystore(cmd) => keystore::run(&ctx, cmd),
        Command::Rule(cmd) => rule::run(&ctx, cmd),
        Command::Whitelist(cmd) => whitelist::run(&ctx, cmd),
        Command::Manifest(cmd) => manifest::run(&ctx, cmd),
        Command::Script(cmd) => script::run(&ctx, cmd),
        Command::Egress(cmd) => egress::run(&ctx, cmd),
        Command::Vm(cmd) => vm::run(&ctx, cmd),
        Command::Images(cmd) => images::run(&ctx, cmd),
        Command::Registry(cmd) => registry::run(&ctx, cmd),
        Command::Run(args) => run::run(&ctx, args),
        Command::Profile(cmd) => profile::run(&ctx, cmd),
        Command::Preset(cmd) => preset::run(&ctx, cmd),
        Command::Status => status::status(&ctx),
        Command::Jobs(cmd) => status::jobs(&ctx, cmd),
        Command::Audit(args) => audit::run(&ctx, args),
        Command::SelfTest(args) => selftest::run(&ctx, args),
    }
}

pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in logs and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// clap's usage errors span several lines; operators and scripts get one, with the hint.
pub(crate) fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let text = e.render().to_string();
            let body: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .filter(|l| !l.starts_with("Usage:"))
                .collect();
            let line = body.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("error: {line} (see --help)");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
