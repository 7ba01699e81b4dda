//! The market: the provider's offer, demands, the constraint language both sides use to
//! say what they require of the other, and the negotiation that turns a demand into a
//! proposal or a reject, and a proposal into an agreement.

pub mod constraints;
pub mod negotiation;
pub mod offer;
pub mod pricing;
pub mod profile;
pub mod runtime;
