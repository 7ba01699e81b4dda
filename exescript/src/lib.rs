//! ExeScript: the commands a requestor sends to a running job, and the gate that checks each
//! one against the script constraints of the job's manifest (`compManifest.script`).
#![forbid(unsafe_code)]

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
