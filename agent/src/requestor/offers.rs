//! `requestor offers`: find providers and their offers, on the LAN (mDNS) and across
//! networks (bootstrap peers, the DHT and the offer gossip), keep those matching the
//! requestor's constraints, and rank them.
//!
//! Ranking (`docs/requestor.md`): offers with a linear price
//! (`golem.com.pricing.model.linear.coeffs`, an array of numbers) come first, cheapest
//! first by the sum of their coefficients (the price of one unit of every usage counter
//! plus the fixed part); every other offer follows; ties and unpriced offers are ordered
//! by provider id, so the listing is stable from run to run.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};

use crate::cli::output::{self, Table};
use crate::market::constraints::{Filter, Properties};
use net::wire::{MarketRequest, MarketResponse};
use net::NetConfig;

/// The Golem property holding a linear pricing model's coefficients.
pub const PRICE_PROPERTY: &str = "golem.com.pricing.model.linear.coeffs";

/// One provider as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    pub provider_id: String,
    pub addresses: Vec<String>,
    pub properties: Properties,
    pub constraints: String,
    /// `signed` (verified offer from the network) or `mdns` (asked on the LAN).
    pub source: &'static str,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Listed {
    /// The rank price: the sum of the linear coefficients, if the offer has them.
    pub fn price(&self) -> Option<f64> {
        let coeffs = self.properties.get(PRICE_PROPERTY)?.as_array()?;
        coeffs
            .iter()
            .map(Value::as_f64)
            .sum::<Option<f64>>()
            .filter(|p| p.is_finite())
    }
}

/// Priced offers first, cheapest first; then the rest; ties by provider id.
pub fn rank(list: &mut [Listed]) {
    list.sort_by(|a, b| {
        let by_price = match (a.price(), b.price()) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_price.then_with(|| a.provider_id.cmp(&b.provider_id))
    });
}

/// What `requestor offers` was asked.
pub struct OffersArgs {
    pub wait: Duration,
    pub bootstrap: Vec<Multiaddr>,
    pub constraints: Option<Filter>,
    pub runtime: String,
    pub mdns: bool,
    /// Stop listening as soon as this many matching offers are known.
    pub expect: Option<usize>,
}

fn matching(
    offers: Vec<net::offer::VerifiedOffer>,
    filter: &Option<Filter>,
) -> BTreeMap<String, Listed> {
    offers
        .into_iter()
        .filter(|o| {
            filter
                .as_ref()
                .is_none_or(|f| f.matches(&o.body.properties))
        })
        .map(|o| {
            let b = o.body;
            (
                b.provider_id.clone(),
                Listed {
                    provider_id: b.provider_id,
                    addresses: b.addresses,
                    properties: b.properties,
                    constraints: b.constraints,
                    source: "signed",
                    expires_at: Some(b.expires_at),
                },
            )
        })
        .collect()
}

/// Runs the listing; exit code 0 (also when nothing was found: an empty list is an
/// answer), errors are the caller's exit 2/3.
pub async fn offers(args: OffersArgs, json: bool) -> anyhow::Result<u8> {
    let started = Instant::now();
    let (client, _inbound, event_loop) = net::new(
        Keypair::generate_ed25519(),
        NetConfig {
            mdns: args.mdns,
            ..NetConfig::default()
        },
    )?;
    tokio::spawn(event_loop.run());
    client
        .listen("/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr"))
        .await?;
    let mut reached = 0;
    for addr in &args.bootstrap {
        match client.bootstrap(addr.clone()).await {
            Ok(_) => reached += 1,
            Err(e) => tracing::warn!("bootstrap peer {addr} not reached: {e}"),
        }
    }
    if !args.bootstrap.is_empty() && reached == 0 {
        anyhow::bail!(
            "none of the {} bootstrap peers could be reached",
            args.bootstrap.len()
        );
    }
    let deadline = started + args.wait;
    let mut last_lookup: Option<Instant> = None;
    let mut found = BTreeMap::new();
    while Instant::now() < deadline {
        if !args.bootstrap.is_empty()
            && last_lookup.is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            // Repeated: the DHT answers with the providers known at the time, and the
            // routing table fills as the bootstrap completes.
            client.find_providers(&args.runtime).await?;
            last_lookup = Some(Instant::now());
        }
        found = matching(client.offers().await?, &args.constraints);
        if args.expect.is_some_and(|n| found.len() >= n) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if args.mdns {
        for (peer, addrs) in client.discovered().await? {
            if found.contains_key(&peer.to_string()) {
                continue;
            }
            if let Some(listed) = ask_lan_peer(&client, peer, &addrs).await {
                if args
                    .constraints
                    .as_ref()
                    .is_none_or(|f| f.matches(&listed.properties))
                {
                    found.insert(listed.provider_id.clone(), listed);
                }
            }
        }
    }
    let mut list: Vec<Listed> = found.into_values().collect();
    rank(&mut list);
    tracing::info!(
        found = list.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "offers listed"
    );
    print(&list, json, args.wait)?;
    Ok(0)
}

/// An mDNS peer's offer, asked directly (unsigned: the connection itself authenticates
/// the peer id).
async fn ask_lan_peer(client: &net::Client, peer: PeerId, addrs: &[Multiaddr]) -> Option<Listed> {
    let addr = addrs.first()?.clone();
    let _ = client
        .dial(addr.clone().with_p2p(peer).unwrap_or(addr.clone()))
        .await;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        client.market(peer, MarketRequest::GetOffer),
    )
    .await;
    let (properties, constraints) = match answer {
        Ok(Ok(MarketResponse::Offer { offer })) => (offer.properties, offer.constraints),
        _ => return None,
    };
    Some(Listed {
        provider_id: peer.to_string(),
        addresses: addrs.iter().map(|a| a.to_string()).collect(),
        properties,
        constraints,
        source: "mdns",
        expires_at: None,
    })
}

fn print(list: &[Listed], json: bool, wait: Duration) -> anyhow::Result<()> {
    if json {
        let rows: Vec<Value> = list
            .iter()
            .map(|l| {
                json!({
                    "provider_id": l.provider_id,
                    "addresses": l.addresses,
                    "properties": l.properties,
                    "constraints": l.constraints,
                    "source": l.source,
                    "expires_at": l.expires_at,
                    "price": l.price(),
                })
            })
            .collect();
        output::json(&rows)?;
        return Ok(());
    }
    if list.is_empty() {
        println!("no matching providers found in {wait:?}");
        return Ok(());
    }
    let mut t = Table::new(&[
        "PROVIDER", "MEM GiB", "THREADS", "PRICE", "SOURCE", "ADDRESS",
    ]);
    for l in list {
        let get = |k: &str| l.properties.get(k).map_or("?".into(), |v| v.to_string());
        t.row(vec![
            l.provider_id.clone(),
            get("golem.inf.mem.gib"),
            get("golem.inf.cpu.threads"),
            l.price().map_or("-".into(), |p| format!("{p}")),
            l.source.to_string(),
            l.addresses.first().cloned().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.print();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(id: &str, price: Option<Value>) -> Listed {
        let mut properties = Properties::new();
        if let Some(p) = price {
            properties.insert(PRICE_PROPERTY.into(), p);
        }
        Listed {
            provider_id: id.into(),
            addresses: vec![],
            properties,
            constraints: String::new(),
            source: "signed",
            expires_at: None,
        }
    }

    #[test]
    fn priced_offers_rank_first_cheapest_first_and_the_rest_by_provider_id() {
        let mut list = vec![
            listed("d", None),
            listed("c", Some(json!([0.1, 0.2, 1.0]))),
            listed("a", None),
            listed("b", Some(json!([0.1, 0.1, 0.5]))),
            listed("e", Some(json!(["free"]))),
            listed("f", Some(json!([0.1, 0.1, 0.5]))),
        ];
        rank(&mut list);
        let ids: Vec<_> = list.iter().map(|l| l.provider_id.as_str()).collect();
        // "e" has a malformed price: it ranks as unpriced.
        assert_eq!(ids, ["b", "f", "c", "a", "d", "e"]);
    }
}
