//! `provider manifest check`: what this provider would answer to a demand carrying this
//! manifest, signature, certificate chain and node descriptor. A dry run: nothing is
//! written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use policies::{Demand, MatchedRule, Verdict};

use super::output;
use super::{Ctx, Outcome};

#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Judge a manifest (and its signature) as a demand would be judged.
    Check {
        /// The manifest: its JSON, or the base64 text a requestor sends.
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// The signature as the requestor sends it (base64 of the raw signature).
        #[arg(long, value_name = "FILE", requires_all = ["sig_alg", "cert"])]
        sig: Option<PathBuf>,
        /// Digest of the signature: sha256, sha384 or sha512.
        #[arg(long, value_name = "ALG", requires = "sig")]
        sig_alg: Option<String>,
        /// The author's certificate chain (PEM: leaf and intermediates, any order).
        #[arg(long, value_name = "FILE", requires = "sig")]
        cert: Option<PathBuf>,
        /// The requestor's libp2p peer id (for blacklist, allow-only and partner rules); a
        /// Golem `0x…` node id is accepted too, to check yagna's node descriptors.
        #[arg(long, value_name = "PEER-ID")]
        node_id: Option<String>,
        /// The requestor's Golem node descriptor (`*.signed.json`), for partner rules.
        #[arg(long, value_name = "FILE")]
        node_descriptor: Option<PathBuf>,
        /// Judge at this time instead of now (RFC 3339, e.g. 2030-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339")]
        now: Option<String>,
    },
}

pub fn run(ctx: &Ctx, cmd: ManifestCmd) -> anyhow::Result<Outcome> {
    let ManifestCmd::Check {
        manifest,
        sig,
        sig_alg,
        cert,
        node_id,
        node_descriptor,
        now,
    } = cmd;
    let now = match now {
        None => Utc::now(),
        Some(s) => DateTime::parse_from_rfc3339(&s)
            .with_context(|| {
                format!("--now `{s}` is not an RFC 3339 time like 2030-01-01T00:00:00Z")
            })?
            .with_timezone(&Utc),
    };
    let manifest_b64 = manifest_base64(&manifest)?;
    let signature = sig.as_deref().map(read_signature).transpose()?;
    let chain = cert.as_deref().map(read_chain).transpose()?;
    let descriptor = node_descriptor
        .as_deref()
        .map(read_descriptor)
        .transpose()?;
    if let Some(id) = &node_id {
        if !is_golem_node_id(id) {
            super::rule::check_peer_id(id)?;
        }
    }
    let judge = ctx.data.load_judge()?;
    let verdict = judge.judge(
        &Demand {
            manifest_base64: Some(&manifest_b64),
            signature_base64: signature.as_deref(),
            signature_algorithm: sig_alg.as_deref(),
            cert_chain_pem: chain.as_deref(),
            node_id: node_id.as_deref(),
            node_descriptor: descriptor.as_deref(),
        },
        now,
    );
    print(ctx, &verdict)?;
    Ok(if verdict.is_accept() {
        Outcome::Done
    } else {
        Outcome::Rejected
    })
}

/// The manifest file holds JSON (we derive the base64 text the requestor signed, from the
/// bytes exactly as they are) or that base64 text. A file that is neither is not a
/// manifest at all: bad input, not a verdict.
pub(crate) fn manifest_base64(path: &Path) -> anyhow::Result<String> {
    let bytes = read(path)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .with_context(|| format!("manifest {} is not valid JSON", path.display()))?;
            Ok(b64.encode(&bytes))
        }
        Some(_) => {
            let text = std::str::from_utf8(&bytes)
                .ok()
                .map(str::trim)
                .filter(|t| b64.decode(t).is_ok())
                .with_context(|| {
                    format!(
                        "manifest {} is neither JSON nor base64 of JSON",
                        path.display()
                    )
                })?;
            Ok(text.to_owned())
        }
        None => bail!("manifest {} is empty", path.display()),
    }
}

pub(crate) fn read_signature(path: &Path) -> anyhow::Result<String> {
    let bytes = read(path)?;
    let text = std::str::from_utf8(&bytes).unwrap_or("").trim().to_owned();
    match base64::engine::general_purpose::STANDARD.decode(&text) {
        Ok(raw) if !raw.is_empty() => Ok(text),
        Ok(_) => bail!("signature {} is empty", path.display()),
        Err(e) => bail!(
            "signature {} is not base64 ({e}); send base64 of the raw signature (openssl dgst … | base64 -w0)",
            path.display()
        ),
    }
}

pub(crate) fn read_chain(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path)?;
    certs::parse_certificates(&bytes)
        .with_context(|| format!("certificate chain {}", path.display()))?;
    Ok(bytes)
}

/// A descriptor that does not even parse is bad input (exit 2); one that parses but fails
/// verification is a verdict.
fn read_descriptor(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = read(path)?;
    certs::golem::NodeDescriptor::from_json(&bytes).with_context(|| path.display().to_string())?;
    Ok(bytes)
}

/// yagna's node ids: `0x` and 40 hex digits (an Ethereum-style address).
fn is_golem_node_id(id: &str) -> bool {
    id.len() == 42
        && id.is_ascii()
        && id[..2].eq_ignore_ascii_case("0x")
        && id[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn print(ctx: &Ctx, v: &Verdict) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(v);
    }
    println!(
        "verdict: {}",
        if v.is_accept() { "accept" } else { "reject" }
    );
    for r in &v.reasons {
        println!("  {}: {}", r.code, r.message);
    }
    match &v.matched_rule {
        Some(MatchedRule::Everyone { mode }) => {
            println!("outbound granted by: everyone (mode {mode})")
        }
        Some(MatchedRule::AuditedPayload {
            cert_id,
            subject,
            mode,
        }) => println!(
            "outbound granted by: audited-payload {} {subject} (mode {mode})",
            output::short_id(cert_id)
        ),
        Some(MatchedRule::Partner {
            cert_id,
            subject,
            mode,
        }) => println!(
            "outbound granted by: partner {} {subject} (mode {mode})",
            output::short_id(cert_id)
        ),
        None if v.is_accept() => println!("outbound: not requested"),
        None => {}
    }
    Ok(())
}
