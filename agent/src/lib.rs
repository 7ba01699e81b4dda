//! The provider agent: the operator CLI and the data dir it manages; later the daemon,
//! network, VM runtime and egress proxy.
//!
//! `unsafe` is denied crate-wide and allowed only in the VMM (`vm::kvm`), the
//! confinement glue (`confine`) and the QEMU child's `pre_exec` hook, where each block
//! carries a `// SAFETY:` note.
#![deny(unsafe_code)]

pub mod activity;
pub mod audit;
pub mod cli;
pub mod codes;
pub mod confine;
pub mod daemon;
pub mod egress;
pub mod market;
pub mod net;
pub mod receipt;
pub mod requestor;
pub mod store;
#[cfg(any(test, feature = "test-support"))]
pub mod testsupport;
pub mod units;
pub mod vm;
