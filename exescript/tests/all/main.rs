//! The command model, the gate's table tests and the property tests, in one test binary
//! with one helper module (`util`).

mod gate;
mod model;
mod props;
mod util;
