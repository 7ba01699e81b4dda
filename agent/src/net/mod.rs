//! The network: a libp2p peer (TCP + noise + yamux, identify, mDNS, request-response on
//! the market and activity protocols) and the messages it carries.

pub mod wire;
