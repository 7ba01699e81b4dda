//! The `requestor` command line: sign a manifest, submit it with a script to a provider,
//! follow the results, keep and verify the receipt; find providers and their offers
//! (mDNS on the LAN, bootstrap + DHT + gossip beyond it: [`offers`]).
//!
//! Exit codes: 0 everything ran and succeeded; 1 the provider rejected the demand, or a
//! command was denied or failed (the reason is printed); 2 bad input or usage; 3 the
//! provider could not be reached or broke the protocol.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use policies::MatchedRule;
use serde_json::{json, Value};

use crate::cli::manifest::{manifest_base64, read_chain, read_signature};
use crate::cli::output;
use crate::units::HumanDuration;
use net::receipt::SignedReceipt;
use net::wire::{
    props, ActivityRequest, ActivityResponse, CommandResult, MarketRequest, MarketResponse,
    Outcome as CmdOutcome,
};
use net::NetConfig;

pub mod offers;

/// Requestor: get a signed payload run on a provider, with its commands gated and its
/// egress filtered, and keep the signed receipt.
#[derive(Debug, Parser)]
#[command(name = "requestor", version, about)]
pub struct Cli {
    /// Print JSON (JSON lines for `submit`) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manifests: sign one with the app author's key.
    #[command(subcommand)]
    Manifest(ManifestCmd),
    /// Negotiate with a provider, run a batch, print results, save the receipt.
    Submit(Box<SubmitArgs>),
    /// List providers' offers: on the local network (mDNS) and, with `--bootstrap`, across
    /// networks (signed offers from the DHT and gossip), ranked (see docs/requestor.md).
    Offers {
        /// How long to listen for providers.
        #[arg(long, value_name = "DURATION", default_value = "3s")]
        wait: HumanDuration,
        /// A bootstrap peer, `/ip4/…/tcp/…/p2p/<peer id>` (repeatable).
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<Multiaddr>,
        /// Only offers whose properties match this LDAP-style filter.
        #[arg(long, value_name = "LDAP")]
        constraints: Option<String>,
        /// The runtime whose providers are looked up in the DHT.
        #[arg(long, value_name = "NAME", default_value = "vm")]
        runtime: String,
        /// Stop as soon as this many matching offers are known (at most `--wait`).
        #[arg(long, value_name = "N")]
        expect: Option<usize>,
        /// Do not look for providers on the LAN with mDNS.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Receipts: check one offline.
    #[command(subcommand)]
    Receipt(ReceiptCmd),
    /// Print the peer id of an identity file (created if missing).
    Identity {
        #[arg(long, value_name = "FILE")]
        identity: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Sign the manifest's base64 text; writes base64 of the raw signature.
    Sign {
        #[arg(long, value_name = "FILE")]
        manifest: PathBuf,
        /// The app author's private key (PEM; RSA or EC).
        #[arg(long, value_name = "KEY.pem")]
        key: PathBuf,
        #[arg(long, value_enum, default_value = "sha256")]
        alg: Alg,
        #[arg(long, value_name = "SIG")]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Alg {
    Sha256,
    Sha384,
    Sha512,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Sha256 => "sha256",
            Alg::Sha384 => "sha384",
            Alg::Sha512 => "sha512",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ReceiptCmd {
    /// Check a receipt's signature and that it is the provider's key.
    Verify { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The provider: `/ip4/…/tcp/…/p2p/<peer id>` as `provider run` prints it.
    #[arg(long, value_name = "MULTIADDR")]
    provider: Multiaddr,
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Base64 of the raw signature (`requestor manifest sign`).
    #[arg(long, value_name = "FILE", requires = "cert")]
    sig: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "sha256")]
    sig_alg: Alg,
    /// The app author's certificate chain (PEM: leaf, then intermediates).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// A Golem node descriptor (JSON) for the provider's partner rule.
    #[arg(long, value_name = "FILE")]
    node_descriptor: Option<PathBuf>,
    /// LDAP-style filter over the provider's offer.
    #[arg(long, value_name = "LDAP", default_value = "")]
    constraints: String,
    /// The most this requestor pays (repeatable), in the units of `provider preset`:
    /// `duration=PRICE` per hour, `cpu=PRICE` per CPU hour, `egress=PRICE` per GiB,
    /// `start=PRICE` per job. Added to the constraints, so a dearer provider rejects the
    /// demand (`constraints-unmet`).
    #[arg(long, value_name = "KIND=PRICE", value_parser = parse_max_price)]
    max_price: Vec<(String, f64)>,
    /// An ExeScript batch (a JSON array of commands). Repeat it to run several batches,
    /// in order, in the same VM; each batch stops at its first denied or failed command.
    #[arg(long, value_name = "BATCH.json", required_unless_present = "dry_run")]
    script: Vec<PathBuf>,
    /// Negotiate only: print the provider's verdict and stop before agreeing (exit 0 when
    /// it would accept, 1 when it rejects).
    #[arg(long)]
    dry_run: bool,
    /// Where the receipt is saved.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out_dir: PathBuf,
    /// This requestor's identity key (created if missing); default: a fresh one per run.
    #[arg(long, value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Give up on the whole job after this long.
    #[arg(long, value_name = "DURATION", default_value = "30m")]
    timeout: HumanDuration,
    /// Print how long negotiation, VM start and the first command output took (stderr).
    #[arg(long)]
    timings: bool,
}

/// Why `submit` stopped early, with its exit code.
enum Stop {
    Rejected,
    Unreachable(anyhow::Error),
}

pub fn main() -> ExitCode {
    crate::cli::init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return crate::cli::clap_exit(e),
    };
    let json = cli.json;
    let result = match cli.command {
        Command::Manifest(ManifestCmd::Sign {
            manifest,
            key,
            alg,
            out,
        }) => sign(&manifest, &key, alg, &out).map(|()| 0),
        Command::Receipt(ReceiptCmd::Verify { file }) => verify(&file, json),
        Command::Identity { identity } => net::load_or_create_identity(&identity)
            .map(|k| {
                println!("{}", k.public().to_peer_id());
                0
            })
            .map_err(anyhow::Error::from),
        Command::Offers {
            wait,
            bootstrap,
            constraints,
            runtime,
            expect,
            no_mdns,
        } => list_offers(
            offers::OffersArgs {
                wait: wait.get(),
                bootstrap,
                constraints: None,
                runtime,
                mdns: !no_mdns,
                expect,
            },
            constraints,
            json,
        ),
        Command::Submit(args) => match submit(*args, json) {
            Ok(code) => Ok(code),
            Err(Stop::Rejected) => Ok(1),
            Err(Stop::Unreachable(e)) => {
                eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
                return ExitCode::from(3);
            }
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

fn sign(manifest: &Path, key: &Path, alg: Alg, out: &Path) -> anyhow::Result<()> {
    let text = manifest_base64(manifest)?;
    let pem = std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key = openssl::pkey::PKey::private_key_from_pem(&pem)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let digest = match alg {
        Alg::Sha256 => openssl::hash::MessageDigest::sha256(),
        Alg::Sha384 => openssl::hash::MessageDigest::sha384(),
        Alg::Sha512 => openssl::hash::MessageDigest::sha512(),
    };
    let mut signer = openssl::sign::Signer::new(digest, &key).context("set up signing")?;
    signer.update(text.as_bytes()).context("sign")?;
    let sig = signer.sign_to_vec().context("sign")?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
    crate::store::atomic_write(out, b64.as_bytes())?;
    eprintln!(
        "signed the base64 text of {} with {}; signature in {}",
        manifest.display(),
        alg.name(),
        out.display()
    );
    Ok(())
}

fn verify(file: &Path, json: bool) -> anyhow::Result<u8> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let receipt = SignedReceipt::from_json(&bytes)
        .with_context(|| format!("{} is not a receipt", file.display()))?;
    let result = receipt.verify();
    let r = &receipt.receipt;
    if json {
        output::json(&json!({
            "valid": result.is_ok(),
            "error": result.as_ref().err().map(|e| e.to_string()),
            "provider_id": r.provider_id,
            "requestor_id": r.requestor_id,
            "agreement_id": r.agreement_id,
            "commands": r.commands.len(),
            "egress": r.egress.len(),
            "usage": r.usage,
            "charge": r.charge,
            "runtime_profile": r.runtime_profile,
        }))?;
    } else {
        match &result {
            Ok(()) => println!(
                "receipt OK: signed by provider {}\n  agreement {}, activity {}, requestor {}\n  {} commands, {} egress decisions, ended: {}",
                r.provider_id,
                r.agreement_id,
                r.activity_id,
                r.requestor_id,
                r.commands.len(),
                r.egress.len(),
                r.termination
            ),
            Err(e) => println!("receipt INVALID: {e}"),
        }
        if let Some(c) = &r.charge {
            println!(
                "  amount due: {} {} (preset {}; start fee {})",
                c.amount,
                c.currency,
                c.preset,
                c.coeffs.last().map_or("0", String::as_str)
            );
            for ((name, value), coeff) in c.usage_vector.iter().zip(&c.usage).zip(&c.coeffs) {
                println!("    {name} = {value} × {coeff}");
            }
        }
        if let Some(p) = &r.runtime_profile {
            println!("  runtime profile: {p}");
        }
    }
    Ok(if result.is_ok() { 0 } else { 1 })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn list_offers(
    mut args: offers::OffersArgs,
    constraints: Option<String>,
    json: bool,
) -> anyhow::Result<u8> {
    if let Some(text) = constraints.filter(|c| !c.trim().is_empty()) {
        args.constraints = Some(
            crate::market::constraints::Filter::parse(&text)
                .map_err(|e| anyhow::anyhow!("--constraints: {e}"))?,
        );
    }
    for addr in &args.bootstrap {
        if !matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
            anyhow::bail!("--bootstrap {addr} does not end in /p2p/<peer id>");
        }
    }
    let rt = runtime()?;
    match rt.block_on(offers::offers(args, json)) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
            Ok(3)
        }
    }
}

/// `matched_rule` as a person reads it: ` (rule audited-payload "CN=…", outbound mode all)`.
fn describe_rule(rule: &MatchedRule) -> String {
    let mode = rule.mode();
    match rule {
        MatchedRule::Everyone { .. } => format!(" (rule everyone, outbound mode {mode})"),
        MatchedRule::AuditedPayload { subject, .. } => {
            format!(" (rule audited-payload \"{subject}\", outbound mode {mode})")
        }
        MatchedRule::Partner { subject, .. } => {
            format!(" (rule partner \"{subject}\", outbound mode {mode})")
        }
    }
}

/// What `submit` prints: text for people, one JSON object per line with `--json`.
struct Printer {
    json: bool,
}

impl Printer {
    fn event(&self, event: &str, text: String, value: Value) {
        if self.json {
            let mut v = value;
            if let Value::Object(m) = &mut v {
                m.insert("event".into(), event.into());
            }
            println!("{v}");
        } else {
            println!("{text}");
        }
        let _ = std::io::stdout().flush();
    }

    fn result(&self, r: &CommandResult) {
        if self.json {
            let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("event".into(), "result".into());
            }
            println!("{v}");
        } else {
            let head = match r.outcome {
                CmdOutcome::Ok => format!("ok (exit {})", r.exit_code.unwrap_or(0)),
                CmdOutcome::Failed => match r.exit_code {
                    Some(c) => format!("FAILED (exit {c})"),
                    None => "FAILED".into(),
                },
                CmdOutcome::Denied => "DENIED".into(),
                CmdOutcome::Skipped => "skipped".into(),
            };
            println!("[{}] {head}: {}", r.index, r.command);
            if let Some(reason) = &r.reason {
                println!("    {}: {}", reason.code, reason.message);
            }
            for (name, text) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
                for line in text.lines() {
                    println!("    {name}| {line}");
                }
            }
            if r.truncated {
                println!("    (output truncated at the provider's limit)");
            }
        }
        let _ = std::io::stdout().flush();
    }
}

/// `--max-price KIND=PRICE`.
fn parse_max_price(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: want KIND=PRICE, e.g. cpu=0.5"))?;
    let v: f64 = v
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("`{s}`: the price must be a number ≥ 0"))?;
    match k.trim() {
        "duration" | "cpu" | "egress" | "start" => Ok((k.trim().to_owned(), v)),
        other => Err(format!(
            "`{other}`: not a price kind; one of duration, cpu, egress, start"
        )),
    }
}

/// The demand's constraints: `--constraints` and a cap per `--max-price`, over the offer's
/// per-counter price properties (rounded as the provider rounds its coefficients).
fn demand_constraints(args: &SubmitArgs) -> String {
    let caps: Vec<String> = args
        .max_price
        .iter()
        .map(|(kind, v)| {
            let (counter, per_unit) = match kind.as_str() {
                "duration" => ("duration_sec", v / 3600.0),
                "cpu" => ("cpu_sec", v / 3600.0),
                "egress" => ("egress_mib", v / 1024.0),
                _ => ("start", *v),
            };
            format!(
                "({}.{counter}<={})",
                crate::market::pricing::PRICE_PROP,
                net::receipt::decimal(per_unit, 12)
            )
        })
        .collect();
    match (args.constraints.trim(), caps.is_empty()) {
        (c, true) => c.to_owned(),
        ("", false) => format!("(&{})", caps.concat()),
        (c, false) => format!("(&{c}{})", caps.concat()),
    }
}

fn demand_properties(args: &SubmitArgs) -> anyhow::Result<Value> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut p = serde_json::Map::new();
    p.insert(
        props::PAYLOAD.into(),
        manifest_base64(&args.manifest)?.into(),
    );
    if let Some(sig) = &args.sig {
        p.insert(props::PAYLOAD_SIG.into(), read_signature(sig)?.into());
        p.insert(props::PAYLOAD_SIG_ALG.into(), args.sig_alg.name().into());
    }
    if let Some(cert) = &args.cert {
        p.insert(
            props::PAYLOAD_CERT.into(),
            b64.encode(read_chain(cert)?).into(),
        );
    }
    if let Some(d) = &args.node_descriptor {
        let bytes = std::fs::read(d).with_context(|| format!("cannot read {}", d.display()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("node descriptor {} is not JSON", d.display()))?;
        p.insert(props::NODE_DESCRIPTOR.into(), v);
    }
    p.insert(
        "golem.srv.comp.expiration".into(),
        json!(chrono::Utc::now().timestamp_millis() + 3_600_000),
    );
    Ok(Value::Object(p))
}

fn submit(args: SubmitArgs, json: bool) -> Result<u8, Stop> {
    let bad = |e: anyhow::Error| -> Stop {
        eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
        std::process::exit(2)
    };
    // Input first: nothing goes on the wire if a file is wrong.
    let properties = demand_properties(&args).map_err(|e| {
        eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
        std::process::exit(2)
    })?;
    let mut batches = Vec::new();
    for path in &args.script {
        let batch: Value = std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .and_then(|b| {
                let text = String::from_utf8(b).context("the script is not UTF-8")?;
                exescript::parse_batch(&text)
                    .with_context(|| format!("script {}", path.display()))?;
                Ok(serde_json::from_str(&text)?)
            })
            .map_err(|e| {
                eprintln!("error: {}", crate::cli::one_line(&format!("{e:#}")));
                std::process::exit(2)
            })?;
        batches.push(batch);
    }
    if args.constraints.trim() != "" {
        if let Err(e) = crate::market::constraints::Filter::parse(&args.constraints) {
            eprintln!("error: --constraints: {e}");
            std::process::exit(2);
        }
    }
    let Some(Protocol::P2p(peer)) = args.provider.iter().last() else {
        eprintln!(
            "error: --provider {} has no /p2p/<peer id> at its end; use the address `provider run` prints",
            args.provider
        );
        std::process::exit(2);
    };
    let identity = match &args.identity {
        Some(p) => net::load_or_create_identity(p).map_err(|e| bad(anyhow::Error::from(e)))?,
        None => Keypair::generate_ed25519(),
    };
    let rt = runtime().map_err(Stop::Unreachable)?;
    let printer = Printer { json };
    let result = rt.block_on(async {
        tokio::time::timeout(
            args.timeout.get(),
            session(&args, identity, peer, properties, batches, &printer),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Stop::Unreachable(anyhow::anyhow!(
                "the job did not finish within --timeout {:?}",
                args.timeout.get()
            )))
        })
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

fn unreachable(e: impl Into<anyhow::Error>) -> Stop {
    Stop::Unreachable(e.into())
}

async fn session(
    args: &SubmitArgs,
    identity: Keypair,
    peer: PeerId,
    properties: Value,
    batches: Vec<Value>,
    out: &Printer,
) -> Result<u8, Stop> {
    let started = std::time::Instant::now();
    let (client, _inbound, event_loop) = net::new(
        identity,
        NetConfig {
            mdns: false,
            ..NetConfig::default()
        },
    )
    .map_err(unreachable)?;
    tokio::spawn(event_loop.run());
    // A listener gives outgoing connections a fixed local port (port reuse), which is what
    // lets DCUtR punch a hole when the provider is reached through a relay.
    if let Err(e) = client
        .listen("/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"))
        .await
    {
        tracing::debug!("no listener (hole punching unavailable): {e}");
    }
    client
        .dial(args.provider.clone())
        .await
        .with_context(|| format!("cannot reach the provider at {}", args.provider))
        .map_err(unreachable)?;

    let Value::Object(properties) = properties else {
        unreachable!("demand_properties builds an object")
    };
    let response = client
        .market(
            peer,
            MarketRequest::Demand {
                properties: properties.into_iter().collect(),
                constraints: demand_constraints(args),
            },
        )
        .await
        .context("demand")
        .map_err(unreachable)?;
    let proposal_id = match response {
        MarketResponse::Proposal {
            proposal_id,
            matched_rule,
            ..
        } => {
            out.event(
                "proposal",
                format!(
                    "demand accepted by {peer}{}",
                    matched_rule.as_ref().map(describe_rule).unwrap_or_default()
                ),
                json!({"proposal_id": proposal_id, "matched_rule": matched_rule}),
            );
            if args.dry_run {
                return Ok(0);
            }
            proposal_id
        }
        MarketResponse::Rejected { reasons } => {
            out.event(
                "rejected",
                format!("demand REJECTED by {peer}"),
                json!({"reasons": reasons}),
            );
            if !out.json {
                for r in &reasons {
                    println!("  {}: {}", r.code, r.message);
                }
            }
            for r in &reasons {
                eprintln!("rejected: {}: {}", r.code, r.message);
            }
            return Err(Stop::Rejected);
        }
        other => {
            return Err(unreachable(anyhow::anyhow!(
                "unexpected answer to a demand: {other:?}"
            )))
        }
    };
    let agreed = std::time::Instant::now();
    let negotiated = started.elapsed();
    let agreement_id = match client
        .market(peer, MarketRequest::Agree { proposal_id })
        .await
        .context("agree")
        .map_err(unreachable)?
    {
        MarketResponse::Agreement {
            agreement_id,
            expires_at,
        } => {
            out.event(
                "agreement",
                format!("agreement {agreement_id} until {}", expires_at.to_rfc3339()),
                json!({"agreement_id": agreement_id, "expires_at": expires_at}),
            );
            agreement_id
        }
        MarketResponse::Error { reason } => {
            eprintln!("rejected: {}: {}", reason.code, reason.message);
            return Err(Stop::Rejected);
        }
        other => {
            return Err(unreachable(anyhow::anyhow!(
                "unexpected answer to agree: {other:?}"
            )))
        }
    };
    let activity = |req| {
        let client = client.clone();
        async move {
            match client.activity(peer, req).await {
                Ok(ActivityResponse::Error { reason }) => {
                    eprintln!(
                        "error from the provider: {}: {}",
                        reason.code, reason.message
                    );
                    Err(Stop::Rejected)
                }
                Ok(r) => Ok(r),
                Err(e) => Err(unreachable(e)),
            }
        }
    };
    let mut first_output = None;
    let activity_id = match activity(ActivityRequest::Create { agreement_id }).await? {
        ActivityResponse::Created { activity_id } => activity_id,
        other => {
            return Err(unreachable(anyhow::anyhow!(
                "unexpected answer to create: {other:?}"
            )))
        }
    };
    let vm_ready = agreed.elapsed();
    out.event(
        "activity",
        format!("job {activity_id} started: the payload's VM is up"),
        json!({"activity_id": activity_id}),
    );
    let mut all_ok = true;
    let count = batches.len();
    for (n, batch) in batches.into_iter().enumerate() {
        if count > 1 {
            out.event(
                "batch",
                format!("batch {} of {count}: {}", n + 1, args.script[n].display()),
                json!({"batch": n, "script": args.script[n]}),
            );
        }
        let batch_id = match activity(ActivityRequest::Exec {
            activity_id: activity_id.clone(),
            batch,
        })
        .await?
        {
            ActivityResponse::BatchStarted { batch_id } => batch_id,
            other => {
                return Err(unreachable(anyhow::anyhow!(
                    "unexpected answer to exec: {other:?}"
                )))
            }
        };
        let mut from = 0;
        loop {
            let r = activity(ActivityRequest::GetResults {
                activity_id: activity_id.clone(),
                batch_id: batch_id.clone(),
                from,
                wait_ms: 30_000,
            })
            .await?;
            let ActivityResponse::Results { results, done } = r else {
                return Err(unreachable(anyhow::anyhow!(
                    "unexpected answer to get-results: {r:?}"
                )));
            };
            for result in &results {
                all_ok &= result.outcome == CmdOutcome::Ok;
                if first_output.is_none() && result.command.starts_with("run ") {
                    first_output = Some(agreed.elapsed());
                }
                out.result(result);
            }
            from += results.len();
            if done {
                break;
            }
        }
    }
    let receipt = match activity(ActivityRequest::Terminate {
        activity_id: activity_id.clone(),
    })
    .await?
    {
        ActivityResponse::Terminated { receipt } => receipt,
        other => {
            return Err(unreachable(anyhow::anyhow!(
                "unexpected answer to terminate: {other:?}"
            )))
        }
    };
    let signed = *receipt;
    let valid = signed.verify();
    let valid = match valid {
        Ok(()) if signed.receipt.provider_id == peer.to_string() => Ok(()),
        Ok(()) => Err(format!(
            "signed by {} but the provider is {peer}",
            signed.receipt.provider_id
        )),
        Err(e) => Err(e.to_string()),
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("create {}", args.out_dir.display()))
        .map_err(unreachable)?;
    let path = args.out_dir.join(format!("receipt-{activity_id}.json"));
    // Through a JSON value, whose keys are sorted: the file is laid out as it always was.
    let value = serde_json::to_value(&signed).expect("JSON serializes");
    let bytes = serde_json::to_vec_pretty(&value).expect("JSON serializes");
    crate::store::atomic_write(&path, &bytes)
        .context("save the receipt")
        .map_err(unreachable)?;
    out.event(
        "receipt",
        match &valid {
            Ok(()) => format!("receipt saved to {} (signature verified)", path.display()),
            Err(e) => format!("receipt saved to {} but INVALID: {e}", path.display()),
        },
        json!({"path": path, "valid": valid.is_ok(), "error": valid.as_ref().err()}),
    );
    if valid.is_err() {
        return Err(Stop::Unreachable(anyhow::anyhow!(
            "the receipt's signature does not verify"
        )));
    }
    if args.timings {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        eprintln!(
            "timings: connect+negotiate {}, agreement → VM ready {}, agreement → first command output {}, total {}",
            ms(negotiated),
            ms(vm_ready),
            first_output.map_or("-".into(), ms),
            ms(started.elapsed())
        );
    }
    Ok(if all_ok { 0 } else { 1 })
}
