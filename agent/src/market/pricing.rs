//! Presets and yagna's linear pricing model.
//!
//! A preset (`<data-dir>/presets.json`, `provider preset …`) names a price list: a price
//! per hour of wall time, per CPU hour, per GiB of egress, and a start fee. The offer
//! publishes it as yagna does — `golem.com.usage.vector` and
//! `golem.com.pricing.model.linear.coeffs` (one coefficient per usage counter, per
//! second / CPU second / MiB, then the start fee) — plus one scalar property per price
//! (`golem.com.pricing.model.linear.price.<counter>`), so a requestor's LDAP constraints
//! can cap each price: `(golem.com.pricing.model.linear.price.cpu_sec<=0.0001)`. A job's
//! amount is `start fee + Σ coefficient × counter` over the usage it was measured to use.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::constraints::Properties;
use crate::store::{atomic_write, DataDir, StoreError, WriteLock};
use net::receipt::{decimal, Charge};

/// The usage counters, in the order of the coefficients.
pub const USAGE_VECTOR: [&str; 3] = [
    "golem.usage.duration_sec",
    "golem.usage.cpu_sec",
    "golem.usage.egress_mib",
];
/// Offer property: the usage counters.
pub const USAGE_VECTOR_PROP: &str = "golem.com.usage.vector";
/// Offer property: the linear coefficients (counters', then the start fee).
pub const COEFFS_PROP: &str = "golem.com.pricing.model.linear.coeffs";
/// Prefix of the scalar per-counter prices (`…price.cpu_sec`, `…price.start`).
pub const PRICE_PROP: &str = "golem.com.pricing.model.linear.price";

/// Fractional digits of each counter in a receipt: milliseconds, the kernel's 10 ms CPU
/// ticks, bytes (a MiB has 2^20 of them; 6 places resolve one).
const USAGE_PLACES: [usize; 3] = [3, 2, 6];
/// Fractional digits of a coefficient.
const COEFF_PLACES: usize = 12;

/// The name of the preset a data dir without presets offers: everything free.
pub const BUILTIN: &str = "free";

/// A price list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    /// The unit amounts are in (`GLM` unless the operator says otherwise).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Per hour of the job's wall time.
    pub duration_per_hour: f64,
    /// Per hour of CPU time of the job's VM.
    pub cpu_per_hour: f64,
    /// Per GiB through the job's egress proxy (both directions).
    pub egress_per_gib: f64,
    /// Charged once per job.
    pub start_fee: f64,
    /// The runtime profile its jobs run under (`provider profile runtime …`); the
    /// built-in `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_profile: Option<String>,
}

fn default_currency() -> String {
    "GLM".into()
}

/// What a job used, as the activity measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metered {
    pub duration_sec: f64,
    pub cpu_sec: f64,
    pub egress_bytes: u64,
}

impl Metered {
    /// The usage vector's values, in [`USAGE_VECTOR`] order.
    pub fn vector(&self) -> [f64; 3] {
        [
            self.duration_sec,
            self.cpu_sec,
            self.egress_bytes as f64 / (1024.0 * 1024.0),
        ]
    }
}

/// Why a preset or the presets file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("preset name `{0}` must be 1–64 characters of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("preset `{name}`: {field} = {value} must be a finite number ≥ 0")]
    BadPrice {
        name: String,
        field: &'static str,
        value: f64,
    },
    #[error("no preset `{0}` (see `provider preset list`)")]
    Unknown(String),
    #[error("a preset `{0}` exists already; change it with `provider preset update`")]
    Exists(String),
    #[error("`{BUILTIN}` is the built-in preset; choose another name")]
    Builtin,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Preset {
    /// The built-in preset: free.
    pub fn builtin() -> Self {
        Self {
            name: BUILTIN.into(),
            currency: default_currency(),
            duration_per_hour: 0.0,
            cpu_per_hour: 0.0,
            egress_per_gib: 0.0,
            start_fee: 0.0,
            runtime_profile: None,
        }
    }

    pub fn check(&self) -> Result<(), PresetError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok_name {
            return Err(PresetError::BadName(self.name.clone()));
        }
        for (field, value) in [
            ("duration_per_hour", self.duration_per_hour),
            ("cpu_per_hour", self.cpu_per_hour),
            ("egress_per_gib", self.egress_per_gib),
            ("start_fee", self.start_fee),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(PresetError::BadPrice {
                    name: self.name.clone(),
                    field,
                    value,
                });
            }
        }
        Ok(())
    }

    /// yagna's coefficients: per second, per CPU second, per MiB, then the start fee;
    /// rounded to 12 decimal places, so the offer, the receipt's decimal text and a
    /// requestor's price cap all see the same number.
    pub fn coeffs(&self) -> [f64; 4] {
        [
            self.duration_per_hour / 3600.0,
            self.cpu_per_hour / 3600.0,
            self.egress_per_gib / 1024.0,
            self.start_fee,
        ]
        .map(|c| decimal(c, COEFF_PLACES).parse().unwrap_or(c))
    }

    /// The offer's pricing properties.
    pub fn offer_properties(&self) -> Properties {
        let c = self.coeffs();
        let mut p = Properties::new();
        p.insert("golem.com.pricing.model".into(), json!("linear"));
        p.insert(COEFFS_PROP.into(), json!(c));
        p.insert(USAGE_VECTOR_PROP.into(), json!(USAGE_VECTOR));
        p.insert("golem.com.pricing.currency".into(), json!(self.currency));
        p.insert("golem.com.pricing.preset".into(), json!(self.name));
        for (counter, coeff) in USAGE_VECTOR.iter().zip(c) {
            let short = counter.trim_start_matches("golem.usage.");
            p.insert(format!("{PRICE_PROP}.{short}"), Value::from(coeff));
        }
        p.insert(format!("{PRICE_PROP}.start"), Value::from(c[3]));
        p
    }

    /// What a job that used `usage` owes under this preset.
    pub fn charge(&self, usage: &Metered) -> Charge {
        let coeffs = self.coeffs();
        // The amount is computed from the values as the receipt states them, so anyone
        // can recompute it from the receipt alone.
        let usage: Vec<f64> = usage
            .vector()
            .iter()
            .zip(USAGE_PLACES)
            .map(|(u, places)| decimal(*u, places).parse().unwrap_or(*u))
            .collect();
        Charge {
            preset: self.name.clone(),
            currency: self.currency.clone(),
            usage_vector: USAGE_VECTOR.iter().map(|s| s.to_string()).collect(),
            amount: Charge::amount_of(&usage, &coeffs),
            usage: usage
                .iter()
                .zip(USAGE_PLACES)
                .map(|(u, places)| decimal(*u, places))
                .collect(),
            coeffs: coeffs.iter().map(|c| decimal(*c, COEFF_PLACES)).collect(),
        }
    }
}

/// `presets.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presets {
    pub presets: Vec<Preset>,
}

impl Presets {
    pub fn path(data: &DataDir) -> PathBuf {
        data.root().join("presets.json")
    }

    /// The file, or no presets when there is none.
    pub fn load(data: &DataDir) -> Result<Self, PresetError> {
        let path = Self::path(data);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(StoreError::Io {
                    action: "read",
                    path,
                    source,
                }
                .into())
            }
        };
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let p: Self = serde_path_to_error::deserialize(de).map_err(|e| StoreError::Invalid {
            path: path.clone(),
            message: format!("at {}: {}", e.path(), e.inner()),
        })?;
        for x in &p.presets {
            x.check().map_err(|e| StoreError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(p)
    }

    pub fn save(&self, data: &DataDir, _lock: &WriteLock) -> Result<(), PresetError> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("presets serialize");
        bytes.push(b'\n');
        atomic_write(&Self::path(data), &bytes)?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Preset> {
        self.presets.iter().find(|p| p.name == name)
    }

    /// The preset the daemon offers: `name` if given; else `default` if the operator made
    /// one; else the built-in free one.
    pub fn offered(&self, name: Option<&str>) -> Result<Preset, PresetError> {
        match name {
            Some(BUILTIN) => Ok(Preset::builtin()),
            Some(n) => self
                .get(n)
                .cloned()
                .ok_or_else(|| PresetError::Unknown(n.into())),
            None => Ok(self.get("default").cloned().unwrap_or_else(Preset::builtin)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::constraints::Filter;

    fn preset() -> Preset {
        Preset {
            name: "std".into(),
            currency: "GLM".into(),
            duration_per_hour: 0.36,
            cpu_per_hour: 1.8,
            egress_per_gib: 1.024,
            start_fee: 0.01,
            runtime_profile: None,
        }
    }

    #[test]
    fn the_amount_is_the_start_fee_plus_each_counter_times_its_price() {
        let c = preset().charge(&Metered {
            duration_sec: 100.0,
            cpu_sec: 50.0,
            egress_bytes: 2 * 1024 * 1024,
        });
        assert_eq!(c.usage, ["100", "50", "2"]);
        assert_eq!(c.coeffs, ["0.0001", "0.0005", "0.001", "0.01"]);
        // 100 × 0.0001 + 50 × 0.0005 + 2 × 0.001 + 0.01
        assert_eq!(c.amount, "0.047000000");
        assert!(c.check_amount().is_ok());
        assert_eq!(c.usage_vector[1], "golem.usage.cpu_sec");
    }

    #[test]
    fn a_requestor_can_cap_prices_with_constraints() {
        let props = preset().offer_properties();
        let ok = Filter::parse("(golem.com.pricing.model.linear.price.cpu_sec<=0.0005)").unwrap();
        assert!(ok.matches(&props));
        let cheap =
            Filter::parse("(golem.com.pricing.model.linear.price.cpu_sec<=0.0004)").unwrap();
        assert!(!cheap.matches(&props));
        assert_eq!(props[COEFFS_PROP], json!([0.0001, 0.0005, 0.001, 0.01]));
    }

    #[test]
    fn bad_presets_are_refused() {
        let mut p = preset();
        p.cpu_per_hour = -1.0;
        assert!(p.check().unwrap_err().to_string().contains("cpu_per_hour"));
        p = preset();
        p.name = "a/b".into();
        assert!(matches!(p.check(), Err(PresetError::BadName(_))));
        assert!(
            serde_json::from_str::<Presets>(r#"{"presets":[],"extra":1}"#).is_err(),
            "unknown fields are refused"
        );
    }
}
