//! The manifest model, operator rules, the domain whitelist and the decision engine.
#![forbid(unsafe_code)]
