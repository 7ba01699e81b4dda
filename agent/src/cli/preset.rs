//! `provider preset list|create|update|remove`: price lists in yagna's linear model
//! (`<data-dir>/presets.json`, see [`crate::market::pricing`]).

use clap::{Args, Subcommand};

use super::output::{self, Table};
use super::{Ctx, Outcome};
use crate::market::pricing::{Preset, PresetError, Presets, BUILTIN};
use crate::market::runtime::RuntimeProfile;

/// A preset may only name a runtime profile that loads.
fn check_runtime(ctx: &Ctx, p: &Preset) -> anyhow::Result<()> {
    if let Some(name) = &p.runtime_profile {
        RuntimeProfile::load(&ctx.data, name)?;
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PresetCmd {
    /// Every preset; `OFFERED` marks the one a daemon without `--preset` offers.
    List,
    /// A new preset.
    Create {
        name: String,
        #[command(flatten)]
        prices: Prices,
    },
    /// Change a preset's prices; unnamed ones are kept.
    Update {
        name: String,
        #[command(flatten)]
        prices: Prices,
    },
    /// Remove presets.
    Remove {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct Prices {
    /// Per hour of a job's wall time (from its VM being ready to its end).
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    duration_per_hour: Option<f64>,
    /// Per hour of CPU time of a job's VM.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    cpu_per_hour: Option<f64>,
    /// Per GiB through a job's egress proxy.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    egress_per_gib: Option<f64>,
    /// Once per job.
    #[arg(long, value_name = "PRICE", allow_negative_numbers = true)]
    start_fee: Option<f64>,
    /// The unit of the prices [default: GLM].
    #[arg(long)]
    currency: Option<String>,
    /// The runtime profile the preset's jobs run under.
    #[arg(long, value_name = "NAME")]
    runtime_profile: Option<String>,
}

impl Prices {
    fn apply(self, p: &mut Preset) {
        if let Some(v) = self.duration_per_hour {
            p.duration_per_hour = v;
        }
        if let Some(v) = self.cpu_per_hour {
            p.cpu_per_hour = v;
        }
        if let Some(v) = self.egress_per_gib {
            p.egress_per_gib = v;
        }
        if let Some(v) = self.start_fee {
            p.start_fee = v;
        }
        if let Some(v) = self.currency {
            p.currency = v;
        }
        if let Some(v) = self.runtime_profile {
            p.runtime_profile = Some(v);
        }
    }
}

pub fn run(ctx: &Ctx, cmd: PresetCmd) -> anyhow::Result<Outcome> {
    match cmd {
        PresetCmd::List => list(ctx),
        PresetCmd::Create { name, prices } => {
            if name == BUILTIN {
                return Err(PresetError::Builtin.into());
            }
            let mut p = Preset {
                name,
                ..Preset::builtin()
            };
            prices.apply(&mut p);
            p.check()?;
            check_runtime(ctx, &p)?;
            let lock = ctx.data.lock()?;
            let mut all = Presets::load(&ctx.data)?;
            if all.get(&p.name).is_some() {
                return Err(PresetError::Exists(p.name).into());
            }
            eprintln!("preset {} created", p.name);
            all.presets.push(p);
            all.save(&ctx.data, &lock)?;
            Ok(Outcome::Done)
        }
        PresetCmd::Update { name, prices } => {
            if name == BUILTIN {
                return Err(PresetError::Builtin.into());
            }
            let lock = ctx.data.lock()?;
            let mut all = Presets::load(&ctx.data)?;
            let Some(p) = all.presets.iter_mut().find(|p| p.name == name) else {
                return Err(PresetError::Unknown(name).into());
            };
            prices.apply(p);
            p.check()?;
            check_runtime(ctx, p)?;
            all.save(&ctx.data, &lock)?;
            eprintln!("preset {name} updated; a running daemon offers it after a restart");
            Ok(Outcome::Done)
        }
        PresetCmd::Remove { names } => {
            let lock = ctx.data.lock()?;
            let mut all = Presets::load(&ctx.data)?;
            // All or nothing: one unknown name removes none.
            if let Some(n) = names.iter().find(|n| all.get(n).is_none()) {
                return Err(PresetError::Unknown(n.clone()).into());
            }
            all.presets.retain(|p| !names.contains(&p.name));
            all.save(&ctx.data, &lock)?;
            eprintln!("removed {}", names.join(", "));
            Ok(Outcome::Done)
        }
    }
}

fn list(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let all = Presets::load(&ctx.data)?;
    let offered = all.offered(None)?.name;
    let mut rows = all.presets.clone();
    if all.get(BUILTIN).is_none() {
        rows.insert(0, Preset::builtin());
    }
    if ctx.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).expect("a preset serializes");
                v["offered"] = (p.name == offered).into();
                v["coeffs"] = serde_json::json!(p.coeffs());
                v
            })
            .collect();
        output::json(&v)?;
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&[
        "NAME",
        "OFFERED",
        "PER HOUR",
        "PER CPU HOUR",
        "PER EGRESS GIB",
        "START FEE",
        "CURRENCY",
        "RUNTIME",
    ]);
    for p in &rows {
        t.row(vec![
            p.name.clone(),
            if p.name == offered { "yes" } else { "" }.into(),
            p.duration_per_hour.to_string(),
            p.cpu_per_hour.to_string(),
            p.egress_per_gib.to_string(),
            p.start_fee.to_string(),
            p.currency.clone(),
            p.runtime_profile
                .clone()
                .unwrap_or_else(|| "default".into()),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}
