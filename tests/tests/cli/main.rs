//! The `provider` operator commands end to end, in one test binary: keystore, rules,
//! whitelist and `manifest check` (`operator`), the partner rule (`partner`), and `script
//! check` (`script`). Helpers are the crate's, in `tests::util`.

mod operator;
mod partner;
mod script;
