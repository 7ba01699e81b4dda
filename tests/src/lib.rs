//! Helpers shared by the end-to-end scenarios in `tests/tests/`.
#![forbid(unsafe_code)]

pub mod util;
