//! `provider registry login|logout|auth list`: the operator's logins to OCI registries, in
//! the data dir's `registry/auth.json` (`0600`; see [`crate::images::oci::auth`]). The
//! secret is read from stdin only, never from the command line (where `ps` and shell
//! history would keep it), and never printed.

use std::io::Read as _;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::images::fetch::FetchLimits;
use crate::images::oci::auth::{AuthFile, Credential};
use crate::images::oci::Registry;

#[derive(Debug, Subcommand)]
pub enum RegistryCmd {
    /// Store a login for REGISTRY (`host` or `host:port`), checked against it first.
    Login(LoginArgs),
    /// Forget the login for REGISTRY.
    Logout {
        /// `host` or `host:port`, as in `oci://` references.
        registry: String,
    },
    /// The stored logins (never their secrets).
    #[command(subcommand)]
    Auth(AuthCmd),
}

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Registries with a stored login.
    List,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// `host` or `host:port`, as in `oci://` references.
    pub registry: String,
    #[arg(long, short = 'u')]
    pub username: String,
    /// Read the password or token from stdin (the only way to give it).
    #[arg(long)]
    pub password_stdin: bool,
    /// Let requestors' `oci://` pulls use this login too (they can then run, and read,
    /// any image it opens).
    #[arg(long)]
    pub for_requestors: bool,
    /// A token service on another host than the registry that may be sent this login
    /// (`host[:port]`, e.g. `auth.docker.io` for `registry-1.docker.io`). Without it the
    /// login goes to the registry's own origin only. Repeatable.
    #[arg(long = "token-realm", value_name = "HOST[:PORT]")]
    pub token_realms: Vec<String>,
    /// Speak plain HTTP to this (non-loopback) registry for the check.
    #[arg(long)]
    pub plain_http: bool,
    /// Store without checking against the registry.
    #[arg(long)]
    pub no_verify: bool,
}

pub fn run(ctx: &Ctx, cmd: RegistryCmd) -> anyhow::Result<Outcome> {
    match cmd {
        RegistryCmd::Login(args) => login(ctx, args),
        RegistryCmd::Logout { registry } => {
            let registry = registry.to_ascii_lowercase();
            let lock = ctx.data.lock()?;
            let mut file = AuthFile::load(&ctx.data)?;
            if file.registries.remove(&registry).is_none() {
                anyhow::bail!(
                    "no login stored for `{registry}` (see `provider registry auth list`)"
                );
            }
            file.save(&ctx.data, &lock)?;
            eprintln!("removed the login for {registry}");
            Ok(Outcome::Done)
        }
        RegistryCmd::Auth(AuthCmd::List) => {
            let entries = AuthFile::load(&ctx.data)?.entries();
            if ctx.json {
                output::json(&entries)?;
                return Ok(Outcome::Done);
            }
            let mut t = Table::new(&["REGISTRY", "USERNAME", "FOR REQUESTORS", "TOKEN REALMS"]);
            for e in &entries {
                t.row(vec![
                    e.registry.clone(),
                    e.username.clone(),
                    if e.for_requestors { "yes" } else { "no" }.into(),
                    if e.token_realms.is_empty() {
                        "-".into()
                    } else {
                        e.token_realms.join(",")
                    },
                ]);
            }
            t.print();
            Ok(Outcome::Done)
        }
    }
}

fn login(ctx: &Ctx, args: LoginArgs) -> anyhow::Result<Outcome> {
    if !args.password_stdin {
        anyhow::bail!(
            "give the password or token on stdin with --password-stdin (it is never taken from the command line)"
        );
    }
    if args.username.is_empty() || args.username.contains(':') {
        anyhow::bail!(
            "--username must be non-empty and without `:` (basic auth joins them with one)"
        );
    }
    let registry = args.registry.to_ascii_lowercase();
    let mut secret = String::new();
    std::io::stdin()
        .read_to_string(&mut secret)
        .context("read the password from stdin")?;
    let secret = secret.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        anyhow::bail!("stdin held no password");
    }
    let credential = Credential {
        username: args.username,
        secret,
        for_requestors: args.for_requestors,
        token_realms: args
            .token_realms
            .iter()
            .map(|r| r.to_ascii_lowercase())
            .collect(),
    };
    for r in &credential.token_realms {
        if r.is_empty() || r.contains(['/', '@', ' ']) {
            anyhow::bail!("--token-realm `{r}` is not host or host:port");
        }
    }
    if !args.no_verify {
        let plain = if args.plain_http {
            vec![registry.clone()]
        } else {
            Vec::new()
        };
        Registry::check_login(
            &registry,
            &FetchLimits::operator(),
            &plain,
            credential.clone(),
        )
        .with_context(|| format!("log in to {registry} (nothing was stored)"))?;
    }
    let lock = ctx.data.lock()?;
    let mut file = AuthFile::load(&ctx.data)?;
    file.registries.insert(registry.clone(), credential);
    file.save(&ctx.data, &lock)?;
    eprintln!(
        "login for {registry} stored in {}",
        crate::images::oci::auth::auth_path(&ctx.data).display()
    );
    Ok(Outcome::Done)
}
