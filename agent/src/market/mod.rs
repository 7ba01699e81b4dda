//! The market: the provider's offer, demands, the constraint language both sides use to
//! say what they require of the other, and (with the network) negotiation.

pub mod constraints;
pub mod offer;
