//! The messages peers exchange: JSON over libp2p request-response.
//!
//! Two protocols, one request → one response each:
//! - `/provider/market/1`: [`MarketRequest`] → [`MarketResponse`] (offer, demand,
//!   proposal/reject, agreement);
//! - `/provider/activity/1`: [`ActivityRequest`] → [`ActivityResponse`] (create a job from
//!   an agreement, run ExeScript batches, long-poll their results, terminate → receipt).
//!
//! Every type rejects unknown fields, so a peer speaking a different version of the
//! protocol gets a clear error instead of a silently ignored field. The field names are
//! the wire format; renaming one is a protocol change (bump the `/1`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use policies::MatchedRule;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::receipt::SignedReceipt;

/// The market protocol's name.
pub const MARKET_PROTOCOL: &str = "/provider/market/1";
/// The activity protocol's name.
pub const ACTIVITY_PROTOCOL: &str = "/provider/activity/1";

/// Largest request a provider reads (a demand carries a manifest and a certificate chain).
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// Largest response a requestor reads (a results page or a receipt).
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024 * 1024;

/// Demand property names (Golem's, so yagna-style demands carry over).
pub mod props {
    /// Base64 of the manifest JSON: the exact text that was signed.
    pub const PAYLOAD: &str = "golem.srv.comp.payload";
    /// Base64 of the raw signature over [`PAYLOAD`]'s text.
    pub const PAYLOAD_SIG: &str = "golem.srv.comp.payload.sig";
    /// `sha256`, `sha384` or `sha512`.
    pub const PAYLOAD_SIG_ALG: &str = "golem.srv.comp.payload.sig.algorithm";
    /// Base64 of the PEM certificate chain (app author's leaf first, then intermediates).
    pub const PAYLOAD_CERT: &str = "golem.srv.comp.payload.cert";
    /// The requestor's Golem node descriptor (a JSON object), for the `partner` rule.
    pub const NODE_DESCRIPTOR: &str = "golem.node.descriptor";
}

/// One reason for a reject or a denial: a stable code (DESIGN §5, `docs/verdicts.md`) and a
/// message a person can act on (the one reason type, see [`crate::codes`]).
pub use crate::codes::{Code, Outcome, Reason};

/// A provider's offer: its properties and the constraints it places on demands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// The provider's libp2p peer id.
    pub provider_id: String,
    pub properties: BTreeMap<String, Value>,
    /// LDAP-style filter over the demand's properties; empty means none.
    pub constraints: String,
}

/// `/provider/market/1` requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MarketRequest {
    /// What does this provider offer? (For `requestor offers`.)
    GetOffer,
    /// A demand: properties (the signed manifest among them, see [`props`]) and an
    /// LDAP-style filter over the provider's offer.
    Demand {
        properties: BTreeMap<String, Value>,
        constraints: String,
    },
    /// Accept a proposal the provider made to this peer.
    Agree { proposal_id: String },
}

/// `/provider/market/1` responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MarketResponse {
    Offer {
        offer: Offer,
    },
    /// The demand was accepted: agree to `proposal_id` before `expires_at`.
    Proposal {
        proposal_id: String,
        offer: Offer,
        expires_at: DateTime<Utc>,
        /// Which operator rule accepted the manifest (`docs/verdicts.md`); none when the
        /// manifest asks for no outbound traffic.
        matched_rule: Option<MatchedRule>,
    },
    /// The demand was rejected; every reason that applies.
    Rejected {
        reasons: Vec<Reason>,
    },
    /// The agreement: valid for activities until `expires_at`.
    Agreement {
        agreement_id: String,
        expires_at: DateTime<Utc>,
    },
    /// The request itself was wrong (unknown proposal, not yours, malformed).
    Error {
        reason: Reason,
    },
}

/// `/provider/activity/1` requests. Only the peer that holds the agreement may use them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActivityRequest {
    /// Start the job for an agreement: image fetched and verified, VM booted.
    Create { agreement_id: String },
    /// Run an ExeScript batch (a JSON array of commands, as in `docs/exescript.md`). Sent
    /// as the requestor wrote it: the provider parses it once, on receipt, and answers a
    /// batch that is not ExeScript with `script-invalid` rather than a protocol error.
    Exec { activity_id: String, batch: Value },
    /// Results of a batch from command `from` on; waits up to `wait_ms` for the next one.
    GetResults {
        activity_id: String,
        batch_id: String,
        from: usize,
        wait_ms: u64,
    },
    /// End the job: VM torn down, receipt signed and returned.
    Terminate { activity_id: String },
}

/// `/provider/activity/1` responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ActivityResponse {
    Created {
        activity_id: String,
    },
    BatchStarted {
        batch_id: String,
    },
    /// Results from the requested index on, in order; `done` once the batch has ended
    /// (every command ran, or one was denied or failed and the rest were skipped).
    Results {
        results: Vec<CommandResult>,
        done: bool,
    },
    Terminated {
        /// The signed receipt (boxed: it is by far the largest answer).
        receipt: Box<SignedReceipt>,
    },
    Error {
        reason: Reason,
    },
}

/// One command's result, sent as soon as the command ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// Position in the batch, from 0.
    pub index: usize,
    /// The command as text (`exescript::Command::render`).
    pub command: String,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// Output as UTF-8 (lossy), cut at the job's output limit.
    pub stdout: String,
    pub stderr: String,
    /// True when output was cut at the limit.
    pub truncated: bool,
    /// Why it was denied, failed to start, or was skipped.
    pub reason: Option<Reason>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let r = MarketRequest::Agree {
            proposal_id: "p1".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"type":"agree","proposal_id":"p1"}"#);
        assert_eq!(serde_json::from_str::<MarketRequest>(&text).unwrap(), r);
        let err = serde_json::from_str::<MarketRequest>(
            r#"{"type":"agree","proposal_id":"p1","extra":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        let err = serde_json::from_str::<ActivityRequest>(r#"{"type":"reboot"}"#).unwrap_err();
        assert!(err.to_string().contains("reboot"), "{err}");
    }
}
