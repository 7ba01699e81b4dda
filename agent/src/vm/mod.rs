//! The microVM runtime.

pub mod kvm;
