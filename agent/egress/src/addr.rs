//! Address classification: which resolved addresses a payload may be connected to.
//!
//! The proxy dials only addresses it has checked here. Anything that reaches the provider's
//! own machine or its private networks (loopback, RFC 1918, link-local, CGNAT, …), anything
//! that is not a unicast destination (multicast, broadcast, unspecified) and every IPv6 form
//! that embeds an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) is denied, because
//! the kernel or a gateway may turn those into an IPv4 destination we never checked. An
//! operator can open a range on purpose with an allowed CIDR (`--allow-cidr`); an allowed
//! CIDR only matches addresses of its own family, so allowing `127.0.0.0/8` does not allow
//! `::ffff:127.0.0.1`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network, `addr/prefix`; a bare address is a single-host network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// Why a CIDR did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("`{0}` is not an IP address or CIDR (e.g. 127.0.0.0/8, ::1/128)")]
    Syntax(String),
    #[error("`{text}`: prefix length {prefix} is longer than {max}")]
    Prefix { text: String, prefix: u8, max: u8 },
}

impl Cidr {
    /// The network `net/prefix`; host bits are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    pub const fn new(net: IpAddr, prefix: u8) -> Self {
        let net = match net {
            IpAddr::V4(a) => {
                let bits = u32::from_be_bytes(a.octets()) & mask32(prefix);
                IpAddr::V4(Ipv4Addr::from_bits(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from_be_bytes(a.octets()) & mask128(prefix);
                IpAddr::V6(Ipv6Addr::from_bits(bits))
            }
        };
        Self { net, prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                u32::from_be_bytes(a.octets()) & mask32(self.prefix)
                    == u32::from_be_bytes(n.octets())
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                u128::from_be_bytes(a.octets()) & mask128(self.prefix)
                    == u128::from_be_bytes(n.octets())
            }
            _ => false,
        }
    }
}

const fn mask32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

const fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix as u32)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => {
                let p: u8 = p.parse().map_err(|_| syntax())?;
                (a, Some(p))
            }
            None => (text, None),
        };
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let net: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(CidrError::Prefix {
                text: text.to_owned(),
                prefix,
                max,
            });
        }
        Ok(Cidr::new(net, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// A range the proxy never dials unless an allowed CIDR covers the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedRange {
    pub cidr: Cidr,
    /// What the range is, for the refusal text and the audit log.
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8, what: &'static str) -> DeniedRange {
    DeniedRange {
        cidr: Cidr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix),
        what,
    }
}

const fn v6(s: [u16; 8], prefix: u8, what: &'static str) -> DeniedRange {
    DeniedRange {
        cidr: Cidr::new(
            IpAddr::V6(Ipv6Addr::new(
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
            )),
            prefix,
        ),
        what,
    }
}

/// Every range that is not a public unicast destination (IANA special-purpose registries),
/// most specific first so the refusal names the narrowest reason.
pub const DENIED: &[DeniedRange] = &[
    v4(255, 255, 255, 255, 32, "broadcast"),
    v4(0, 0, 0, 0, 32, "unspecified"),
    v4(0, 0, 0, 0, 8, "this network"),
    v4(10, 0, 0, 0, 8, "private"),
    v4(100, 64, 0, 0, 10, "shared address space (CGNAT)"),
    v4(127, 0, 0, 0, 8, "loopback"),
    v4(169, 254, 0, 0, 16, "link-local"),
    v4(172, 16, 0, 0, 12, "private"),
    v4(192, 0, 0, 0, 24, "IETF protocol assignments"),
    v4(192, 0, 2, 0, 24, "documentation"),
    v4(192, 31, 196, 0, 24, "AS112"),
    v4(192, 52, 193, 0, 24, "AMT"),
    v4(192, 88, 99, 0, 24, "6to4 relay anycast"),
    v4(192, 168, 0, 0, 16, "private"),
    v4(192, 175, 48, 0, 24, "direct delegation AS112"),
    v4(198, 18, 0, 0, 15, "benchmarking"),
    v4(198, 51, 100, 0, 24, "documentation"),
    v4(203, 0, 113, 0, 24, "documentation"),
    v4(224, 0, 0, 0, 4, "multicast"),
    v4(240, 0, 0, 0, 4, "reserved"),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 128, "unspecified"),
    v6([0, 0, 0, 0, 0, 0, 0, 1], 128, "loopback"),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, "IPv4-mapped"),
    v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, "IPv4-translated"),
    v6([0, 0, 0, 0, 0, 0, 0, 0], 96, "IPv4-compatible"),
    v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, "NAT64"),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48, "local-use NAT64"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, "Teredo"),
    v6([0x2001, 0x2, 0, 0, 0, 0, 0, 0], 48, "benchmarking"),
    v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28, "ORCHID"),
    v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28, "ORCHIDv2"),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32, "documentation"),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "IETF protocol assignments",
    ),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, "6to4"),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, "documentation"),
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16, "SRv6 SIDs"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, "unique local"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, "link-local"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, "site-local"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, "multicast"),
    // Outside 2000::/3 nothing is allocated as global unicast; a stray form of any of the
    // above (e.g. a future embedding) must not slip through.
    v6([0, 0, 0, 0, 0, 0, 0, 0], 3, "not global unicast"),
    v6([0x4000, 0, 0, 0, 0, 0, 0, 0], 2, "not global unicast"),
    v6([0x8000, 0, 0, 0, 0, 0, 0, 0], 1, "not global unicast"),
];

/// Why an address may not be dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{addr} is {} ({})", .range.what, .range.cidr)]
pub struct AddrDenied {
    pub addr: IpAddr,
    pub range: DeniedRange,
}

/// The operator's view of addresses: denied ranges minus explicitly allowed CIDRs.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<Cidr>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<Cidr>) -> Self {
        Self { allow }
    }

    pub fn allowed_cidrs(&self) -> &[Cidr] {
        &self.allow
    }

    /// `Ok` when the address may be dialed: an allowed CIDR covers it, or no denied range
    /// does.
    pub fn check(&self, addr: IpAddr) -> Result<(), AddrDenied> {
        if self.allow.iter().any(|c| c.contains(addr)) {
            return Ok(());
        }
        match DENIED.iter().find(|r| r.cidr.contains(addr)) {
            Some(range) => Err(AddrDenied {
                addr,
                range: *range,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> Option<&'static str> {
        AddressPolicy::default()
            .check(s.parse().unwrap())
            .err()
            .map(|e| e.range.what)
    }

    #[test]
    fn public_unicast_is_allowed() {
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "2606:4700::1111",
            "2a00:1450::1",
        ] {
            assert_eq!(denied(a), None, "{a}");
        }
    }

    #[test]
    fn every_special_range_is_denied_with_its_name() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:8.8.8.8", "IPv4-mapped"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("64:ff9b::7f00:1", "NAT64"),
            ("64:ff9b:1::1", "local-use NAT64"),
            ("2002:7f00:1::", "6to4"),
            ("2001:0:4136:e378::1", "Teredo"),
            ("2001:db8::1", "documentation"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("100::1", "discard-only"),
            ("::2:3:4:5", "not global unicast"),
        ];
        for (a, what) in cases {
            assert_eq!(denied(a), Some(what), "{a}");
        }
    }

    #[test]
    fn allowed_cidr_opens_only_its_own_family_and_range() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
        assert!(p.check("127.1.2.3".parse().unwrap()).is_ok());
        assert!(p.check("10.0.0.1".parse().unwrap()).is_err());
        assert!(p.check("::1".parse().unwrap()).is_err());
        assert_eq!(
            p.check("::ffff:127.0.0.1".parse().unwrap())
                .unwrap_err()
                .range
                .what,
            "IPv4-mapped"
        );
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            "10.1.2.3/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!("[::1]/128".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(matches!(
            "1.2.3.4/33".parse::<Cidr>(),
            Err(CidrError::Prefix { .. })
        ));
        assert!(matches!(
            "localhost".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "1.2.3.4/x".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
    }
}
