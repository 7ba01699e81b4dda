//! Script constraints: the entries of `compManifest.script.commands`, read into one shape.
//!
//! An entry is a plain string (`"run /bin/date -R"`), a JSON object
//! (`{"run":{"args":"/bin/date -R","env":{"A":"1"},"match":"regex"}}`), or that object
//! encoded as a string (yagna's form). Whatever the form, it becomes a [`Constraint`]: the
//! kind of command it allows, the text or pattern for the whole rendering, how to compare,
//! and an optional environment. Anything we cannot read exactly is an error, never a
//! constraint that silently allows or denies more than its author meant.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::Match;

/// The commands script constraints apply to; every other command is always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `run`
    Run,
    /// `transfer`
    Transfer,
}

impl Kind {
    /// The word a constraint and a rendering start with.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Run => "run",
            Kind::Transfer => "transfer",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `compManifest.script` cannot be turned into a gate. `index` is the entry's position in
/// `commands`. The policy layer reports every variant as `script-invalid`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileError {
    /// The entry is a number, a boolean, null or an array.
    #[error("commands[{index}]: a script constraint is a string or a JSON object, not {found}")]
    NotAConstraint {
        /// Position in `commands`.
        index: usize,
        /// What was there instead (`a number`, `null`, …).
        found: &'static str,
    },
    /// A string that starts with `{` (so it is meant as an encoded object) is not valid JSON.
    #[error(
        "commands[{index}]: the string is meant as a JSON object but is not valid JSON: {error}"
    )]
    InvalidJson {
        /// Position in `commands`.
        index: usize,
        /// The JSON parser's message.
        error: String,
    },
    /// A JSON object constraint with an unknown command or field, a missing field, or a value
    /// of the wrong type.
    #[error("{path}: {message}")]
    InvalidObject {
        /// Position in `commands`.
        index: usize,
        /// Where, e.g. `commands[3].run.entrypoint`.
        path: String,
        /// What was wrong there.
        message: String,
    },
    /// A plain-string constraint whose first word (after one leading `^` in regex mode) is
    /// not `run` or `transfer`.
    #[error(
        "commands[{index}]: a plain-string constraint starts with `run ` or `transfer `, \
         but its first word is `{word}`"
    )]
    UnknownKind {
        /// Position in `commands`.
        index: usize,
        /// The first word (the text before the first space).
        word: String,
    },
    /// A regex constraint that does not compile.
    #[error("commands[{index}]: invalid regex `{pattern}`: {error}")]
    InvalidRegex {
        /// Position in `commands`.
        index: usize,
        /// The pattern as the manifest gives it.
        pattern: String,
        /// The regex compiler's message.
        error: regex::Error,
    },
    /// Each regex compiles alone, but all of one kind together exceed the size limit.
    #[error("the `{kind}` regex constraints together are too large to compile: {error}")]
    TooLarge {
        /// Which kind's set failed.
        kind: Kind,
        /// The regex compiler's message.
        error: regex::Error,
    },
}

/// One script constraint in the shape the gate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Constraint {
    /// Position in `commands`, so a denial can point at it.
    pub index: usize,
    pub kind: Kind,
    pub how: Match,
    /// Strict: the exact rendering allowed. Regex: the anchored pattern (`^(?:…)$`), already
    /// checked to compile, that the whole rendering must match.
    pub text: String,
    /// When set, a run's environment must equal it.
    pub env: Option<BTreeMap<String, String>>,
}

impl Constraint {
    /// Reads entry `index` of `commands`; `default_match` is `script.match`.
    pub fn parse(index: usize, entry: &Value, default_match: Match) -> Result<Self, CompileError> {
        match entry {
            Value::String(text) if text.trim_start().starts_with('{') => {
                // yagna's form: an object encoded as a string. A plain-string constraint
                // starts with `run ` or `transfer `, so a leading brace cannot be one.
                let object: Value =
                    serde_json::from_str(text).map_err(|err| CompileError::InvalidJson {
                        index,
                        error: err.to_string(),
                    })?;
                Self::from_object(index, &object, default_match)
            }
            Value::String(text) => Self::from_plain(index, text, default_match),
            Value::Object(_) => Self::from_object(index, entry, default_match),
            Value::Null => Err(not_a_constraint(index, "null")),
            Value::Bool(_) => Err(not_a_constraint(index, "a boolean")),
            Value::Number(_) => Err(not_a_constraint(index, "a number")),
            Value::Array(_) => Err(not_a_constraint(index, "an array")),
        }
    }

    /// `"run /bin/date -R"`: the kind is the first word, and the whole string is compared with
    /// the whole rendering under the list's default match.
    fn from_plain(index: usize, text: &str, how: Match) -> Result<Self, CompileError> {
        // Requestors who worked around yagna's unanchored matching write `^run …$`; the
        // anchor is redundant here but harmless, so it must not hide the kind.
        let head = match how {
            Match::Regex => text.strip_prefix('^').unwrap_or(text),
            Match::Strict => text,
        };
        let word = head.split(' ').next().unwrap_or_default();
        let kind = match word {
            "run" => Kind::Run,
            "transfer" => Kind::Transfer,
            _ => {
                return Err(CompileError::UnknownKind {
                    index,
                    word: word.to_owned(),
                })
            }
        };
        let text = match how {
            Match::Strict => text.to_owned(),
            Match::Regex => anchored(index, &[text], text)?,
        };
        Ok(Constraint {
            index,
            kind,
            how,
            text,
            env: None,
        })
    }

    /// `{"run":{"args":…,"env":…,"match":…}}` or `{"transfer":{"from":…,"to":…,"match":…}}`.
    fn from_object(
        index: usize,
        object: &Value,
        default_match: Match,
    ) -> Result<Self, CompileError> {
        let spec: Spec = serde_path_to_error::deserialize(object).map_err(|err| {
            CompileError::InvalidObject {
                index,
                path: crate::path::describe(&format!("commands[{index}]"), err.path()),
                message: err.into_inner().to_string(),
            }
        })?;
        match spec {
            Spec::Run(run) => {
                let how = run.how.unwrap_or(default_match);
                let text = match how {
                    Match::Strict => format!("run {}", run.args),
                    // The group keeps a top-level `|` in `args` inside `args`.
                    Match::Regex => {
                        anchored(index, &[&run.args], &format!("run (?:{})", run.args))?
                    }
                };
                Ok(Constraint {
                    index,
                    kind: Kind::Run,
                    how,
                    text,
                    env: run.env,
                })
            }
            Spec::Transfer(transfer) => {
                let how = transfer.how.unwrap_or(default_match);
                let text = match how {
                    Match::Strict => format!("transfer {} {}", transfer.from, transfer.to),
                    Match::Regex => anchored(
                        index,
                        &[&transfer.from, &transfer.to],
                        &format!("transfer (?:{}) (?:{})", transfer.from, transfer.to),
                    )?,
                };
                Ok(Constraint {
                    index,
                    kind: Kind::Transfer,
                    how,
                    text,
                    env: None,
                })
            }
        }
    }
}

fn not_a_constraint(index: usize, found: &'static str) -> CompileError {
    CompileError::NotAConstraint { index, found }
}

/// The pattern the gate uses for a regex constraint: `body` anchored to the whole rendering.
///
/// Each fragment the author wrote is compiled on its own first. That reports the error
/// against the text in the manifest, and it stops a fragment such as `run /bin/date)|(.*`
/// from closing our group and escaping the anchors: unbalanced alone, it is rejected here.
/// The anchored form is compiled too, because a fragment can be valid alone and still not
/// survive the wrapping (an `(?x)` comment runs to the end of the line and swallows our
/// closing parenthesis); that is reported, never turned into a different pattern.
fn anchored(index: usize, fragments: &[&str], body: &str) -> Result<String, CompileError> {
    let invalid = |pattern: &str, error| CompileError::InvalidRegex {
        index,
        pattern: pattern.to_owned(),
        error,
    };
    for fragment in fragments {
        regex::Regex::new(fragment).map_err(|error| invalid(fragment, error))?;
    }
    let anchored = format!("^(?:{body})$");
    regex::Regex::new(&anchored).map_err(|error| invalid(body, error))?;
    Ok(anchored)
}

/// A JSON object constraint as written in the manifest.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum Spec {
    Run(RunSpec),
    Transfer(TransferSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunSpec {
    /// Everything after `run `: the entry point and its arguments.
    #[serde(deserialize_with = "args_text")]
    args: String,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(rename = "match", default)]
    how: Option<Match>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferSpec {
    from: String,
    to: String,
    #[serde(rename = "match", default)]
    how: Option<Match>,
}

/// `args` as a string, or as an array of strings joined by one space (the same join the
/// rendering uses, so `["/bin/date","-R"]` means exactly `"/bin/date -R"`).
fn args_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct ArgsVisitor;

    impl<'de> Visitor<'de> for ArgsVisitor {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the text after `run ` as a string, or an array of strings")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_owned())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut words = Vec::new();
            while let Some(word) = seq.next_element::<String>()? {
                words.push(word);
            }
            Ok(words.join(" "))
        }
    }

    deserializer.deserialize_any(ArgsVisitor)
}
