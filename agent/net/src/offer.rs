//! Signed offers and the bounded cache that keeps them.
//!
//! A provider signs its offer (properties, constraints, the addresses it can be dialled
//! at, when it was issued and when it expires) with its libp2p identity key and publishes
//! it on gossipsub and as a Kademlia record. Any peer that receives one checks, before it
//! keeps or forwards it: the size, the format, that the public key hashes to the
//! `provider_id` the offer names, the Ed25519 signature over the canonical bytes, that it
//! has not expired and does not claim to live longer than [`MAX_OFFER_TTL`], and that it
//! is newer than what the cache already holds for that provider. The cache holds at most
//! one offer per provider and [`OfferLimits::max_offers`] in all, and forgets an offer
//! when it expires.
//!
//! See `docs/network.md` ("Offers") for the format.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The signed offer format's version.
pub const OFFER_VERSION: u32 = 1;
/// The gossipsub topic offers are published on.
pub const OFFER_TOPIC: &str = "/provider/offers/1";
/// Prepended to the offer's JSON text before signing, so an offer signature can never be
/// replayed as another kind of signed object (a receipt) made with the same key.
pub const SIGNING_CONTEXT: &[u8] = b"/provider/offer/1\n";
/// Largest encoded signed offer a peer accepts (gossip message or DHT record).
pub const MAX_OFFER_BYTES: usize = 16 * 1024;
/// An offer may not claim to be valid for longer than this after it was issued; a
/// provider re-publishes well before.
pub const MAX_OFFER_TTL: Duration = Duration::from_secs(3600);
/// How far in the future `issued_at` may be (clock skew between peers).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Addresses one offer may carry.
pub const MAX_OFFER_ADDRESSES: usize = 16;

/// What a provider offers, as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferBody {
    pub version: u32,
    /// The publisher's libp2p peer id; the signing key must hash to it.
    pub provider_id: String,
    pub properties: BTreeMap<String, Value>,
    /// LDAP-style filter over demands' properties; empty means none.
    pub constraints: String,
    /// Where the provider can be dialled (direct, or `/p2p-circuit` through a relay).
    pub addresses: Vec<String>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// An offer as it travels: the JSON text of an [`OfferBody`] exactly as it was signed, the
/// key that signed it and the signature. The signed bytes travel as they are, so no
/// verifier has to re-create a byte-exact encoding (offers carry floating-point
/// properties, which canonical JSON schemes disagree on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedOffer {
    /// The JSON text of the [`OfferBody`].
    pub offer: String,
    /// Base64 of the libp2p protobuf encoding of the publisher's public key.
    pub public_key: String,
    /// Base64 of the Ed25519 signature over [`SIGNING_CONTEXT`] followed by `offer`'s
    /// UTF-8 bytes.
    pub signature: String,
}

/// A signed offer that passed every check, with its body decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedOffer {
    pub publisher: PeerId,
    pub body: OfferBody,
    pub signed: SignedOffer,
}

/// Why a signed offer was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OfferError {
    #[error("the offer is {size} bytes, more than the {MAX_OFFER_BYTES} a peer accepts")]
    TooLarge { size: usize },
    #[error("the offer is not a signed offer document: {0}")]
    Malformed(String),
    #[error("offer version {0} is not supported (this peer reads version {OFFER_VERSION})")]
    Version(u32),
    #[error("the offer carries {0} addresses, more than {MAX_OFFER_ADDRESSES}")]
    TooManyAddresses(usize),
    #[error("the offer's public key does not decode: {0}")]
    BadKey(String),
    #[error("the offer's key belongs to {key_peer}, not to the provider it names ({claimed})")]
    WrongKey { claimed: String, key_peer: String },
    #[error("the offer was published by {source_peer}, not by the provider it names ({claimed})")]
    WrongPublisher {
        claimed: String,
        source_peer: String,
    },
    #[error("the offer's signature does not verify")]
    BadSignature,
    #[error("the offer expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("the offer claims a lifetime over {} s", MAX_OFFER_TTL.as_secs())]
    TtlTooLong,
    #[error("the offer was issued in the future ({0})")]
    FromTheFuture(DateTime<Utc>),
    #[error("cannot encode the offer: {0}")]
    Encode(String),
}

fn signed_bytes(text: &str) -> Vec<u8> {
    let mut bytes = SIGNING_CONTEXT.to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes
}

impl SignedOffer {
    /// Signs `offer` with `key` (which must be the key of `offer.provider_id`).
    pub fn sign(offer: &OfferBody, key: &Keypair) -> Result<Self, OfferError> {
        let text = serde_json::to_string(offer).map_err(|e| OfferError::Encode(e.to_string()))?;
        let signature = key
            .sign(&signed_bytes(&text))
            .map_err(|e| OfferError::Encode(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Self {
            offer: text,
            public_key: b64.encode(key.public().encode_protobuf()),
            signature: b64.encode(signature),
        })
    }

    /// The bytes put on the wire (gossip message, DHT record value).
    pub fn to_bytes(&self) -> Result<Vec<u8>, OfferError> {
        let bytes = serde_json::to_vec(self).map_err(|e| OfferError::Encode(e.to_string()))?;
        if bytes.len() > MAX_OFFER_BYTES {
            return Err(OfferError::TooLarge { size: bytes.len() });
        }
        Ok(bytes)
    }

    /// Decodes and fully checks an offer received from the network at `now`.
    pub fn from_wire(bytes: &[u8], now: DateTime<Utc>) -> Result<VerifiedOffer, OfferError> {
        if bytes.len() > MAX_OFFER_BYTES {
            return Err(OfferError::TooLarge { size: bytes.len() });
        }
        let offer: SignedOffer =
            serde_json::from_slice(bytes).map_err(|e| OfferError::Malformed(e.to_string()))?;
        offer.verify(now)
    }

    /// Checks the key, the signature, the body and its validity window.
    pub fn verify(self, now: DateTime<Utc>) -> Result<VerifiedOffer, OfferError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let key_bytes = b64
            .decode(&self.public_key)
            .map_err(|e| OfferError::BadKey(e.to_string()))?;
        let key = PublicKey::try_decode_protobuf(&key_bytes)
            .map_err(|e| OfferError::BadKey(e.to_string()))?;
        let signature = b64
            .decode(&self.signature)
            .map_err(|_| OfferError::BadSignature)?;
        // The signature first: nothing of an unsigned body is parsed beyond its envelope.
        if !key.verify(&signed_bytes(&self.offer), &signature) {
            return Err(OfferError::BadSignature);
        }
        let body: OfferBody = serde_json::from_str(&self.offer)
            .map_err(|e| OfferError::Malformed(format!("offer: {e}")))?;
        if body.version != OFFER_VERSION {
            return Err(OfferError::Version(body.version));
        }
        if body.addresses.len() > MAX_OFFER_ADDRESSES {
            return Err(OfferError::TooManyAddresses(body.addresses.len()));
        }
        let key_peer = key.to_peer_id();
        if key_peer.to_string() != body.provider_id {
            return Err(OfferError::WrongKey {
                claimed: body.provider_id.clone(),
                key_peer: key_peer.to_string(),
            });
        }
        if body.expires_at <= now {
            return Err(OfferError::Expired(body.expires_at));
        }
        let ttl = chrono::Duration::from_std(MAX_OFFER_TTL).expect("an hour fits");
        let skew = chrono::Duration::from_std(MAX_CLOCK_SKEW).expect("minutes fit");
        if body.expires_at - body.issued_at > ttl {
            return Err(OfferError::TtlTooLong);
        }
        if body.issued_at > now + skew {
            return Err(OfferError::FromTheFuture(body.issued_at));
        }
        Ok(VerifiedOffer {
            publisher: key_peer,
            body,
            signed: self,
        })
    }
}

impl VerifiedOffer {
    /// The addresses that parse as multiaddrs (an offer with a bad one is still valid:
    /// the others may work).
    pub fn multiaddrs(&self) -> Vec<Multiaddr> {
        self.body
            .addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// The cache's and the gossip filter's bounds.
#[derive(Debug, Clone)]
pub struct OfferLimits {
    /// Offers kept in all (one per provider); a new provider's offer is refused while the
    /// cache is full of unexpired ones.
    pub max_offers: usize,
    /// The shortest time between two accepted offers of one provider; faster ones are
    /// ignored (not forwarded) and count against the propagating peer.
    pub min_republish: Duration,
    /// Peers whose rate is tracked; the oldest entries are forgotten beyond it.
    pub max_tracked_peers: usize,
    /// The bound on gossip from each forwarding peer, applied before an offer is decoded.
    pub forwarders: crate::gossip_guard::GossipLimits,
}

impl Default for OfferLimits {
    fn default() -> Self {
        Self {
            max_offers: 10_000,
            min_republish: Duration::from_secs(1),
            max_tracked_peers: 20_000,
            forwarders: crate::gossip_guard::GossipLimits::default(),
        }
    }
}

/// What [`OfferCache::insert`] did with an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// New or newer: kept (and worth forwarding).
    Stored,
    /// Already held, or older than what is held (a replay): nothing changed.
    Stale,
    /// The provider published again sooner than [`OfferLimits::min_republish`].
    RateLimited,
    /// The cache is full of unexpired offers of other providers.
    Full,
}

/// Verified offers, at most one per provider, forgotten when they expire.
#[derive(Debug)]
pub struct OfferCache {
    limits: OfferLimits,
    offers: HashMap<PeerId, VerifiedOffer>,
    /// When each recently seen provider's last offer was accepted, oldest first.
    last_accepted: HashMap<PeerId, DateTime<Utc>>,
    order: VecDeque<PeerId>,
}

impl OfferCache {
    pub fn new(limits: OfferLimits) -> Self {
        Self {
            limits,
            offers: HashMap::new(),
            last_accepted: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Drops expired offers.
    pub fn purge(&mut self, now: DateTime<Utc>) {
        self.offers.retain(|_, o| o.body.expires_at > now);
    }

    /// Keeps `offer` if it is newer than what is held for its publisher and within the
    /// bounds.
    pub fn insert(&mut self, offer: VerifiedOffer, now: DateTime<Utc>) -> Admission {
        let peer = offer.publisher;
        if let Some(held) = self.offers.get(&peer) {
            if held.body.issued_at >= offer.body.issued_at {
                return Admission::Stale;
            }
        }
        if let Some(last) = self.last_accepted.get(&peer) {
            let min = chrono::Duration::from_std(self.limits.min_republish)
                .unwrap_or(chrono::Duration::MAX);
            if now - *last < min {
                return Admission::RateLimited;
            }
        }
        if !self.offers.contains_key(&peer) && self.offers.len() >= self.limits.max_offers {
            self.purge(now);
            if self.offers.len() >= self.limits.max_offers {
                return Admission::Full;
            }
        }
        self.offers.insert(peer, offer);
        self.track(peer, now);
        Admission::Stored
    }

    fn track(&mut self, peer: PeerId, now: DateTime<Utc>) {
        if self.last_accepted.insert(peer, now).is_none() {
            self.order.push_back(peer);
        }
        while self.order.len() > self.limits.max_tracked_peers {
            if let Some(old) = self.order.pop_front() {
                self.last_accepted.remove(&old);
            }
        }
    }

    /// Unexpired offers at `now`, by provider id.
    pub fn snapshot(&self, now: DateTime<Utc>) -> Vec<VerifiedOffer> {
        let mut v: Vec<_> = self
            .offers
            .values()
            .filter(|o| o.body.expires_at > now)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.body.provider_id.cmp(&b.body.provider_id));
        v
    }

    /// The unexpired offer of `peer`, if held.
    pub fn get(&self, peer: &PeerId) -> Option<&VerifiedOffer> {
        self.offers
            .get(peer)
            .filter(|o| o.body.expires_at > Utc::now())
    }

    /// Whether an unexpired offer of `peer` is held.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.offers
            .get(peer)
            .is_some_and(|o| o.body.expires_at > Utc::now())
    }

    pub fn len(&self) -> usize {
        self.offers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(key: &Keypair, issued: DateTime<Utc>, ttl_s: i64) -> OfferBody {
        OfferBody {
            version: OFFER_VERSION,
            provider_id: key.public().to_peer_id().to_string(),
            properties: [("golem.runtime.name".to_string(), json!("vm"))].into(),
            constraints: String::new(),
            addresses: vec!["/ip4/198.51.100.1/tcp/7465".into()],
            issued_at: issued,
            expires_at: issued + chrono::Duration::seconds(ttl_s),
        }
    }

    fn signed(key: &Keypair, issued: DateTime<Utc>, ttl_s: i64) -> VerifiedOffer {
        let o = SignedOffer::sign(&body(key, issued, ttl_s), key).unwrap();
        o.verify(issued).unwrap()
    }

    #[test]
    fn a_signed_offer_verifies_and_every_forgery_is_refused() {
        let key = Keypair::generate_ed25519();
        let now = Utc::now();
        let mut b = body(&key, now, 600);
        b.properties.insert("golem.inf.mem.gib".into(), json!(0.5));
        let signed = SignedOffer::sign(&b, &key).unwrap();
        let bytes = signed.to_bytes().unwrap();
        let back = SignedOffer::from_wire(&bytes, now).unwrap();
        assert_eq!(back.publisher, key.public().to_peer_id());
        assert_eq!(back.body, b);
        assert_eq!(back.signed, signed);

        // A changed property breaks the signature.
        let mut changed = signed.clone();
        changed.offer = changed.offer.replace("0.5", "512");
        assert_eq!(changed.verify(now), Err(OfferError::BadSignature));

        // Another key signing an offer that names the first provider.
        let other = Keypair::generate_ed25519();
        let forged = SignedOffer::sign(&b, &other).unwrap();
        assert!(matches!(
            forged.verify(now),
            Err(OfferError::WrongKey { .. })
        ));

        // Expired, too long-lived, from the future.
        assert!(matches!(
            signed.clone().verify(now + chrono::Duration::seconds(601)),
            Err(OfferError::Expired(_))
        ));
        let long = SignedOffer::sign(&body(&key, now, 7200), &key).unwrap();
        assert_eq!(long.verify(now), Err(OfferError::TtlTooLong));
        let future =
            SignedOffer::sign(&body(&key, now + chrono::Duration::seconds(3000), 60), &key)
                .unwrap();
        assert!(matches!(
            future.verify(now),
            Err(OfferError::FromTheFuture(_))
        ));

        // Oversized and malformed input; an unknown field inside the signed body.
        assert!(matches!(
            SignedOffer::from_wire(&vec![b' '; MAX_OFFER_BYTES + 1], now),
            Err(OfferError::TooLarge { .. })
        ));
        assert!(matches!(
            SignedOffer::from_wire(b"{\"offer\":1}", now),
            Err(OfferError::Malformed(_))
        ));
        let mut extra: Value = serde_json::to_value(&b).unwrap();
        extra["price"] = json!(0);
        let text = extra.to_string();
        let sig = key.sign(&signed_bytes(&text)).unwrap();
        let odd = SignedOffer {
            offer: text,
            public_key: signed.public_key.clone(),
            signature: base64::engine::general_purpose::STANDARD.encode(sig),
        };
        assert!(matches!(odd.verify(now), Err(OfferError::Malformed(m)) if m.contains("price")));
    }

    #[test]
    fn the_cache_keeps_the_newest_offer_per_provider_within_its_bounds() {
        let now = Utc::now();
        let limits = OfferLimits {
            max_offers: 2,
            min_republish: Duration::from_secs(1),
            max_tracked_peers: 2,
            ..OfferLimits::default()
        };
        let mut cache = OfferCache::new(limits);
        let a = Keypair::generate_ed25519();
        let first = signed(&a, now, 60);
        assert_eq!(cache.insert(first.clone(), now), Admission::Stored);
        // The same again, or an older one (a replay): nothing changes.
        assert_eq!(cache.insert(first.clone(), now), Admission::Stale);
        let older = signed(&a, now - chrono::Duration::seconds(5), 60);
        assert_eq!(cache.insert(older, now), Admission::Stale);
        // Newer but too soon.
        let t1 = now + chrono::Duration::milliseconds(100);
        assert_eq!(cache.insert(signed(&a, t1, 60), t1), Admission::RateLimited);
        let t2 = now + chrono::Duration::seconds(2);
        let later = signed(&a, t2, 60);
        assert_eq!(cache.insert(later.clone(), t2), Admission::Stored);
        assert_eq!(cache.snapshot(t2), vec![later]);

        // Full: a third provider is refused until an offer expires.
        let b = Keypair::generate_ed25519();
        let c = Keypair::generate_ed25519();
        assert_eq!(cache.insert(signed(&b, now, 10), t2), Admission::Stored);
        let oc = signed(&c, t2, 60);
        assert_eq!(cache.insert(oc.clone(), t2), Admission::Full);
        let t3 = now + chrono::Duration::seconds(11);
        assert_eq!(cache.insert(oc, t3), Admission::Stored);
        assert_eq!(cache.len(), 2);
        assert!(cache.last_accepted.len() <= 2 && cache.order.len() <= 2);
        // Expiry.
        assert!(cache
            .snapshot(now + chrono::Duration::seconds(3600))
            .is_empty());
    }
}
