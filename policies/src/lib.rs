//! The manifest model, operator rules, the domain whitelist and the decision engine.
//!
//! This crate decides; it never touches the data dir. The agent loads the files, builds a
//! [`Judge`] from them and rebuilds it when they change.
#![forbid(unsafe_code)]

pub mod manifest;
pub mod rules;
pub mod verdict;
pub mod whitelist;

pub use manifest::{Manifest, ManifestError, Outbound, Platform, ReceivedManifest};
pub use rules::{Mode, Rules};
pub use verdict::{Code, Decision, Demand, Judge, MatchedRule, Reason, Verdict};
pub use whitelist::{DomainPattern, PatternMatch, Whitelist, WhitelistMatcher};
