//! Operator rules (`rules.json`), in yagna's format so an existing `ya-provider` data dir's
//! file loads unchanged.
//!
//! ```json
//! { "outbound": { "enabled": true, "everyone": "whitelist",
//!                 "audited-payload": { "<cert-id>": { "mode": "all", "description": "" } },
//!                 "partner": {} },
//!   "blacklist":  { "enabled": true,  "identity": [], "certified": [] },
//!   "allow-only": { "enabled": false, "identity": [], "certified": [] } }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an outbound rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Any URL the manifest names, including `unrestricted`.
    All,
    /// Nothing.
    None,
    /// Every manifest URL's host must match the domain whitelist.
    Whitelist,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::All => "all",
            Mode::None => "none",
            Mode::Whitelist => "whitelist",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Mode::All),
            "none" => Ok(Mode::None),
            "whitelist" => Ok(Mode::Whitelist),
            other => Err(format!(
                "unknown mode `{other}`; expected all, none or whitelist"
            )),
        }
    }
}

/// A rule attached to one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRule {
    pub mode: Mode,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundRules {
    pub enabled: bool,
    pub everyone: Mode,
    #[serde(rename = "audited-payload", default)]
    pub audited_payload: BTreeMap<String, CertRule>,
    #[serde(default)]
    pub partner: BTreeMap<String, CertRule>,
}

/// Blacklist or allow-only list: libp2p peer ids and certificate ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestrictList {
    pub enabled: bool,
    #[serde(default)]
    pub identity: BTreeSet<String>,
    #[serde(default)]
    pub certified: BTreeSet<String>,
}

impl RestrictList {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            identity: BTreeSet::new(),
            certified: BTreeSet::new(),
        }
    }
}

/// The whole of `rules.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    pub outbound: OutboundRules,
    /// yagna's goth file predates the lists; a file without them gets the defaults.
    #[serde(default = "default_blacklist")]
    pub blacklist: RestrictList,
    #[serde(rename = "allow-only", default = "default_allow_only")]
    pub allow_only: RestrictList,
}

fn default_blacklist() -> RestrictList {
    // Enabled so that `rule add blacklist …` takes effect at once; empty, it blocks nobody.
    RestrictList::new(true)
}

fn default_allow_only() -> RestrictList {
    // Disabled: an enabled, empty allow-only list would refuse every requestor.
    RestrictList::new(false)
}

impl Default for Rules {
    /// A new data dir: outbound enabled, `everyone` limited to the (empty) whitelist.
    fn default() -> Self {
        Self {
            outbound: OutboundRules {
                enabled: true,
                everyone: Mode::Whitelist,
                audited_payload: BTreeMap::new(),
                partner: BTreeMap::new(),
            },
            blacklist: default_blacklist(),
            allow_only: default_allow_only(),
        }
    }
}

/// Why `rules.json` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("rules.json: field `{field}`: {message}")]
pub struct RulesError {
    pub field: String,
    pub message: String,
}

impl Rules {
    pub fn from_json(bytes: &[u8]) -> Result<Self, RulesError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let rules: Rules = serde_path_to_error::deserialize(de).map_err(|e| RulesError {
            field: e.path().to_string(),
            message: e.into_inner().to_string(),
        })?;
        for (list, ids) in [
            (
                "outbound.audited-payload",
                rules.outbound.audited_payload.keys(),
            ),
            ("outbound.partner", rules.outbound.partner.keys()),
        ] {
            for id in ids {
                check_cert_id(id).map_err(|message| RulesError {
                    field: format!("{list}.{id}"),
                    message,
                })?;
            }
        }
        for (list, ids) in [
            ("blacklist.certified", &rules.blacklist.certified),
            ("allow-only.certified", &rules.allow_only.certified),
        ] {
            for id in ids {
                check_cert_id(id).map_err(|message| RulesError {
                    field: list.into(),
                    message,
                })?;
            }
        }
        Ok(rules)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("rules serialize");
        out.push(b'\n');
        out
    }
}

/// A full certificate id: 128 lowercase hex digits (SHA-512).
fn check_cert_id(id: &str) -> Result<(), String> {
    if id.len() == 128
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a certificate id (128 lowercase hex digits of SHA-512)"
        ))
    }
}
