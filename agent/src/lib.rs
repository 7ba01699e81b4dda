//! The provider agent: the operator CLI and the data dir it manages; later the daemon,
//! network, VM runtime and egress proxy.

pub mod cli;
pub mod egress;
pub mod market;
pub mod store;
pub mod vm;
