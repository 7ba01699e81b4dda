//! ExeScript: the commands a requestor sends to a running job, and the gate that checks each
//! one against the script constraints of the job's manifest (`compManifest.script`).
//!
//! - [`Command`] and [`parse_batch`]: the command model. A batch is a JSON array of
//!   single-key objects (`[{"deploy":{}},{"run":{"entry_point":"/bin/date","args":["-R"]}}]`);
//!   unknown commands and unknown fields are errors that name them.
//! - [`compile`] turns `compManifest.script.commands` into a [`Gate`] once per manifest; the
//!   gate then judges each command with [`Gate::check`] (or a whole batch with
//!   [`Gate::check_batch`]) and explains a refusal with a [`Denial`].
//!
//! The semantics (rendering, kinds, strict and regex matching, env, and where we differ from
//! yagna) are written down in `docs/exescript.md`.
#![forbid(unsafe_code)]

mod canonical;
mod command;
mod constraint;
mod gate;
mod path;

pub use command::{
    parse_batch, ArchiveFormat, AtEnd, BatchError, Capture, CaptureFormat, CaptureMode,
    CapturePart, Command, Deploy, FileSetEntry, FileSetRule, Network, NetworkPeer, Run, Sign,
    Start, Stream, Terminate, Transfer,
};
pub use constraint::{CompileError, Kind};
pub use gate::{compile, Denial, DenialCode, DenialReason, Gate};

use serde::{Deserialize, Serialize};

/// How a script constraint is compared with a command's rendering.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// Byte equality with the whole rendering.
    #[default]
    Strict,
    /// The whole rendering must match the (anchored) regular expression.
    Regex,
}
