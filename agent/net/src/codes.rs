//! The stable reason codes a requestor is told, held by the compiler: every [`Reason`] the
//! provider sends carries a [`Code`], never a string it made up on the spot.
//!
//! A [`Code`] is the judge's verdict codes ([`policies::Code`]), the gate's denial codes
//! ([`exescript::DenialCode`]), or one of the codes negotiation, activities and payload
//! fetches add here. Where a code means what a verdict code means (`manifest-invalid`,
//! `script-invalid`, `constraints-unmet`, `platform-unsupported`, …) the verdict code is
//! used, not a second variant with the same text. Each code's text is a product promise,
//! listed in `docs/verdicts.md` or `docs/activity.md` (a test holds the docs to it).
//!
//! A requestor reads codes from providers that may be newer than itself: a code it does
//! not know deserializes as [`Code::Unknown`], which only deserialization can make.
//!
//! A command's [`Outcome`] (`ok`, `failed`, `denied`, `skipped`) is part of the same
//! vocabulary: results and receipts both carry it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A reason for a reject, an error answer or a command's outcome, as the wire carries it.
pub type Reason = policies::Reason<Code>;

/// Declares [`Code`] with its own variants, their texts and the list of them, from one
/// table, so the three cannot drift apart.
macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident => $text:literal,)*) => {
        /// A stable reason code (see the module documentation).
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum Code {
            /// A verdict code of the judge.
            Verdict(policies::Code),
            /// A denial code of the ExeScript gate.
            Gate(exescript::DenialCode),
            $($(#[$doc])* $variant,)*
            /// A code this build does not know, read from a peer.
            Unknown(UnknownCode),
        }

        impl Code {
            /// The codes defined here (not the verdict or gate codes).
            pub const OWN: &'static [Code] = &[$(Code::$variant,)*];

            fn own_text(&self) -> Option<&'static str> {
                match self {
                    $(Code::$variant => Some($text),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    // Negotiation (`/provider/market/1`).
    /// The operator's rules, whitelist or keystore cannot be read right now.
    ProviderMisconfigured => "provider-misconfigured",
    /// A limit of proposals, agreements or jobs is reached.
    Busy => "busy",
    /// `agree` names no open proposal of this peer.
    UnknownProposal => "unknown-proposal",
    /// `agree` came after the proposal expired.
    ProposalExpired => "proposal-expired",
    /// No agreement of this peer has that id.
    UnknownAgreement => "unknown-agreement",
    /// The agreement's time is up (also for a command past it).
    AgreementExpired => "agreement-expired",
    /// The provider failed in a way the requestor cannot fix.
    Internal => "internal",
    /// No application takes inbound requests any more (the peer is shutting down, or is
    /// only a requestor).
    Unavailable => "unavailable",
    /// The answer was larger than a requestor accepts.
    ResponseTooLarge => "response-too-large",

    // Activities (`/provider/activity/1`).
    /// The agreement already has its activity.
    ActivityExists => "activity-exists",
    /// The provider cannot run VMs right now.
    NoBackend => "no-backend",
    /// No activity of this peer has that id.
    UnknownActivity => "unknown-activity",
    /// No batch of the activity has that id.
    UnknownBatch => "unknown-batch",
    /// The activity's VM is still starting.
    ActivityStarting => "activity-starting",
    /// A batch of the activity is still running.
    BatchRunning => "batch-running",
    /// The activity's job has ended.
    ActivityEnded => "activity-ended",
    /// The job ended without a receipt.
    TerminateFailed => "terminate-failed",
    /// The VM did not boot, or the job could not be prepared.
    JobStartFailed => "job-start-failed",

    // Payload images (at `create`).
    /// The fetched bytes do not hash to the manifest's hash.
    PayloadHashMismatch => "payload-hash-mismatch",
    /// The image server answered with an error, or could not be reached.
    PayloadFetchFailed => "payload-fetch-failed",
    /// The image is larger than the operator allows or the disk holds.
    PayloadTooLarge => "payload-too-large",
    /// The provider could not store the image.
    PayloadStoreFailed => "payload-store-failed",
    /// The image is not a rootfs tarball the guards accept.
    PayloadImageInvalid => "payload-image-invalid",
    /// The image's compatibility artifact has a required rule this host fails or cannot
    /// evaluate.
    PlatformIncompatible => "platform-incompatible",
    /// The image's registry wants a login this provider has not (for requestors), or
    /// refuses it.
    PayloadAuthFailed => "payload-auth-failed",

    // Commands of a batch.
    /// `deploy` with virtual networks.
    DeployUnsupported => "deploy-unsupported",
    /// A `run` exited non-zero.
    ExitCode => "exit-code",
    /// A `run` was killed by a signal.
    Signal => "signal",
    /// A `run` reached its deadline.
    Timeout => "timeout",
    /// The VM failed under a command.
    VmError => "vm-error",
    /// The job was stopped while the command ran, or before it.
    JobStopped => "job-stopped",
    /// The job itself failed during the batch.
    JobFailed => "job-failed",
    /// Not run because the job failed at an earlier command.
    Skipped => "skipped",
    /// Not run: an earlier command was denied.
    AfterDenied => "after-denied",
    /// Not run: an earlier command failed.
    AfterFailed => "after-failed",
    /// Not run: an earlier `terminate` ended the batch.
    AfterTerminate => "after-terminate",
    /// A transfer's download or upload failed.
    TransferFailed => "transfer-failed",
    /// A transfer's `from` or `to` is not usable.
    TransferInvalid => "transfer-invalid",
    /// A kind of transfer this provider does not do.
    TransferUnsupported => "transfer-unsupported",
    /// A transfer's download is larger than the operator allows.
    TransferTooLarge => "transfer-too-large",
    /// The job's egress proxy refused a transfer's URL.
    EgressDenied => "egress-denied",
}

/// What happened to one command of a batch (its result and the receipt say it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Ran and exited 0.
    Ok,
    /// Ran and failed (non-zero exit, signal, timeout) or could not be run.
    Failed,
    /// The ExeScript gate (or a limit) refused it; it did not reach the guest.
    Denied,
    /// Not run because an earlier command of the batch was denied or failed.
    Skipped,
}

/// A code text this build does not know (see [`Code::Unknown`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UnknownCode(String);

impl UnknownCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Code {
    /// Every code this build knows: the verdict codes, the gate's, and [`Code::OWN`].
    pub fn all() -> impl Iterator<Item = Code> {
        policies::Code::ALL
            .into_iter()
            .map(Code::Verdict)
            .chain(exescript::DenialCode::ALL.into_iter().map(Code::Gate))
            .chain(Code::OWN.iter().cloned())
    }

    pub fn as_str(&self) -> &str {
        match self {
            Code::Verdict(c) => c.as_str(),
            Code::Gate(c) => c.as_str(),
            Code::Unknown(u) => u.as_str(),
            own => own.own_text().expect("every own code has a text"),
        }
    }

    /// The code whose text is `text`; [`Code::Unknown`] if this build knows none. Private:
    /// the provider names its codes, only a peer's text is read this way.
    fn from_text(text: &str) -> Code {
        if let Some(c) = policies::Code::from_text(text) {
            return Code::Verdict(c);
        }
        if let Some(c) = exescript::DenialCode::from_text(text) {
            return Code::Gate(c);
        }
        Code::OWN
            .iter()
            .find(|c| c.own_text() == Some(text))
            .cloned()
            .unwrap_or_else(|| Code::Unknown(UnknownCode(text.to_owned())))
    }
}

impl From<policies::Code> for Code {
    fn from(c: policies::Code) -> Self {
        Code::Verdict(c)
    }
}

impl From<exescript::DenialCode> for Code {
    fn from(c: exescript::DenialCode) -> Self {
        Code::Gate(c)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<policies::Code> for Code {
    fn eq(&self, other: &policies::Code) -> bool {
        *self == Code::Verdict(*other)
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(Code::from_text(&text))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Each verdict code's place in `policies::Code::ALL`. A new variant fails to compile
    /// here; its arm's index then fails the test until `ALL` lists it.
    fn verdict_place(c: policies::Code) -> usize {
        use policies::Code::*;
        match c {
            ManifestInvalid => 0,
            ManifestExpired => 1,
            ManifestNotYetValid => 2,
            SignatureMissing => 3,
            SignatureInvalid => 4,
            UnsupportedAlgorithm => 5,
            CertChainUntrusted => 6,
            CertExpired => 7,
            CertNotYetValid => 8,
            CertUsageInvalid => 9,
            OutboundDisabled => 10,
            OutboundRuleNone => 11,
            UrlNotWhitelisted => 12,
            NodeIdMismatch => 13,
            Blacklisted => 14,
            NotAllowListed => 15,
            ScriptInvalid => 16,
            ConstraintsUnmet => 17,
            PlatformUnsupported => 18,
            PayloadUrlRefused => 19,
        }
    }
    const VERDICT_CODES: usize = 20;

    /// The same for `exescript::DenialCode::ALL`.
    fn gate_place(c: exescript::DenialCode) -> usize {
        use exescript::DenialCode::*;
        match c {
            ScriptNoMatch => 0,
            ScriptEnvDiffers => 1,
            EntryPointInvalid => 2,
            TransferNotCanonical => 3,
        }
    }
    const GATE_CODES: usize = 4;

    #[test]
    fn every_code_is_listed_and_round_trips() {
        assert_eq!(policies::Code::ALL.len(), VERDICT_CODES);
        for (i, c) in policies::Code::ALL.into_iter().enumerate() {
            assert_eq!(
                verdict_place(c),
                i,
                "{c} out of place in policies::Code::ALL"
            );
        }
        assert_eq!(exescript::DenialCode::ALL.len(), GATE_CODES);
        for (i, c) in exescript::DenialCode::ALL.into_iter().enumerate() {
            assert_eq!(gate_place(c), i, "{c} out of place in DenialCode::ALL");
        }
        let all: Vec<Code> = Code::all().collect();
        assert_eq!(all.len(), VERDICT_CODES + GATE_CODES + Code::OWN.len());
        let texts: HashSet<&str> = all.iter().map(Code::as_str).collect();
        assert_eq!(texts.len(), all.len(), "two codes share a text");
        for c in &all {
            assert!(!matches!(c, Code::Unknown(_)), "listed as known: {c}");
            assert_eq!(&Code::from_text(c.as_str()), c);
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(&serde_json::from_str::<Code>(&json).unwrap(), c);
        }
    }

    #[test]
    fn an_unknown_code_is_read_and_written_back_unchanged() {
        let c: Code = serde_json::from_str(r#""from-a-newer-provider""#).unwrap();
        assert!(matches!(c, Code::Unknown(_)));
        assert_eq!(c, "from-a-newer-provider");
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#""from-a-newer-provider""#
        );
    }

    #[test]
    fn reasons_are_the_wire_json() {
        let r = Reason::new(policies::Code::ScriptInvalid, "bad batch");
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"code":"script-invalid","message":"bad batch"}"#);
        assert_eq!(serde_json::from_str::<Reason>(&text).unwrap(), r);
        let verdict = policies::Reason::<policies::Code>::new(policies::Code::Blacklisted, "x");
        assert_eq!(verdict.widen::<Code>().code, policies::Code::Blacklisted);
    }

    /// Every code a requestor can be told is documented, so the docs cannot fall behind.
    #[test]
    fn every_code_is_in_the_docs() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        let text: String = ["verdicts.md", "activity.md"]
            .iter()
            .map(|f| std::fs::read_to_string(docs.join(f)).unwrap())
            .collect();
        let missing: Vec<String> = Code::all()
            .map(|c| c.to_string())
            .filter(|c| !text.contains(&format!("`{c}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "codes missing from docs/verdicts.md and docs/activity.md: {missing:?}"
        );
    }
}
