//! The ExeScript command model: what a requestor may send to a running job, as JSON.
//!
//! The wire form follows yagna's activity API so existing requestor tooling keeps working:
//! each command is a single-key object (`{"run":{…}}`) and a batch is an array of them.
//! Every struct rejects unknown fields: a field we do not understand could carry an
//! intention (an extra mount, another interpreter) that we would otherwise run without
//! checking, so the requestor is told instead.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr};

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// One ExeScript command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// Prepare the job's machine (image, networks, host names).
    Deploy(Deploy),
    /// Boot the job's machine.
    Start(Start),
    /// Run a program inside the machine.
    Run(Run),
    /// Copy files between the requestor and the machine.
    Transfer(Transfer),
    /// Stop the machine.
    Terminate(Terminate),
    /// Ask the provider to sign the results so far.
    Sign(Sign),
}

/// The command names, in the order of [`Command`]'s variants.
const COMMAND_NAMES: &[&str] = &["deploy", "start", "run", "transfer", "terminate", "sign"];

// Written by hand rather than derived: the derived form answers a second key in a command
// object (`{"run":{…},"sign":{}}`) with serde_json's bare "expected value", and a bare
// string (`"run"`) with "unit variant"; a requestor deserves to be told what a command is.
impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;

        impl<'de> Visitor<'de> for CommandVisitor {
            type Value = Command;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a command: an object with one key, its name, e.g. {\"run\":{…}}")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Command, A::Error> {
                let Some(name) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "a command is an object with one key, its name; this one is empty",
                    ));
                };
                let command = match name.as_str() {
                    "deploy" => Command::Deploy(map.next_value()?),
                    "start" => Command::Start(map.next_value()?),
                    "run" => Command::Run(map.next_value()?),
                    "transfer" => Command::Transfer(map.next_value()?),
                    "terminate" => Command::Terminate(map.next_value()?),
                    "sign" => Command::Sign(map.next_value()?),
                    other => {
                        return Err(de::Error::custom(format_args!(
                            "unknown command `{other}`, expected one of {}",
                            COMMAND_NAMES.join(", ")
                        )))
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format_args!(
                        "a command is an object with one key, its name; `{name}` is followed by `{extra}` (one object per command)"
                    )));
                }
                Ok(command)
            }
        }

        deserializer.deserialize_map(CommandVisitor)
    }
}

/// `{"deploy":{"net":[…],"hosts":{…}}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// Virtual networks the machine joins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<Network>,
    /// Static host name → address entries for the machine's resolver.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, IpAddr>,
}

/// A virtual network the machine joins at deploy time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Network {
    /// The network's id.
    pub id: String,
    /// The network address, e.g. `192.168.0.0`.
    pub ip: Ipv4Addr,
    /// The network mask, e.g. `255.255.255.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Ipv4Addr>,
    /// The default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// This machine's address in the network.
    pub node_ip: Ipv4Addr,
    /// The other members: address → who is there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<Ipv4Addr, NetworkPeer>,
}

/// A member of a virtual network: a node, or one activity on a node (`[node, activity]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NetworkPeer {
    /// A node id.
    Node(String),
    /// A node id and an activity id.
    Activity(String, String),
}

/// `{"start":{"args":[…]}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    /// Arguments for the machine's entry point; absent means the image's defaults, which is
    /// not the same as an empty list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
}

/// `{"run":{"entry_point":"/bin/sh","args":["-c","…"],"env":{…},"capture":{…}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// The program to run, a path inside the machine.
    pub entry_point: String,
    /// Its arguments (without the program itself).
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment; absent and empty mean the same.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Whether and how its output is captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
}

/// How a run's standard output and error are captured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// Capture of standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<CaptureMode>,
    /// Capture of standard error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<CaptureMode>,
}

/// `{"atEnd":{…}}` or `{"stream":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CaptureMode {
    /// Keep the output and hand it over when the program ends.
    AtEnd(AtEnd),
    /// Send the output as it is produced.
    Stream(Stream),
}

/// Capture at the end: optionally only a part of the output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AtEndWire", into = "AtEndWire")]
pub struct AtEnd {
    /// Which bytes to keep; all of them when absent.
    pub part: Option<CapturePart>,
    /// Text or bytes.
    pub format: Option<CaptureFormat>,
}

/// Which bytes of the output an at-end capture keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePart {
    /// The first n bytes.
    Head(usize),
    /// The last n bytes.
    Tail(usize),
    /// The first n/2 and the last n/2 bytes.
    HeadTail(usize),
}

/// The wire form of [`AtEnd`]: yagna writes the part as one of three sibling keys, so the
/// "at most one" rule cannot be expressed by derive alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AtEndWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tail: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head_tail: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<CaptureFormat>,
}

impl TryFrom<AtEndWire> for AtEnd {
    type Error = String;

    fn try_from(wire: AtEndWire) -> Result<Self, Self::Error> {
        let part = match (wire.head, wire.tail, wire.head_tail) {
            (None, None, None) => None,
            (Some(n), None, None) => Some(CapturePart::Head(n)),
            (None, Some(n), None) => Some(CapturePart::Tail(n)),
            (None, None, Some(n)) => Some(CapturePart::HeadTail(n)),
            _ => return Err("at most one of `head`, `tail`, `headTail` may be given".into()),
        };
        Ok(AtEnd {
            part,
            format: wire.format,
        })
    }
}

impl From<AtEnd> for AtEndWire {
    fn from(at_end: AtEnd) -> Self {
        let mut wire = AtEndWire {
            format: at_end.format,
            ..AtEndWire::default()
        };
        match at_end.part {
            None => {}
            Some(CapturePart::Head(n)) => wire.head = Some(n),
            Some(CapturePart::Tail(n)) => wire.tail = Some(n),
            Some(CapturePart::HeadTail(n)) => wire.head_tail = Some(n),
        }
        wire
    }
}

/// Capture as a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    /// Bytes kept in the buffer before the rest is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Text or bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<CaptureFormat>,
}

/// Whether captured output is delivered as text or as bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureFormat {
    /// UTF-8 text (`"str"`, or yagna's alias `"string"`).
    #[default]
    #[serde(alias = "string")]
    Str,
    /// Raw bytes (`"bin"`, or yagna's alias `"binary"`).
    #[serde(alias = "binary")]
    Bin,
}

/// `{"transfer":{"from":"…","to":"…","format":"tar.gz","depth":1,"fileset":[…]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// Source URL.
    pub from: String,
    /// Destination URL.
    pub to: String,
    /// Pack the selected files into this archive format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ArchiveFormat>,
    /// How deep to descend when selecting files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<usize>,
    /// Which files to select; one entry or an array of them on the wire.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub fileset: Vec<FileSetEntry>,
}

/// The archive formats a transfer can pack into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveFormat {
    /// `tar`
    #[serde(rename = "tar")]
    Tar,
    /// `tar.bz2`
    #[serde(rename = "tar.bz2")]
    TarBz2,
    /// `tar.gz`
    #[serde(rename = "tar.gz")]
    TarGz,
    /// `tar.xz`
    #[serde(rename = "tar.xz")]
    TarXz,
    /// `zip` (deflate)
    #[serde(rename = "zip")]
    Zip,
    /// `zip.0` (stored, no compression)
    #[serde(rename = "zip.0")]
    ZipStored,
}

/// One file selection rule of a transfer: a glob, or includes and excludes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum FileSetEntry {
    /// A glob of files to include.
    Pattern(String),
    /// Includes and excludes.
    Rule(FileSetRule),
}

/// A file selection rule with includes and excludes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSetRule {
    /// What the rule is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    /// Globs to include; one string or an array on the wire.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub includes: Vec<String>,
    /// Globs to exclude; one string or an array on the wire.
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub excludes: Vec<String>,
}

// Written by hand rather than `#[serde(untagged)]`: an untagged enum reports only "did not
// match any variant", which would hide the unknown-field error of a rule.
impl<'de> Deserialize<'de> for FileSetEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;

        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = FileSetEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a glob string or an object with `includes`/`excludes`")
            }

            fn visit_str<E: de::Error>(self, glob: &str) -> Result<FileSetEntry, E> {
                Ok(FileSetEntry::Pattern(glob.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FileSetEntry, A::Error> {
                FileSetRule::deserialize(MapAccessDeserializer::new(map)).map(FileSetEntry::Rule)
            }
        }

        deserializer.deserialize_any(EntryVisitor)
    }
}

/// yagna accepts a single value wherever a list is expected (`"fileset": "*.o"`); this reads
/// either form into a list, with `null` as the empty list.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct OneOrMany<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("one value or an array of values")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<T>, E> {
            T::deserialize(text.into_deserializer()).map(|one| vec![one])
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
            T::deserialize(MapAccessDeserializer::new(map)).map(|one| vec![one])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            Vec::deserialize(SeqAccessDeserializer::new(seq))
        }

        fn visit_unit<E: de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: de::Error>(self) -> Result<Vec<T>, E> {
            Ok(Vec::new())
        }
    }

    deserializer.deserialize_any(OneOrMany(PhantomData))
}

/// `{"terminate":{}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminate {}

/// `{"sign":{}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sign {}

impl Command {
    /// The command's name as it appears on the wire (`"run"`, `"transfer"`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Deploy(_) => "deploy",
            Command::Start(_) => "start",
            Command::Run(_) => "run",
            Command::Transfer(_) => "transfer",
            Command::Terminate(_) => "terminate",
            Command::Sign(_) => "sign",
        }
    }

    /// The one-line text script constraints are compared with: `run <entry_point> <args>`
    /// and `transfer <from> <to>` (see `docs/exescript.md`); the other commands are never
    /// constrained and render as their name (`start` followed by its arguments, if any).
    pub fn render(&self) -> String {
        match self {
            Command::Run(run) => run.render(),
            Command::Transfer(transfer) => transfer.render(),
            other => other.to_string(),
        }
    }

    fn render_into<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        match self {
            Command::Run(run) => run.render_into(out),
            Command::Transfer(transfer) => transfer.render_into(out),
            Command::Start(Start { args: Some(args) }) => {
                out.write_str("start")?;
                args.iter().try_for_each(|arg| {
                    out.write_char(' ')?;
                    out.write_str(arg)
                })
            }
            other => out.write_str(other.name()),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.render_into(f)
    }
}

impl Run {
    /// `run <entry_point>` followed by each argument after one space. With no arguments there
    /// is no trailing space, so `run /bin/date` is exactly the rendering of `/bin/date` run
    /// without arguments.
    pub fn render(&self) -> String {
        let len = 4 + self.entry_point.len() + self.args.iter().map(|a| a.len() + 1).sum::<usize>();
        let mut out = String::with_capacity(len);
        // Writing into a String cannot fail.
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str("run ")?;
        out.write_str(&self.entry_point)?;
        self.args.iter().try_for_each(|arg| {
            out.write_char(' ')?;
            out.write_str(arg)
        })
    }
}

impl Transfer {
    /// `transfer <from> <to>`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(10 + self.from.len() + self.to.len());
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into<W: fmt::Write>(&self, out: &mut W) -> fmt::Result {
        out.write_str("transfer ")?;
        out.write_str(&self.from)?;
        out.write_char(' ')?;
        out.write_str(&self.to)
    }
}

/// A batch that could not be read; the message names the place and what was wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Not JSON, not an array, an unknown command or field, or a value of the wrong type.
    #[error("{path}: {message}")]
    Invalid {
        /// Where, e.g. `batch[2].run.entrypoint` (`batch` for the document itself).
        path: String,
        /// What serde found wrong there.
        message: String,
    },
}

/// Reads a batch: a JSON array of commands.
pub fn parse_batch(json: &str) -> Result<Vec<Command>, BatchError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let batch: Vec<Command> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|err| BatchError::Invalid {
            path: crate::path::describe("batch", err.path()),
            message: err.into_inner().to_string(),
        })?;
    // `from_str` would do this for us, but path tracking needs the deserializer by hand.
    deserializer.end().map_err(|err| BatchError::Invalid {
        path: "batch".into(),
        message: err.to_string(),
    })?;
    Ok(batch)
}
