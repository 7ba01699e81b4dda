//! `provider keystore add|list|remove`: the certificates this provider trusts, X.509
//! (PEM/DER, for audited-payload rules) and Golem (JSON, for partner rules).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use certs::golem::{self, SignedCertificate};
use certs::{parse_certificates, CertInfo, Entry, Keystore};
use chrono::Utc;
use clap::Subcommand;
use openssl::x509::X509;
use serde::Serialize;

use super::output::{self, short_id, Table};
use super::{Ctx, Outcome};
use crate::store::WriteLock;

#[derive(Debug, Subcommand)]
pub enum KeystoreCmd {
    /// Add certificates: PEM files (one or more certificates each), DER files, or Golem
    /// certificates (`*.signed.json`).
    Add {
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// List the trusted certificates.
    List,
    /// Remove certificates by id (any unique prefix); outbound rules naming them go too.
    Remove {
        #[arg(required = true, value_name = "ID-PREFIX")]
        ids: Vec<String>,
    },
}

pub fn run(ctx: &Ctx, cmd: KeystoreCmd) -> anyhow::Result<Outcome> {
    match cmd {
        KeystoreCmd::Add { paths } => add(ctx, &paths),
        KeystoreCmd::List => list(ctx),
        KeystoreCmd::Remove { ids } => remove(ctx, &ids),
    }
}

#[derive(Serialize)]
struct Added {
    #[serde(flatten)]
    info: CertInfo,
    status: &'static str,
}

/// A Golem certificate read for the keystore, with the file's bytes, which are stored as
/// they are (the signatures cover the content, not a re-serialisation of it).
pub(super) struct GolemFile {
    pub cert: SignedCertificate,
    pub bytes: Vec<u8>,
}

/// Reads a Golem certificate file; its whole chain must verify now (yagna refuses expired
/// ones too). Nothing is written.
pub(super) fn read_golem_file(path: &Path) -> anyhow::Result<GolemFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if golem::is_node_descriptor(&bytes) {
        anyhow::bail!(
            "{} is a node descriptor, not a certificate: requestors send it with their demand (try `provider manifest check --node-descriptor`)",
            path.display()
        );
    }
    if !golem::is_golem_certificate(&bytes) {
        anyhow::bail!(
            "{} is not a Golem certificate (a JSON object with `certificate` and `signature`)",
            path.display()
        );
    }
    let cert = SignedCertificate::from_json(&bytes)
        .and_then(|c| c.verify(Utc::now()).map(|()| c))
        .with_context(|| format!("{}", path.display()))?;
    Ok(GolemFile { cert, bytes })
}

/// Stores Golem certificates in `cert-dir/` (one `<id>.signed.json` each) unless already
/// there.
pub(super) fn store_golem(
    ctx: &Ctx,
    lock: &WriteLock,
    files: &[GolemFile],
) -> anyhow::Result<Vec<(CertInfo, bool)>> {
    let keystore = ctx.data.load_keystore()?;
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for f in files {
        let id = &f.cert.certificate.id;
        if !seen.insert(id.clone()) {
            continue;
        }
        let present = keystore.get_golem(id).is_some();
        if !present {
            ctx.data
                .save_cert_file(lock, &certs::golem_file_name_for(&f.cert), &f.bytes)?;
        }
        let c = &f.cert.certificate;
        out.push((
            CertInfo {
                id: id.clone(),
                subject: c.display_name.clone(),
                issuer: f.cert.signer.as_ref().map_or_else(
                    || c.display_name.clone(),
                    |s| s.certificate.display_name.clone(),
                ),
                not_before: c.validity.not_before,
                not_after: c.validity.not_after,
            },
            !present,
        ));
    }
    Ok(out)
}

/// Reads certificate files for the keystore; every certificate must be valid now. Nothing
/// is written.
pub(super) fn read_cert_files(paths: &[PathBuf]) -> anyhow::Result<Vec<X509>> {
    let now = Utc::now();
    let mut all = Vec::new();
    for path in paths {
        let certs = read_certs(path)?;
        for cert in certs {
            Keystore::check_validity(&cert, now).with_context(|| format!("{}", path.display()))?;
            all.push(cert);
        }
    }
    Ok(all)
}

/// Reads one certificate file (no validity check: a blacklist may name anything).
pub(super) fn read_certs(path: &Path) -> anyhow::Result<Vec<X509>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_certificates(&bytes).with_context(|| format!("{}", path.display()))
}

/// Stores certificates in `cert-dir/` (one `<id>.pem` each) unless already there.
pub(super) fn store_certs(
    ctx: &Ctx,
    lock: &WriteLock,
    certs: &[X509],
) -> anyhow::Result<Vec<(CertInfo, bool)>> {
    let keystore = ctx.data.load_keystore()?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for cert in certs {
        let info = CertInfo::of(cert);
        if !seen.insert(info.id.clone()) {
            continue;
        }
        let present = keystore.get(&info.id).is_some();
        if !present {
            ctx.data
                .save_cert_file(lock, &certs::file_name_for(cert), &cert.to_pem()?)?;
        }
        out.push((info, !present));
    }
    Ok(out)
}

fn add(ctx: &Ctx, paths: &[PathBuf]) -> anyhow::Result<Outcome> {
    // Every file is read and checked before anything is written: one bad file adds nothing.
    let mut x509_paths = Vec::new();
    let mut golem_files = Vec::new();
    for path in paths {
        let head =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        if golem::is_golem_certificate(&head) || golem::is_node_descriptor(&head) {
            golem_files.push(read_golem_file(path)?);
        } else {
            x509_paths.push(path.clone());
        }
    }
    let certs = read_cert_files(&x509_paths)?;
    let lock = ctx.data.lock()?;
    let mut stored = store_certs(ctx, &lock, &certs)?;
    stored.extend(store_golem(ctx, &lock, &golem_files)?);
    drop(lock);
    let rows: Vec<Added> = stored
        .into_iter()
        .map(|(info, added)| Added {
            info,
            status: if added { "added" } else { "already present" },
        })
        .collect();
    if ctx.json {
        return output::json(&rows).map(|_| Outcome::Done);
    }
    let mut t = Table::new(&["ID", "NOT AFTER", "STATUS", "SUBJECT"]);
    for r in &rows {
        t.row(vec![
            short_id(&r.info.id).into(),
            r.info.not_after.format("%Y-%m-%d").to_string(),
            r.status.into(),
            r.info.subject.clone(),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}

fn list(ctx: &Ctx) -> anyhow::Result<Outcome> {
    let keystore = ctx.data.load_keystore()?;
    let entries = keystore.entries();
    if ctx.json {
        #[derive(Serialize)]
        struct Listed<'a> {
            #[serde(flatten)]
            info: &'a CertInfo,
            is_ca: bool,
            #[serde(rename = "type")]
            kind: &'static str,
        }
        let listed: Vec<Listed<'_>> = entries
            .iter()
            .map(|e| Listed {
                info: e.info(),
                is_ca: e.is_ca(),
                kind: e.kind(),
            })
            .collect();
        return output::json(&listed).map(|_| Outcome::Done);
    }
    if keystore.is_empty() {
        println!("The keystore is empty: add CA certificates with `provider keystore add <PATH>`.");
        return Ok(Outcome::Done);
    }
    let mut t = Table::new(&["ID", "NOT AFTER", "CA", "TYPE", "SUBJECT"]);
    for e in &entries {
        t.row(vec![
            short_id(&e.info().id).into(),
            e.info().not_after.format("%Y-%m-%d").to_string(),
            if e.is_ca() { "yes" } else { "no" }.into(),
            e.kind().into(),
            e.info().subject.clone(),
        ]);
    }
    t.print();
    Ok(Outcome::Done)
}

fn remove(ctx: &Ctx, prefixes: &[String]) -> anyhow::Result<Outcome> {
    let lock = ctx.data.lock()?;
    let keystore = ctx.data.load_keystore()?;
    // Resolve every prefix before touching anything: one bad prefix changes nothing.
    let mut doomed: BTreeMap<String, Entry<'_>> = BTreeMap::new();
    for p in prefixes {
        let e = keystore.resolve_any_prefix(p)?;
        doomed.insert(e.info().id.clone(), e);
    }
    let mut rules = ctx.data.load_rules()?;
    let mut by_file: BTreeMap<&Path, Vec<&str>> = BTreeMap::new();
    for (id, e) in &doomed {
        match e {
            Entry::X509(c) => by_file.entry(c.path.as_path()).or_default().push(id),
            // A Golem certificate file holds that one certificate (its signers are embedded
            // in it, not separate keystore entries).
            Entry::Golem(c) => ctx.data.replace_cert_file(&lock, &c.path, None)?,
        }
    }
    for (path, ids) in by_file {
        let remaining: Vec<X509> = read_certs(path)?
            .into_iter()
            .filter(|c| !ids.contains(&certs::cert_id(c).as_str()))
            .collect();
        let pem = if remaining.is_empty() {
            None
        } else {
            let mut pem = Vec::new();
            for c in &remaining {
                pem.extend(c.to_pem()?);
            }
            Some(pem)
        };
        ctx.data.replace_cert_file(&lock, path, pem.as_deref())?;
    }
    // A grant for a certificate the operator no longer trusts must not linger; blacklist
    // entries stay, since forgetting a ban is never what removing trust means.
    let before = rules.clone();
    for id in doomed.keys() {
        rules.outbound.audited_payload.remove(id);
        rules.outbound.partner.remove(id);
    }
    if rules != before {
        ctx.data.save_rules(&lock, &rules)?;
    }
    drop(lock);
    let removed: Vec<&CertInfo> = doomed.values().map(|e| e.info()).collect();
    if ctx.json {
        return output::json(&removed).map(|_| Outcome::Done);
    }
    for c in removed {
        println!("removed {} {}", short_id(&c.id), c.subject);
    }
    Ok(Outcome::Done)
}
