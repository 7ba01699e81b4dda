//! X.509 keystore, certificate chains and manifest signatures.
#![forbid(unsafe_code)]
