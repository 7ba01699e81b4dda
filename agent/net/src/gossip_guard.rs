//! A bound on the offer gossip each *forwarding* peer can make this peer verify.
//!
//! The offer cache limits each *publisher* to one accepted offer a second, but it can only
//! tell publishers apart after it has checked an offer's signature. A peer that forwards a
//! flood of offers (its own, replays, other publishers', valid or forged) would make this
//! peer spend a signature check on every one. [`ForwarderGuard`] is consulted with the
//! gossip message's `propagation_source` *before* anything is decoded or verified: each
//! forwarding peer has a token bucket ([`GossipLimits::rate`] messages a second, bursts of
//! [`GossipLimits::burst`]). A message beyond it is dropped unverified, counts as an
//! *excess* against the peer (decaying with [`GossipLimits::excess_half_life`]), and the
//! peer's gossipsub application score is set to minus its excess, so a persistent
//! flooder sinks below gossipsub's thresholds (no gossip, then graylisted: its RPCs are
//! ignored). A peer whose excess reaches [`GossipLimits::ban_after`] is banned for
//! [`GossipLimits::ban_for`]: its connections are closed and refused, because gossipsub
//! still decodes (and checks the signature of) what a graylisted peer sends. For the same
//! reason a peer gossipsub itself scores below its graylist threshold is banned too, but
//! only when it has *offended* here (forwarded over the rate, or an offer we rejected):
//! gossipsub's score also falls for reasons that are not the peer's doing, above all
//! IP colocation (many peers behind one address: a NAT, a data centre, loopback in the
//! tests), and such peers must stay connected for the market protocols; gossipsub alone
//! ignoring their RPCs is enough there.
//!
//! Why not gossipsub's `Reject`: a rejected message id penalises every peer that delivers
//! it, and an over-rate message may well be a valid offer that honest peers forward too.
//! Over-rate messages are `Ignore`d and the flooder alone is scored down.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The per-forwarding-peer bounds (part of [`crate::offer::OfferLimits`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GossipLimits {
    /// Offers a second one peer may forward for checking, sustained.
    pub rate: f64,
    /// Offers one peer may forward at once beyond the sustained rate (the bucket's size).
    pub burst: u32,
    /// How fast a peer's excess is forgiven: it halves every this long.
    pub excess_half_life: Duration,
    /// Excess (over-rate messages, decayed) at which the peer is banned.
    pub ban_after: f64,
    /// How long a banned peer's connections are refused.
    pub ban_for: Duration,
    /// Forwarding peers tracked at once (idle ones are forgotten first).
    pub max_peers: usize,
}

impl Default for GossipLimits {
    fn default() -> Self {
        Self {
            // A network of 10,000 providers each re-publishing every 2 minutes is about 83
            // offers a second in all, which is what one honest forwarding peer may pass
            // on; a joining peer's first heartbeats bring a burst of the recent ones.
            rate: 100.0,
            burst: 500,
            excess_half_life: Duration::from_secs(30),
            ban_after: 64.0,
            ban_for: Duration::from_secs(10 * 60),
            max_peers: 4096,
        }
    }
}

/// What to do with one gossiped message, decided before it is decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gate {
    /// Within the peer's rate: decode and verify it.
    Check,
    /// Over the rate: drop it unverified and set the peer's application score to `score`.
    Drop { score: f64 },
    /// Over the rate for long enough: drop it, set the score, and ban the peer.
    Ban { score: f64 },
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    excess: f64,
    updated: Instant,
}

/// Token buckets of the peers that forward gossip, and the peers banned for flooding.
#[derive(Debug)]
pub struct ForwarderGuard {
    limits: GossipLimits,
    peers: HashMap<PeerId, Bucket>,
    banned: HashMap<PeerId, Instant>,
    /// Peers that offended (over the rate, or forwarded an offer that was rejected), with
    /// when the record lapses: only these are banned for being graylisted.
    offences: HashMap<PeerId, Instant>,
}

impl ForwarderGuard {
    pub fn new(limits: GossipLimits) -> Self {
        Self {
            limits,
            peers: HashMap::new(),
            banned: HashMap::new(),
            offences: HashMap::new(),
        }
    }

    /// Records that `peer` offended at `now` (an offer it forwarded was rejected); the
    /// record lasts as long as a ban. Bounded like the buckets: when full, the record
    /// closest to lapsing makes room.
    pub fn offended(&mut self, peer: PeerId, now: Instant) {
        let until = now + self.limits.ban_for;
        if !self.offences.contains_key(&peer) && self.offences.len() >= self.limits.max_peers {
            self.offences.retain(|_, u| *u > now);
            if self.offences.len() >= self.limits.max_peers {
                if let Some(oldest) = self
                    .offences
                    .iter()
                    .min_by_key(|(_, u)| **u)
                    .map(|(p, _)| *p)
                {
                    self.offences.remove(&oldest);
                }
            }
        }
        self.offences.insert(peer, until);
    }

    /// Whether `peer` has an offence on record (what makes a graylisted peer banned).
    pub fn has_offended(&self, peer: &PeerId) -> bool {
        self.offences.contains_key(peer)
    }

    fn refill(limits: &GossipLimits, b: &mut Bucket, now: Instant) {
        let dt = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + dt * limits.rate).min(f64::from(limits.burst));
        let half = limits.excess_half_life.as_secs_f64();
        if half > 0.0 {
            b.excess *= 0.5f64.powf(dt / half);
        } else {
            b.excess = 0.0;
        }
        b.updated = now;
    }

    /// Decides on one message `peer` forwarded at `now`.
    pub fn admit(&mut self, peer: PeerId, now: Instant) -> Gate {
        if self.banned.contains_key(&peer) {
            // Still arriving (the connection is being closed): drop, as flooded.
            return Gate::Drop {
                score: -self.limits.ban_after,
            };
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.limits.max_peers {
            self.forget_idle(now);
            if self.peers.len() >= self.limits.max_peers {
                // Every tracked peer is busy: a new one waits rather than grow the table
                // (fails closed; its messages come again with the next re-publication).
                return Gate::Drop { score: 0.0 };
            }
        }
        let limits = &self.limits;
        let bucket = self.peers.entry(peer).or_insert_with(|| Bucket {
            tokens: f64::from(limits.burst),
            excess: 0.0,
            updated: now,
        });
        Self::refill(limits, bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Gate::Check;
        }
        bucket.excess += 1.0;
        let score = -bucket.excess;
        let ban = bucket.excess >= limits.ban_after;
        self.offended(peer, now);
        if ban {
            self.peers.remove(&peer);
            self.banned.insert(peer, now + self.limits.ban_for);
            Gate::Ban { score }
        } else {
            Gate::Drop { score }
        }
    }

    /// Periodic upkeep at `now`: the application scores of peers whose excess decayed
    /// (to set again in gossipsub), and the peers whose ban is over (to unblock). Idle
    /// peers with no excess are forgotten.
    pub fn tick(&mut self, now: Instant) -> (Vec<(PeerId, f64)>, Vec<PeerId>) {
        let mut scores = Vec::new();
        for (peer, b) in self.peers.iter_mut() {
            if b.excess > 0.0 {
                Self::refill(&self.limits, b, now);
                // Below a hundredth it is noise: back to a clean score.
                if b.excess < 0.01 {
                    b.excess = 0.0;
                }
                scores.push((*peer, -b.excess));
            }
        }
        self.forget_idle(now);
        let unbanned: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &unbanned {
            self.banned.remove(p);
        }
        self.offences.retain(|_, until| *until > now);
        (scores, unbanned)
    }

    fn forget_idle(&mut self, now: Instant) {
        let limits = &self.limits;
        self.peers.retain(|_, b| {
            let mut probe = b.clone();
            Self::refill(limits, &mut probe, now);
            probe.excess >= 0.01 || probe.tokens < f64::from(limits.burst)
        });
    }

    /// Bans `peer` from `now` (a peer gossipsub has graylisted: its messages no longer
    /// reach [`ForwarderGuard::admit`], but gossipsub still decodes and checks each).
    /// Returns whether it was not banned already.
    pub fn ban(&mut self, peer: PeerId, now: Instant) -> bool {
        self.peers.remove(&peer);
        self.banned
            .insert(peer, now + self.limits.ban_for)
            .is_none()
    }

    /// Whether `peer` is banned now.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains_key(peer)
    }

    /// The peers banned now.
    pub fn banned(&self) -> Vec<PeerId> {
        let mut v: Vec<_> = self.banned.keys().copied().collect();
        v.sort();
        v
    }

    /// Peers tracked (for the bound's test).
    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GossipLimits {
        GossipLimits {
            rate: 10.0,
            burst: 20,
            excess_half_life: Duration::from_secs(10),
            ban_after: 30.0,
            ban_for: Duration::from_secs(60),
            max_peers: 3,
        }
    }

    #[test]
    fn a_peer_within_its_rate_is_checked_and_a_flooder_is_scored_down_then_banned() {
        let mut g = ForwarderGuard::new(limits());
        let t0 = Instant::now();
        let flooder = PeerId::random();
        let honest = PeerId::random();
        // The burst passes, the next is dropped unverified with a negative score.
        for _ in 0..20 {
            assert_eq!(g.admit(flooder, t0), Gate::Check);
        }
        assert_eq!(g.admit(flooder, t0), Gate::Drop { score: -1.0 });
        assert_eq!(g.admit(flooder, t0), Gate::Drop { score: -2.0 });
        // Another peer's bucket is its own.
        assert_eq!(g.admit(honest, t0), Gate::Check);
        // 100 ms refills one token at 10/s.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(g.admit(flooder, t1), Gate::Check);
        // Sustained flooding reaches the ban; a banned peer's stragglers are dropped.
        let mut gate = Gate::Check;
        for _ in 0..40 {
            gate = g.admit(flooder, t1);
            if matches!(gate, Gate::Ban { .. }) {
                break;
            }
        }
        assert!(
            matches!(gate, Gate::Ban { score } if score <= -30.0),
            "{gate:?}"
        );
        assert!(g.is_banned(&flooder));
        assert_eq!(g.banned(), vec![flooder]);
        assert!(matches!(g.admit(flooder, t1), Gate::Drop { .. }));
        // The ban ends; the peer starts again with a full bucket and no excess.
        let (_, unbanned) = g.tick(t1 + Duration::from_secs(61));
        assert_eq!(unbanned, vec![flooder]);
        assert!(!g.is_banned(&flooder));
        assert_eq!(g.admit(flooder, t1 + Duration::from_secs(61)), Gate::Check);
    }

    #[test]
    fn a_peer_at_the_sustained_rate_is_never_dropped_and_excess_is_forgiven() {
        let mut g = ForwarderGuard::new(limits());
        let t0 = Instant::now();
        let p = PeerId::random();
        // 10 a second for 60 s, one every 100 ms, all checked.
        for i in 0..600u64 {
            assert_eq!(g.admit(p, t0 + Duration::from_millis(100 * i)), Gate::Check);
        }
        // Exhaust the bucket, drop 8: excess 8.
        let t1 = t0 + Duration::from_secs(100);
        for _ in 0..20 {
            assert_eq!(g.admit(p, t1), Gate::Check);
        }
        for _ in 0..8 {
            assert!(matches!(g.admit(p, t1), Gate::Drop { .. }));
        }
        // One half-life later the score reported is half, and it returns to 0.
        let (scores, _) = g.tick(t1 + Duration::from_secs(10));
        assert_eq!(scores.len(), 1);
        assert!((scores[0].1 + 4.0).abs() < 1e-9, "{scores:?}");
        let (scores, _) = g.tick(t1 + Duration::from_secs(200));
        assert_eq!(scores, vec![(p, 0.0)]);
        // Idle and forgiven: forgotten.
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn only_offenders_are_on_record_and_the_record_lapses_and_is_bounded() {
        let mut g = ForwarderGuard::new(limits());
        let t0 = Instant::now();
        let honest = PeerId::random();
        let flooder = PeerId::random();
        let forger = PeerId::random();
        for _ in 0..20 {
            assert_eq!(g.admit(honest, t0), Gate::Check);
            assert_eq!(g.admit(flooder, t0), Gate::Check);
        }
        // Within its rate a peer has no record, whatever else gossipsub thinks of it.
        assert!(!g.has_offended(&honest));
        assert!(matches!(g.admit(flooder, t0), Gate::Drop { .. }));
        assert!(g.has_offended(&flooder));
        g.offended(forger, t0);
        assert!(g.has_offended(&forger));
        // Records last as long as a ban.
        g.tick(t0 + Duration::from_secs(59));
        assert!(g.has_offended(&forger));
        g.tick(t0 + Duration::from_secs(61));
        assert!(!g.has_offended(&forger) && !g.has_offended(&flooder));
        // At most `max_peers` records: the oldest makes room.
        let many: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        for (i, p) in many.iter().enumerate() {
            g.offended(*p, t0 + Duration::from_secs(100 + i as u64));
        }
        assert!(!g.has_offended(&many[0]));
        assert!(many[1..].iter().all(|p| g.has_offended(p)));
    }

    #[test]
    fn the_table_of_peers_is_bounded_and_idle_peers_make_room() {
        let mut g = ForwarderGuard::new(limits());
        let t0 = Instant::now();
        let busy: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for p in &busy {
            assert_eq!(g.admit(*p, t0), Gate::Check);
        }
        // Full of peers whose buckets are not yet refilled: a fourth waits.
        let late = PeerId::random();
        assert_eq!(g.admit(late, t0), Gate::Drop { score: 0.0 });
        assert_eq!(g.tracked(), 3);
        // Once they are idle (buckets full again), it is let in.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(g.admit(late, t1), Gate::Check);
        assert!(g.tracked() <= 3);
    }
}
