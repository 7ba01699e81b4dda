//! `provider rule …`: outbound rules, blacklist and allow-only (yagna's operator surface).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::bail;
use certs::Keystore;
use clap::{Args, Subcommand, ValueEnum};
use policies::rules::{CertRule, RestrictList};
use policies::{Mode, Rules};

use super::keystore::{read_cert_files, read_certs, store_certs};
use super::output::{self, short_id, Table};
use super::{Ctx, Outcome};
use crate::store::WriteLock;

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    /// Set an outbound rule.
    #[command(subcommand)]
    Set(SetCmd),
    /// Add an entry to the blacklist or the allow-only list.
    #[command(subcommand)]
    Add(ListName),
    /// Remove an entry from the blacklist or the allow-only list.
    #[command(subcommand)]
    Remove(ListName),
    /// Enable a rule group.
    Enable {
        #[arg(value_enum)]
        rule: RuleGroup,
    },
    /// Disable a rule group.
    Disable {
        #[arg(value_enum)]
        rule: RuleGroup,
    },
    /// Show every rule.
    List,
}

#[derive(Debug, Subcommand)]
pub enum SetCmd {
    /// Rules for payloads that want to reach the internet.
    #[command(subcommand)]
    Outbound(OutboundSet),
}

#[derive(Debug, Subcommand)]
pub enum OutboundSet {
    /// Allow outbound traffic where a rule grants it.
    Enable,
    /// Refuse every demand that asks for outbound traffic.
    Disable,
    /// The rule for any requestor, signed or not.
    Everyone {
        #[arg(long, value_enum)]
        mode: ModeArg,
    },
    /// The rule for manifests signed by a chain through this certificate.
    #[command(subcommand)]
    AuditedPayload(CertWithMode),
}

#[derive(Debug, Subcommand)]
pub enum CertWithMode {
    /// A certificate already in the keystore, by id (any unique prefix).
    CertId {
        id: String,
        #[command(flatten)]
        mode: ModeOpts,
    },
    /// Add the certificates of a file to the keystore and set the rule for each.
    ImportCert {
        path: PathBuf,
        #[command(flatten)]
        mode: ModeOpts,
    },
}

#[derive(Debug, Args)]
pub struct ModeOpts {
    #[arg(long, value_enum)]
    mode: ModeArg,
    /// Free text shown by `rule list`.
    #[arg(long, default_value = "")]
    description: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Any URL the manifest asks for.
    All,
    /// No outbound traffic.
    None,
    /// Only hosts on the domain whitelist.
    Whitelist,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::All => Mode::All,
            ModeArg::None => Mode::None,
            ModeArg::Whitelist => Mode::Whitelist,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RuleGroup {
    Outbound,
    Blacklist,
    AllowOnly,
}

#[derive(Debug, Subcommand)]
pub enum ListName {
    /// Requestors whose demands are always refused.
    #[command(subcommand)]
    Blacklist(Who),
    /// When enabled, only these requestors are served.
    #[command(subcommand)]
    AllowOnly(Who),
}

#[derive(Debug, Subcommand)]
pub enum Who {
    /// A requestor's libp2p peer id.
    Identity {
        #[arg(value_name = "PEER-ID")]
        peer_id: String,
    },
    /// Requestors whose manifest is signed through this certificate.
    #[command(subcommand)]
    Certified(CertSel),
}

#[derive(Debug, Subcommand)]
pub enum CertSel {
    /// By certificate id (a full id, or a unique prefix of one in the keystore or the list).
    CertId { id: String },
    /// The certificates of a file.
    ImportCert { path: PathBuf },
}

pub fn run(ctx: &Ctx, cmd: RuleCmd) -> anyhow::Result<Outcome> {
    match cmd {
        RuleCmd::List => list(ctx),
        RuleCmd::Set(SetCmd::Outbound(set)) => {
            // Certificates to import are read and checked before the lock: a bad file must
            // change nothing.
            let imported = match &set {
                OutboundSet::AuditedPayload(CertWithMode::ImportCert { path, .. }) => {
                    read_cert_files(std::slice::from_ref(path))?
                }
                _ => Vec::new(),
            };
            update(ctx, |rules, lock| {
                let out = &mut rules.outbound;
                match set {
                    OutboundSet::Enable => out.enabled = true,
                    OutboundSet::Disable => out.enabled = false,
                    OutboundSet::Everyone { mode } => out.everyone = mode.into(),
                    OutboundSet::AuditedPayload(CertWithMode::CertId { id, mode }) => {
                        let keystore = ctx.data.load_keystore()?;
                        let id = keystore.resolve_prefix(&id)?.info.id.clone();
                        out.audited_payload.insert(id, cert_rule(mode));
                    }
                    OutboundSet::AuditedPayload(CertWithMode::ImportCert { mode, .. }) => {
                        for (info, _) in store_certs(ctx, lock, &imported)? {
                            out.audited_payload.insert(
                                info.id,
                                CertRule {
                                    mode: mode.mode.into(),
                                    description: mode.description.clone(),
                                },
                            );
                        }
                    }
                }
                Ok(())
            })
        }
        RuleCmd::Enable { rule } => update(ctx, |r, _| {
            set_enabled(r, rule, true);
            Ok(())
        }),
        RuleCmd::Disable { rule } => update(ctx, |r, _| {
            set_enabled(r, rule, false);
            Ok(())
        }),
        RuleCmd::Add(list) => change_list(ctx, list, true),
        RuleCmd::Remove(list) => change_list(ctx, list, false),
    }
}

fn cert_rule(m: ModeOpts) -> CertRule {
    CertRule {
        mode: m.mode.into(),
        description: m.description,
    }
}

fn set_enabled(rules: &mut Rules, group: RuleGroup, enabled: bool) {
    match group {
        RuleGroup::Outbound => rules.outbound.enabled = enabled,
        RuleGroup::Blacklist => rules.blacklist.enabled = enabled,
        RuleGroup::AllowOnly => rules.allow_only.enabled = enabled,
    }
}

/// Read, change and write `rules.json` under the data dir's lock, then show the result.
fn update(
    ctx: &Ctx,
    change: impl FnOnce(&mut Rules, &WriteLock) -> anyhow::Result<()>,
) -> anyhow::Result<Outcome> {
    let lock = ctx.data.lock()?;
    let mut rules = ctx.data.load_rules()?;
    change(&mut rules, &lock)?;
    ctx.data.save_rules(&lock, &rules)?;
    drop(lock);
    list(ctx)
}

fn change_list(ctx: &Ctx, list: ListName, add: bool) -> anyhow::Result<Outcome> {
    let (name, who) = match list {
        ListName::Blacklist(w) => ("blacklist", w),
        ListName::AllowOnly(w) => ("allow-only", w),
    };
    let imported = match &who {
        Who::Certified(CertSel::ImportCert { path }) => read_certs(path)?,
        _ => Vec::new(),
    };
    update(ctx, |rules, lock| {
        let keystore = ctx.data.load_keystore()?;
        let target: &mut RestrictList = if name == "blacklist" {
            &mut rules.blacklist
        } else {
            &mut rules.allow_only
        };
        match who {
            Who::Identity { peer_id } => {
                check_peer_id(&peer_id)?;
                edit(&mut target.identity, [peer_id], add, name, "identity")?;
            }
            Who::Certified(CertSel::CertId { id }) => {
                let id = if add {
                    resolve_for_add(&keystore, &id)?
                } else {
                    resolve_in(&target.certified, &id, name)?
                };
                edit(&mut target.certified, [id], add, name, "certified")?;
            }
            Who::Certified(CertSel::ImportCert { .. }) => {
                // Allow-only by certificate needs the chain to verify, so its certificates
                // join the keystore; a blacklist must never add trust, so it only records
                // ids.
                if add && name == "allow-only" {
                    store_certs(ctx, lock, &imported)?;
                }
                let ids: Vec<String> = imported.iter().map(|c| certs::cert_id(c)).collect();
                edit(&mut target.certified, ids, add, name, "certified")?;
            }
        }
        if add && name == "allow-only" && !target.enabled {
            tracing::warn!(
                "the allow-only list is disabled; `provider rule enable allow-only` makes it take effect"
            );
        }
        Ok(())
    })
}

fn edit(
    set: &mut BTreeSet<String>,
    items: impl IntoIterator<Item = String>,
    add: bool,
    list: &str,
    kind: &str,
) -> anyhow::Result<()> {
    for item in items {
        if add {
            set.insert(item);
        } else if !set.remove(&item) {
            bail!("{list} has no {kind} entry `{item}` (see `provider rule list`)");
        }
    }
    Ok(())
}

/// A full id is taken as is (a blacklist may name a certificate the keystore lacks); a
/// prefix must name one keystore certificate.
fn resolve_for_add(keystore: &Keystore, id: &str) -> anyhow::Result<String> {
    let norm = certs::normalize_prefix(id)?;
    if norm.len() == 128 {
        return Ok(norm);
    }
    Ok(keystore.resolve_prefix(&norm)?.info.id.clone())
}

fn resolve_in(set: &BTreeSet<String>, prefix: &str, list: &str) -> anyhow::Result<String> {
    let norm = certs::normalize_prefix(prefix)?;
    let found: Vec<&String> = set.iter().filter(|id| id.starts_with(&norm)).collect();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("{list} has no certified entry starting with `{prefix}`"),
        many => bail!(
            "certificate id prefix `{prefix}` is ambiguous in {list}: it matches {}; give more characters",
            many.iter().map(|s| short_id(s)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// libp2p peer ids are base58btc multihashes (`12D3KooW…` for ed25519 keys, `Qm…` for
/// others); anything else cannot be a requestor on this network.
pub(super) fn check_peer_id(id: &str) -> anyhow::Result<()> {
    const B58: &str = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    if (40..=64).contains(&id.len()) && id.chars().all(|c| B58.contains(c)) {
        Ok(())
    } else {
        bail!("`{id}` is not a libp2p peer id (base58, like 12D3KooW…)")
    }
}

fn list(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let rules = ctx.data.load_rules()?;
    if ctx.json {
        return output::json(&rules).map(|_| Outcome::Done);
    }
    // A keystore that fails to load must not hide the rules; subjects are a courtesy.
    let keystore = ctx.data.load_keystore().ok();
    let subject = |id: &str| {
        keystore
            .as_ref()
            .and_then(|k| k.get(id))
            .map(|c| c.info.short_name().to_owned())
            .unwrap_or_else(|| "(not in keystore)".into())
    };
    let on = |b: bool| if b { "enabled" } else { "disabled" }.to_string();
    let mut t = Table::new(&["RULE", "TARGET", "SETTING", "DETAIL"]);
    let o = &rules.outbound;
    t.row(vec![
        "outbound".into(),
        "-".into(),
        on(o.enabled),
        String::new(),
    ]);
    t.row(vec![
        "outbound everyone".into(),
        "-".into(),
        o.everyone.to_string(),
        String::new(),
    ]);
    for (kind, map) in [
        ("audited-payload", &o.audited_payload),
        ("partner", &o.partner),
    ] {
        for (id, r) in map {
            let detail = if r.description.is_empty() {
                subject(id)
            } else {
                format!("{} — {}", subject(id), r.description)
            };
            t.row(vec![
                format!("outbound {kind}"),
                short_id(id).into(),
                r.mode.to_string(),
                detail,
            ]);
        }
    }
    for (name, l) in [
        ("blacklist", &rules.blacklist),
        ("allow-only", &rules.allow_only),
    ] {
        t.row(vec![name.into(), "-".into(), on(l.enabled), String::new()]);
        for id in &l.identity {
            t.row(vec![
                name.into(),
                id.clone(),
                "identity".into(),
                String::new(),
            ]);
        }
        for id in &l.certified {
            t.row(vec![
                name.into(),
                short_id(id).into(),
                "certified".into(),
                subject(id),
            ]);
        }
    }
    t.print();
    Ok(Outcome::Done)
}
