//! The egress proxy: the only way out for a payload, limited to its manifest's URLs.
//!
//! An HTTP/1.1 forward proxy (absolute-form plain HTTP, WebSocket upgrades, and `CONNECT`
//! tunnels for TLS) built per job:
//!
//! - [`EgressPolicy`] is the job's allowlist, the manifest's `compManifest.net.inet.out`
//!   intersected with the operator's mode, plus the CIDRs the operator opens and the
//!   job's [`Limits`];
//! - [`Proxy`] holds a policy, the job's usage and the [`AuditSink`] its records go to;
//! - [`serve_connection`] serves one client stream of any type (a TCP socket here, a
//!   stream from a VM's host channel later), [`serve_listener`] accepts TCP clients.
//!
//! The defences (resolve once and dial only checked addresses, denied address ranges, IP
//! literals only by IP-literal URLs, SNI equal to the CONNECT host, `Host` equal to the
//! URI's host, no requests to the proxy itself, no redirect following, upgrades only to
//! WebSocket where a `ws` URL allows it, request paths that cannot be decoded out of their
//! prefix, an exact request-head limit) and the audit format are described in
//! `docs/egress.md`.

#![forbid(unsafe_code)]

pub mod addr;
pub mod audit;
mod body;
pub mod io;
pub mod policy;
pub mod proxy;
pub mod sni;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

pub use addr::{AddrDenied, AddressPolicy, Cidr, CidrError};
pub use audit::{AuditRecord, AuditSink};
pub use policy::{Denial, DenyCode, EgressPolicy, Limits};
pub use proxy::{serve_connection, serve_listener, EgressError, Proxy};
