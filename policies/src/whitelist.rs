//! The domain whitelist (`domain_whitelist.json`, yagna's format) and its matcher.
//!
//! `strict` means the whole host, compared case-insensitively: `api.example.com` does not
//! allow `evil-api.example.com` nor `api.example.com.evil.net` (yagna matched substrings,
//! issues #2306 and #2419). `regex` must match the whole host: the pattern is anchored.

use std::collections::HashSet;

use regex::{RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};

/// How a whitelist pattern is compared with a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternMatch {
    Strict,
    Regex,
}

impl PatternMatch {
    pub fn as_str(self) -> &'static str {
        match self {
            PatternMatch::Strict => "strict",
            PatternMatch::Regex => "regex",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPattern {
    pub domain: String,
    #[serde(rename = "match")]
    pub match_: PatternMatch,
}

impl DomainPattern {
    /// A short, stable id for `whitelist remove`: the first 8 hex digits of SHA-256 over
    /// `<match>:<domain>`.
    pub fn id(&self) -> String {
        let digest =
            openssl::sha::sha256(format!("{}:{}", self.match_.as_str(), self.domain).as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The whole of `domain_whitelist.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whitelist {
    /// Older yagna versions wrote `domains`.
    #[serde(alias = "domains", default)]
    pub patterns: Vec<DomainPattern>,
}

/// Why a whitelist or a pattern is not usable.
#[derive(Debug, thiserror::Error)]
pub enum WhitelistError {
    #[error("domain_whitelist.json: field `{field}`: {message}")]
    File { field: String, message: String },
    #[error("whitelist pattern `{pattern}` is not a valid regex: {error}")]
    BadRegex { pattern: String, error: String },
    #[error(
        "whitelist pattern `{0}` is not a host name (letters, digits, `-`, `.`; or an IP address)"
    )]
    BadHost(String),
    #[error("whitelist pattern is empty")]
    Empty,
}

impl Whitelist {
    pub fn from_json(bytes: &[u8]) -> Result<Self, WhitelistError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let list: Whitelist =
            serde_path_to_error::deserialize(de).map_err(|e| WhitelistError::File {
                field: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        for p in &list.patterns {
            p.validate()?;
        }
        Ok(list)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("whitelist serializes");
        out.push(b'\n');
        out
    }

    pub fn matcher(&self) -> Result<WhitelistMatcher, WhitelistError> {
        WhitelistMatcher::new(&self.patterns)
    }
}

impl DomainPattern {
    /// A strict pattern must be a plausible host; a regex must compile.
    pub fn validate(&self) -> Result<(), WhitelistError> {
        if self.domain.is_empty() {
            return Err(WhitelistError::Empty);
        }
        match self.match_ {
            PatternMatch::Strict => {
                let ok = self
                    .domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
                if ok {
                    Ok(())
                } else {
                    Err(WhitelistError::BadHost(self.domain.clone()))
                }
            }
            PatternMatch::Regex => anchored(&self.domain).map(|_| ()),
        }
    }
}

fn anchored(pattern: &str) -> Result<regex::Regex, WhitelistError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(true)
        .build()
        .map_err(|e| WhitelistError::BadRegex {
            pattern: pattern.to_owned(),
            error: e.to_string(),
        })
}

/// Compiled whitelist: a set of strict hosts and one anchored regex set.
#[derive(Debug, Clone)]
pub struct WhitelistMatcher {
    strict: HashSet<String>,
    regex: RegexSet,
}

impl WhitelistMatcher {
    pub fn new(patterns: &[DomainPattern]) -> Result<Self, WhitelistError> {
        let mut strict = HashSet::new();
        let mut regexes = Vec::new();
        for p in patterns {
            p.validate()?;
            match p.match_ {
                PatternMatch::Strict => {
                    strict.insert(normalize_host(&p.domain));
                }
                PatternMatch::Regex => regexes.push(format!("^(?:{})$", p.domain)),
            }
        }
        let regex = RegexSetBuilder::new(&regexes)
            .case_insensitive(true)
            .build()
            .map_err(|e| WhitelistError::BadRegex {
                pattern: regexes.join(" | "),
                error: e.to_string(),
            })?;
        Ok(Self { strict, regex })
    }

    /// Whether `host` (from a URL, so without port) is whitelisted.
    pub fn matches(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.strict.contains(&host) || self.regex.is_match(&host)
    }
}

/// Hosts compare case-insensitively and without the root's trailing dot; IPv6 literals
/// lose their URL brackets.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}
