//! Sizes and durations as operators write them, one grammar for flags and the daemon's
//! config file alike (`docs/daemon.md`):
//!
//! - a size is a number with an optional fraction and an optional unit `K`, `M`, `G`, `T`
//!   (powers of 1024, any case), optionally followed by `B` or `iB`: `1048576`, `64K`,
//!   `512MiB`, `1.5G`. A bare number is bytes for a [`ByteSize`] and MiB for a [`MemSize`];
//! - a duration is a number with an optional fraction and a unit `ms`, `s`, `m` or `h`; a
//!   bare number is seconds: `500ms`, `60s`, `2m`, `0.5h`, `3`.
//!
//! Each type parses with [`FromStr`] (clap's `value_parser!` uses it) and deserializes
//! from a JSON string through the same parser, so a flag and a config key that take the
//! same quantity accept the same text and say the same thing when it is wrong.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// How a size's text failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeError {
    /// The part before the unit is not a number.
    BadNumber,
    /// The text ends in something that is not a unit.
    UnknownUnit,
    /// The value does not fit in 64 bits.
    TooLarge,
}

/// Reads `text` as a size in bytes; a bare number is in units of `bare` bytes.
fn parse_size(text: &str, bare: u128) -> Result<u128, SizeError> {
    let lower = text.trim().to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let suffixed = body.len() != lower.len();
    let (number, unit) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u128 << 10),
        Some('m') => (&body[..body.len() - 1], 1 << 20),
        Some('g') => (&body[..body.len() - 1], 1 << 30),
        Some('t') => (&body[..body.len() - 1], 1 << 40),
        // `100B` is bytes whatever a bare number means.
        Some(c) if c.is_ascii_digit() || c == '.' => (body, if suffixed { 1 } else { bare }),
        _ => return Err(SizeError::UnknownUnit),
    };
    let number = number.trim();
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !digits(whole) || !digits(fraction) {
        return Err(SizeError::BadNumber);
    }
    // Whole part exactly; the fraction rounded to the nearest byte (at most 18 digits of it
    // count, far below a byte for every unit).
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| SizeError::TooLarge)?
    };
    let fraction = &fraction[..fraction.len().min(18)];
    let part = if fraction.is_empty() {
        0
    } else {
        let scale = 10u128.pow(fraction.len() as u32);
        let f: u128 = fraction.parse().map_err(|_| SizeError::BadNumber)?;
        (f * unit + scale / 2) / scale
    };
    let bytes = whole
        .checked_mul(unit)
        .and_then(|b| b.checked_add(part))
        .ok_or(SizeError::TooLarge)?;
    if bytes > u128::from(u64::MAX) {
        return Err(SizeError::TooLarge);
    }
    Ok(bytes)
}

/// A number of bytes: `1048576`, `64K`, `10M`, `2G`, `1T` (a bare number is bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match parse_size(text, 1) {
            Ok(b) => Ok(ByteSize(b as u64)),
            Err(SizeError::TooLarge) => Err(format!("`{text}` is too large")),
            Err(_) => Err(format!(
                "`{text}` is not a byte count (e.g. 1048576, 512M, 64G)"
            )),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// As its byte count (which parses back to the same value).
impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

/// A VM's memory in MiB, between 16M and 1024G: `512M`, `1G`, `300` (a bare number is MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemSize(u32);

impl MemSize {
    /// Smallest memory a VM may be given, in MiB.
    pub const MIN_MIB: u32 = 16;
    /// Largest, in MiB (1024G).
    pub const MAX_MIB: u32 = 1 << 20;

    pub fn mib(self) -> u32 {
        self.0
    }
}

impl FromStr for MemSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bytes = match parse_size(t, 1 << 20) {
            Ok(b) => b,
            Err(SizeError::UnknownUnit) => {
                return Err(format!("`{t}`: unknown unit (K, M, G, T)"));
            }
            Err(SizeError::BadNumber) => return Err(format!("`{t}` is not a size like 512M")),
            Err(SizeError::TooLarge) => u128::MAX,
        };
        let mib = bytes.saturating_add(1 << 19) >> 20;
        if !(u128::from(Self::MIN_MIB)..=u128::from(Self::MAX_MIB)).contains(&mib) {
            return Err(format!("`{t}`: memory must be between 16M and 1024G"));
        }
        Ok(MemSize(mib as u32))
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}M", self.0)
    }
}

/// A positive duration: `500ms`, `60s`, `2m`, `1h` (a bare number is seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like 60s"))?;
        let secs = match unit {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("`{s}`: unknown unit (ms, s, m, h)")),
        };
        if !(secs > 0.0 && secs.is_finite()) {
            return Err(format!("`{s}`: must be positive"));
        }
        Duration::try_from_secs_f64(secs)
            .map(HumanDuration)
            .map_err(|_| format!("`{s}` is too long"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A JSON string through `T`'s [`FromStr`], its error as the deserializer's.
fn from_text<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_text(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Result<u64, String> {
        s.parse::<ByteSize>().map(ByteSize::bytes)
    }

    fn mem(s: &str) -> Result<u32, String> {
        s.parse::<MemSize>().map(MemSize::mib)
    }

    fn dur(s: &str) -> Result<Duration, String> {
        s.parse::<HumanDuration>().map(HumanDuration::get)
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("64K"), Ok(64 << 10));
        assert_eq!(bytes("64k"), Ok(64 << 10));
        assert_eq!(bytes("512MiB"), Ok(512 << 20));
        assert_eq!(bytes("512mib"), Ok(512 << 20));
        assert_eq!(bytes("2G"), Ok(2 << 30));
        assert_eq!(bytes("1TB"), Ok(1 << 40));
        assert_eq!(bytes("100B"), Ok(100));
        assert_eq!(bytes("1.5K"), Ok(1536));
        assert_eq!(bytes(" 512 M "), Ok(512 << 20));
        assert_eq!(bytes(&u64::MAX.to_string()), Ok(u64::MAX));
        for bad in ["lots", "", "M", ".", "1.2.3", "-1", "12X"] {
            assert_eq!(
                bytes(bad),
                Err(format!(
                    "`{bad}` is not a byte count (e.g. 1048576, 512M, 64G)"
                ))
            );
        }
        assert_eq!(
            bytes("99999999999T"),
            Err("`99999999999T` is too large".into())
        );
        assert!(bytes("18446744073709551616").is_err());
    }

    #[test]
    fn memory_sizes_are_mib_by_default() {
        assert_eq!(mem("512M"), Ok(512));
        assert_eq!(mem("256MiB"), Ok(256));
        assert_eq!(mem("256mb"), Ok(256));
        assert_eq!(mem("1G"), Ok(1024));
        assert_eq!(mem("0.5G"), Ok(512));
        assert_eq!(mem("300"), Ok(300));
        assert_eq!(mem("16384K"), Ok(16));
        assert_eq!(mem("1T"), Ok(1 << 20));
        assert_eq!(
            mem("8M"),
            Err("`8M`: memory must be between 16M and 1024G".into())
        );
        assert_eq!(
            mem("2T"),
            Err("`2T`: memory must be between 16M and 1024G".into())
        );
        assert_eq!(mem("12X"), Err("`12X`: unknown unit (K, M, G, T)".into()));
        assert_eq!(mem("lots"), Err("`lots`: unknown unit (K, M, G, T)".into()));
        assert_eq!(mem("a5"), Err("`a5` is not a size like 512M".into()));
        assert!(mem("99999999999999999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(dur("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(dur("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(dur("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(dur("0.5h"), Ok(Duration::from_secs(1800)));
        assert_eq!(dur("3"), Ok(Duration::from_secs(3)));
        assert_eq!(dur("0s"), Err("`0s`: must be positive".into()));
        assert_eq!(dur("soon"), Err("`soon` is not a duration like 60s".into()));
        assert_eq!(dur("5d"), Err("`5d`: unknown unit (ms, s, m, h)".into()));
        assert!(dur("1e300h").is_err());
    }

    #[test]
    fn config_values_deserialize_through_the_same_parser() {
        let b: ByteSize = serde_json::from_str(r#""64K""#).unwrap();
        assert_eq!(b, ByteSize(64 << 10));
        let m: MemSize = serde_json::from_str(r#""1G""#).unwrap();
        assert_eq!(m.mib(), 1024);
        let d: HumanDuration = serde_json::from_str(r#""2m""#).unwrap();
        assert_eq!(d.get(), Duration::from_secs(120));
        let e = serde_json::from_str::<MemSize>(r#""lots""#).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert!(serde_json::from_str::<ByteSize>("12").is_err(), "a string");
    }
}
