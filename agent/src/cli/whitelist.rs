//! `provider whitelist add|list|remove`: domains the `whitelist` outbound mode allows.

use clap::{Subcommand, ValueEnum};
use policies::{DomainPattern, PatternMatch};
use serde::Serialize;

use super::output::{self, Table};
use super::{Ctx, Outcome};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MatchArg {
    /// The whole host, case-insensitively.
    Strict,
    /// A regex that must match the whole host.
    Regex,
}

impl From<MatchArg> for PatternMatch {
    fn from(m: MatchArg) -> Self {
        match m {
            MatchArg::Strict => PatternMatch::Strict,
            MatchArg::Regex => PatternMatch::Regex,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WhitelistCmd {
    /// Add domain patterns.
    Add {
        /// A host name (strict) or a regex over the whole host (regex).
        #[arg(short = 'p', long = "pattern", required = true, num_args = 1..)]
        patterns: Vec<String>,
        #[arg(short = 't', long = "type", value_enum, default_value = "strict")]
        match_: MatchArg,
    },
    /// List domain patterns.
    List,
    /// Remove domain patterns by id (see `whitelist list`).
    Remove {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

#[derive(Serialize)]
struct Row<'a> {
    id: String,
    domain: &'a str,
    #[serde(rename = "match")]
    match_: PatternMatch,
}

fn rows(patterns: &[DomainPattern]) -> Vec<Row<'_>> {
    patterns
        .iter()
        .map(|p| Row {
            id: p.id(),
            domain: &p.domain,
            match_: p.match_,
        })
        .collect()
}

fn print(ctx: &Ctx, patterns: &[DomainPattern]) -> anyhow::Result<Outcome> {
    let rows = rows(patterns);
    if ctx.json {
        return output::json(&rows).map(|_| Outcome::Done);
    }
    if rows.is_empty() {
        println!("The domain whitelist is empty.");
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&["ID", "TYPE", "PATTERN"]);
    for r in rows {
        t.row(vec![r.id, r.match_.as_str().into(), r.domain.into()]);
    }
    t.print();
    Ok(Outcome::Done)
}

pub fn run(ctx: &Ctx, cmd: WhitelistCmd) -> anyhow::Result<Outcome> {
    match cmd {
        WhitelistCmd::List => print(ctx, &ctx.data.load_whitelist()?.patterns),
        WhitelistCmd::Add { patterns, match_ } => {
            let new: Vec<DomainPattern> = patterns
                .into_iter()
                .map(|domain| DomainPattern {
                    domain: domain.trim().to_owned(),
                    match_: match_.into(),
                })
                .collect();
            for p in &new {
                p.validate()?;
            }
            let lock = ctx.data.lock()?;
            let mut list = ctx.data.load_whitelist()?;
            let mut added = Vec::new();
            for p in new {
                if !list.patterns.contains(&p) {
                    list.patterns.push(p.clone());
                    added.push(p);
                }
            }
            ctx.data.save_whitelist(&lock, &list)?;
            drop(lock);
            print(ctx, &added)
        }
        WhitelistCmd::Remove { ids } => {
            let lock = ctx.data.lock()?;
            let mut list = ctx.data.load_whitelist()?;
            for id in &ids {
                if !list
                    .patterns
                    .iter()
                    .any(|p| p.id() == id.to_ascii_lowercase())
                {
                    anyhow::bail!(
                        "no whitelist pattern has id `{id}` (see `provider whitelist list`)"
                    );
                }
            }
            let (removed, kept): (Vec<_>, Vec<_>) = list
                .patterns
                .into_iter()
                .partition(|p| ids.iter().any(|id| p.id() == id.to_ascii_lowercase()));
            list.patterns = kept;
            ctx.data.save_whitelist(&lock, &list)?;
            drop(lock);
            print(ctx, &removed)
        }
    }
}
