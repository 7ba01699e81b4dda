//! Behaviour of the manifest model, the operator's files and the decision engine.

mod judge;
mod manifest;
mod partner;
mod rules_whitelist;
mod signer_usage;
mod util;
