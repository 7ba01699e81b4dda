//! The gate: a manifest's script constraints compiled once, then asked about every command
//! before it reaches the machine.
//!
//! Per command kind the gate keeps a hash map from exact renderings to the strict
//! constraints that name them, and one `RegexSet` of all anchored regex constraints, so a
//! check costs one rendering, one hash lookup and one automaton pass however many
//! constraints the manifest lists.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use regex::{RegexSet, RegexSetBuilder};
use serde_json::Value;

use crate::command::Command;
use crate::constraint::{CompileError, Constraint, Kind};
use crate::Match;

/// The environment a transfer is checked with: transfers have none, and a transfer
/// constraint cannot name one.
static NO_ENV: BTreeMap<String, String> = BTreeMap::new();

/// Compiles `compManifest.script`: `commands` as found in the manifest (plain strings, JSON
/// objects, or JSON objects encoded as strings) and `default_match` from `script.match`,
/// which a constraint's own `match` overrides.
///
/// Fails on the first entry that cannot be read exactly, so a broken manifest is rejected at
/// negotiation rather than allowing or denying something its author did not mean at run
/// time. An empty `commands` list gives a gate that allows no `run` and no `transfer`.
pub fn compile(commands: &[Value], default_match: Match) -> Result<Gate, CompileError> {
    let mut run = TableBuilder::default();
    let mut transfer = TableBuilder::default();
    for (index, entry) in commands.iter().enumerate() {
        let constraint = Constraint::parse(index, entry, default_match)?;
        match constraint.kind {
            Kind::Run => run.add(constraint),
            Kind::Transfer => transfer.add(constraint),
        }
    }
    Ok(Gate {
        tables: Some(Tables {
            run: run.build(Kind::Run)?,
            transfer: transfer.build(Kind::Transfer)?,
        }),
    })
}

/// A compiled `compManifest.script`. Cheap to share: checking takes `&self`.
#[derive(Debug, Clone)]
pub struct Gate {
    /// `None` for a manifest without a script section: everything is allowed.
    tables: Option<Tables>,
}

#[derive(Debug, Clone)]
struct Tables {
    run: Table,
    transfer: Table,
}

/// The constraints of one kind.
#[derive(Debug, Clone)]
struct Table {
    /// Exact rendering → the strict constraints with that text.
    strict: HashMap<String, Vec<Allowance>>,
    /// All anchored regex constraints; `None` when there are none.
    regex: Option<RegexSet>,
    /// Parallel to the patterns of `regex`.
    regex_allowances: Vec<Allowance>,
    /// Whether any regex constraint names an env. Only then must we learn *which* patterns
    /// matched; otherwise the cheaper "does any match" answers the question.
    regex_env: bool,
    /// How many constraints of this kind the manifest lists, for the denial message.
    count: usize,
}

/// What one constraint allows once its text or pattern matches.
#[derive(Debug, Clone)]
struct Allowance {
    index: usize,
    env: Option<BTreeMap<String, String>>,
}

impl Allowance {
    fn admits(&self, env: &BTreeMap<String, String>) -> bool {
        match &self.env {
            None => true,
            Some(wanted) => wanted == env,
        }
    }
}

#[derive(Default)]
struct TableBuilder {
    strict: HashMap<String, Vec<Allowance>>,
    patterns: Vec<String>,
    regex_allowances: Vec<Allowance>,
    count: usize,
}

impl TableBuilder {
    fn add(&mut self, constraint: Constraint) {
        self.count += 1;
        let allowance = Allowance {
            index: constraint.index,
            env: constraint.env,
        };
        match constraint.how {
            Match::Strict => self
                .strict
                .entry(constraint.text)
                .or_default()
                .push(allowance),
            Match::Regex => {
                self.patterns.push(constraint.text);
                self.regex_allowances.push(allowance);
            }
        }
    }

    fn build(self, kind: Kind) -> Result<Table, CompileError> {
        let regex = if self.patterns.is_empty() {
            None
        } else {
            let set = RegexSetBuilder::new(&self.patterns)
                .build()
                .map_err(|error| CompileError::TooLarge { kind, error })?;
            Some(set)
        };
        Ok(Table {
            strict: self.strict,
            regex,
            regex_env: self.regex_allowances.iter().any(|a| a.env.is_some()),
            regex_allowances: self.regex_allowances,
            count: self.count,
        })
    }
}

impl Table {
    fn judge(
        &self,
        kind: Kind,
        rendering: &str,
        env: &BTreeMap<String, String>,
    ) -> Result<(), DenialReason> {
        // Constraints whose text matched but whose env did not; empty unless a denial needs it.
        let mut env_differs = Vec::new();
        if let Some(allowances) = self.strict.get(rendering) {
            for allowance in allowances {
                if allowance.admits(env) {
                    return Ok(());
                }
                env_differs.push(allowance.index);
            }
        }
        if let Some(set) = &self.regex {
            if !self.regex_env {
                if set.is_match(rendering) {
                    return Ok(());
                }
            } else {
                for pattern in set.matches(rendering).iter() {
                    let allowance = &self.regex_allowances[pattern];
                    if allowance.admits(env) {
                        return Ok(());
                    }
                    env_differs.push(allowance.index);
                }
            }
        }
        if env_differs.is_empty() {
            Err(DenialReason::NoMatch {
                kind,
                constraints: self.count,
            })
        } else {
            env_differs.sort_unstable();
            Err(DenialReason::EnvDiffers {
                constraints: env_differs,
            })
        }
    }
}

impl Gate {
    /// The gate for a manifest without `compManifest.script`: every command is allowed.
    pub fn allow_all() -> Self {
        Gate { tables: None }
    }

    /// Checks one command on its own; a denial reports it as command 0 (a batch of one).
    /// `deploy`, `start`, `terminate` and `sign` always pass.
    pub fn check(&self, command: &Command) -> Result<(), Denial> {
        self.check_at(0, command)
    }

    /// Checks a batch in order and stops at the first denial, which carries the command's
    /// position: a denied command does not run, and neither does the rest of the batch.
    pub fn check_batch(&self, batch: &[Command]) -> Result<(), Denial> {
        batch
            .iter()
            .enumerate()
            .try_for_each(|(index, command)| self.check_at(index, command))
    }

    /// Checks every command of a batch, each with its position, without stopping; for tools
    /// that report a verdict per command.
    pub fn check_each<'a>(
        &'a self,
        batch: &'a [Command],
    ) -> impl Iterator<Item = Result<(), Denial>> + 'a {
        batch
            .iter()
            .enumerate()
            .map(move |(index, command)| self.check_at(index, command))
    }

    fn check_at(&self, index: usize, command: &Command) -> Result<(), Denial> {
        // Before any constraint, and also without a script section: what runs or is fetched
        // must be exactly what the rendering says.
        let problem = match command {
            Command::Run(run) => crate::canonical::entry_point_problem(&run.entry_point)
                .map(|why| DenialReason::EntryPointInvalid { why }),
            Command::Transfer(t) => crate::canonical::transfer_problem(&t.from, &t.to)
                .map(|why| DenialReason::TransferNotCanonical { why }),
            _ => None,
        };
        if let Some(reason) = problem {
            return Err(Denial {
                index,
                command: command.render(),
                reason,
            });
        }
        let Some(tables) = &self.tables else {
            return Ok(());
        };
        let (kind, table, rendering, env) = match command {
            Command::Run(run) => (Kind::Run, &tables.run, run.render(), &run.env),
            Command::Transfer(transfer) => {
                (Kind::Transfer, &tables.transfer, transfer.render(), &NO_ENV)
            }
            Command::Deploy(_) | Command::Start(_) | Command::Terminate(_) | Command::Sign(_) => {
                return Ok(())
            }
        };
        table.judge(kind, &rendering, env).map_err(|reason| Denial {
            index,
            command: rendering,
            reason,
        })
    }
}

/// A command the gate refused: which one, what it looked like to the gate, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("command {index} (`{command}`) is denied: {reason}")]
pub struct Denial {
    /// Position in the batch.
    pub index: usize,
    /// The command's rendering, the text the constraints were compared with.
    pub command: String,
    /// Why no constraint allowed it.
    pub reason: DenialReason,
}

/// Why the gate refused a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialReason {
    /// No constraint's text or pattern matches the whole rendering.
    NoMatch {
        /// The command's kind.
        kind: Kind,
        /// How many constraints of that kind the script lists (possibly none).
        constraints: usize,
    },
    /// The rendering matches these constraints (positions in `commands`), but each names an
    /// env that differs from the run's.
    EnvDiffers {
        /// Positions in `commands`, ascending.
        constraints: Vec<usize>,
    },
    /// A `run`'s entry point is relative, has `.`/`..`/empty segments, or whitespace or
    /// control characters: what would run is not what the rendering says.
    EntryPointInvalid {
        /// What is wrong with it and what to send instead.
        why: String,
    },
    /// A transfer's `from` is not a URL in canonical form (or has an encoded `.`, `/` or
    /// `\` in its path), or its `to` path has dot or empty segments.
    TransferNotCanonical {
        /// What is wrong with it and what to send instead.
        why: String,
    },
}

impl DenialReason {
    /// A stable code for machines (requestor tools, the audit log).
    pub fn code(&self) -> DenialCode {
        match self {
            DenialReason::NoMatch { .. } => DenialCode::ScriptNoMatch,
            DenialReason::EnvDiffers { .. } => DenialCode::ScriptEnvDiffers,
            DenialReason::EntryPointInvalid { .. } => DenialCode::EntryPointInvalid,
            DenialReason::TransferNotCanonical { .. } => DenialCode::TransferNotCanonical,
        }
    }
}

/// The gate's stable denial codes (`docs/exescript.md`, `docs/verdicts.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialCode {
    /// [`DenialReason::NoMatch`].
    ScriptNoMatch,
    /// [`DenialReason::EnvDiffers`].
    ScriptEnvDiffers,
    /// [`DenialReason::EntryPointInvalid`].
    EntryPointInvalid,
    /// [`DenialReason::TransferNotCanonical`].
    TransferNotCanonical,
}

impl DenialCode {
    /// Every code.
    pub const ALL: [DenialCode; 4] = [
        DenialCode::ScriptNoMatch,
        DenialCode::ScriptEnvDiffers,
        DenialCode::EntryPointInvalid,
        DenialCode::TransferNotCanonical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenialCode::ScriptNoMatch => "script-no-match",
            DenialCode::ScriptEnvDiffers => "script-env-differs",
            DenialCode::EntryPointInvalid => "entry-point-invalid",
            DenialCode::TransferNotCanonical => "transfer-not-canonical",
        }
    }

    /// The code whose text is `text`.
    pub fn from_text(text: &str) -> Option<DenialCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

impl fmt::Display for DenialCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for DenialCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for DenialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenialReason::NoMatch {
                kind,
                constraints: 0,
            } => write!(
                f,
                "the manifest's script lists no `{kind}` constraint, so no {kind} is allowed"
            ),
            DenialReason::NoMatch { kind, constraints } => write!(
                f,
                "none of the manifest's {constraints} `{kind}` constraint(s) matches the whole rendering"
            ),
            DenialReason::EnvDiffers { constraints } => {
                f.write_str("the rendering matches script constraint(s) ")?;
                for (n, index) in constraints.iter().enumerate() {
                    if n > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "commands[{index}]")?;
                }
                f.write_str(", but the run's env differs from the env each of them names")
            }
            DenialReason::EntryPointInvalid { why } => write!(f, "the entry point {why}"),
            DenialReason::TransferNotCanonical { why } => write!(f, "the transfer's {why}"),
        }
    }
}
