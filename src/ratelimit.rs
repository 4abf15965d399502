//! Keyed GCRA rate limiting (the generic cell rate algorithm), in process.
//!
//! Each key keeps one number: its theoretical arrival time (TAT). A request is allowed when
//! TAT − now ≤ (burst − 1) × interval, and then moves TAT one interval on. `Limiter` keeps the
//! state in process; `Rule` is the arithmetic alone, for state kept in a shared store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The rule: `requests` per `period` on average, at most `burst` back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub requests: u32,
    pub period: Duration,
    pub burst: u32,
}

/// The answer for one request, with what the `RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst size (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests still allowed right now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Until the key is back to a full burst (`RateLimit-Reset`).
    pub reset: Duration,
    /// When refused: until the next request would be allowed (`Retry-After`).
    pub retry_after: Duration,
}

/// Beyond this many keys a shard drops those whose bucket is full again (they hold no state);
/// a shard still full after that refuses new keys rather than grow without bound.
const SHARD_KEYS: usize = 4096;
const SHARDS: usize = 16;
/// A full shard is swept at most this often, so an attacker cannot make every request O(n).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Shard {
    tats: HashMap<String, Duration>,
    pruned_at: Duration,
}

/// The GCRA arithmetic of one quota, also for counters kept elsewhere (PostgreSQL, shared by
/// replicas): a key's TAT moves `interval` on per request and may run `tolerance` ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub interval: Duration,
    pub tolerance: Duration,
    pub burst: u32,
}

impl Rule {
    /// The rule of `quota`; zero fields are raised to one.
    pub fn of(quota: Quota) -> Rule {
        let requests = quota.requests.max(1);
        let burst = quota.burst.max(1);
        let interval = (quota.period / requests).max(Duration::from_nanos(1));
        Rule { interval, tolerance: interval.saturating_mul(burst - 1), burst }
    }

    /// Whether a request at `now` fits a key whose TAT is `tat` (already at least `now`).
    pub fn allows(&self, tat: Duration, now: Duration) -> bool {
        tat.saturating_sub(now) <= self.tolerance
    }

    /// The answer for a key whose TAT was `tat` and is now `new_tat`, at `now`.
    pub fn decision(
        &self,
        allowed: bool,
        tat: Duration,
        new_tat: Duration,
        now: Duration,
    ) -> Decision {
        let backlog = new_tat.saturating_sub(now);
        let used = backlog.as_nanos().div_ceil(self.interval.as_nanos()) as u32;
        let retry_after = match allowed {
            true => Duration::ZERO,
            false => tat
                .saturating_sub(now)
                .saturating_sub(self.tolerance)
                .max(self.interval.min(PRUNE_EVERY)),
        };
        Decision {
            allowed,
            limit: self.burst,
            remaining: self.burst.saturating_sub(used),
            reset: backlog,
            retry_after,
        }
    }
}

/// A limiter over string keys (client addresses, usernames, user ids).
#[derive(Debug)]
pub struct Limiter {
    rule: Rule,
    epoch: Instant,
    hasher: std::hash::RandomState,
    shards: Vec<Mutex<Shard>>,
}

impl Limiter {
    /// A limiter enforcing `quota`; zero fields are raised to one.
    pub fn new(quota: Quota) -> Limiter {
        Limiter {
            rule: Rule::of(quota),
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// Takes one request for `key` if allowed.
    pub fn check(&self, key: &str) -> Decision {
        self.decide(key, true, Instant::now())
    }

    /// Tells whether a request for `key` would be allowed, without taking it.
    pub fn peek(&self, key: &str) -> Decision {
        self.decide(key, false, Instant::now())
    }

    /// Takes `n` units for `key` whatever the limit (usage known only afterwards, such as the
    /// tokens of an answer); later requests wait until the debt is paid back.
    pub fn charge(&self, key: &str, n: u32) {
        let now = Instant::now().saturating_duration_since(self.epoch);
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let known = shard.tats.get(key).copied();
        if known.is_none() && !shard.make_room(now) {
            return;
        }
        let tat =
            known.unwrap_or(now).max(now).saturating_add(self.rule.interval.saturating_mul(n));
        shard.tats.insert(key.to_string(), tat);
    }

    /// Gives back `n` units `key` took (a reservation that turned out not to count); never
    /// more than it has used.
    pub fn refund(&self, key: &str, n: u32) {
        let now = Instant::now().saturating_duration_since(self.epoch);
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tat) = shard.tats.get_mut(key) {
            *tat = tat.saturating_sub(self.rule.interval.saturating_mul(n)).max(now);
        }
    }

    /// Drops what `key` has used, as if it had never been seen.
    pub fn forget(&self, key: &str) {
        self.shard(key).lock().unwrap_or_else(|p| p.into_inner()).tats.remove(key);
    }

    fn decide(&self, key: &str, take: bool, at: Instant) -> Decision {
        let now = at.saturating_duration_since(self.epoch);
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let known = shard.tats.get(key).copied();
        let tat = known.unwrap_or(now).max(now);
        let mut allowed = self.rule.allows(tat, now);
        if allowed && take && known.is_none() && !shard.make_room(now) {
            allowed = false;
        }
        let new_tat = if allowed && take { tat.saturating_add(self.rule.interval) } else { tat };
        if allowed && take {
            shard.tats.insert(key.to_string(), new_tat);
        }
        self.rule.decision(allowed, tat, new_tat, now)
    }

    /// The arithmetic this limiter applies.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        use std::hash::BuildHasher;
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }
}

impl Shard {
    /// Whether a new key fits, sweeping expired keys first when the shard is full.
    fn make_room(&mut self, now: Duration) -> bool {
        if self.tats.len() < SHARD_KEYS {
            return true;
        }
        if now.saturating_sub(self.pruned_at) >= PRUNE_EVERY || self.pruned_at.is_zero() {
            self.tats.retain(|_, t| *t > now);
            self.pruned_at = now;
        }
        self.tats.len() < SHARD_KEYS
    }
}

/// The block of addresses one client is counted by: an IPv4 address as is (also when
/// IPv4-mapped), an IPv6 address by its /64, the smallest block one subscriber is usually given,
/// so that walking through the addresses of one's own block does not reset a limit. Shared by
/// the rate limits and the transport's connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressGroup {
    V4(std::net::Ipv4Addr),
    V6Prefix([u16; 4]),
}

impl AddressGroup {
    /// The group `ip` belongs to.
    pub fn of(ip: IpAddr) -> AddressGroup {
        match ip {
            IpAddr::V4(v4) => AddressGroup::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressGroup::V4(v4),
                None => {
                    let s = v6.segments();
                    AddressGroup::V6Prefix([s[0], s[1], s[2], s[3]])
                }
            },
        }
    }
}

impl std::fmt::Display for AddressGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressGroup::V4(v4) => v4.fmt(f),
            AddressGroup::V6Prefix([a, b, c, d]) => write!(f, "{a:x}:{b:x}:{c:x}:{d:x}::/64"),
        }
    }
}

/// The limiter key of a client address: its [`AddressGroup`].
pub fn address_key(ip: IpAddr) -> String {
    AddressGroup::of(ip).to_string()
}

/// Whole seconds for a header, rounded up, at least 1 when anything is left.
pub fn header_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(u64::from(!d.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, secs: u64, burst: u32) -> Limiter {
        Limiter::new(Quota { requests, period: Duration::from_secs(secs), burst })
    }

    #[test]
    fn a_charge_beyond_the_budget_refuses_until_paid_back() {
        let l = limiter(100, 60, 100);
        assert!(l.peek("u").allowed);
        l.charge("u", 150);
        let d = l.peek("u");
        assert!(!d.allowed && d.remaining == 0, "{d:?}");
        assert!(d.retry_after >= Duration::from_secs(29), "{d:?}");
        assert!(l.peek("other").allowed);
    }

    #[test]
    fn burst_then_refusal_then_recovery() {
        let l = limiter(1, 10, 3);
        let t0 = Instant::now();
        let remaining: Vec<_> = (0..3).map(|_| l.decide("a", true, t0)).collect();
        assert!(remaining.iter().all(|d| d.allowed));
        assert_eq!(remaining.iter().map(|d| d.remaining).collect::<Vec<_>>(), [2, 1, 0]);
        let refused = l.decide("a", true, t0);
        assert!(!refused.allowed);
        assert!(
            refused.retry_after > Duration::from_secs(9)
                && refused.retry_after <= Duration::from_secs(10)
        );
        assert!(l.decide("b", true, t0).allowed, "keys are independent");
        assert!(l.decide("a", true, t0 + Duration::from_secs(10)).allowed);
    }

    #[test]
    fn peek_takes_nothing() {
        let l = limiter(1, 60, 1);
        let t0 = Instant::now();
        assert!(l.decide("k", false, t0).allowed);
        assert!(l.decide("k", false, t0).allowed);
        assert!(l.decide("k", true, t0).allowed);
        assert!(!l.decide("k", false, t0).allowed);
    }

    #[test]
    fn a_full_shard_prunes_expired_keys_and_refuses_new_ones_while_full() {
        let l = limiter(1, 1, 1);
        let t0 = Instant::now() + Duration::from_secs(1);
        let keys: Vec<String> = (0..SHARD_KEYS * SHARDS * 2).map(|i| format!("k{i}")).collect();
        let allowed = keys.iter().filter(|k| l.decide(k, true, t0).allowed).count();
        assert!(allowed <= SHARD_KEYS * SHARDS, "bounded: {allowed}");
        // Once the keys' buckets refill they are swept and new keys fit again.
        let later = t0 + Duration::from_secs(5);
        assert!(l.decide("fresh", true, later).allowed);
    }

    #[test]
    fn absurd_quotas_do_not_overflow() {
        let l = Limiter::new(Quota {
            requests: 1,
            period: Duration::from_secs(u64::MAX / 4),
            burst: u32::MAX,
        });
        let t0 = Instant::now();
        assert!(l.decide("a", true, t0).allowed);
    }

    #[test]
    fn forget_gives_a_key_its_burst_back() {
        let l = limiter(1, 60, 1);
        assert!(l.check("k").allowed);
        assert!(!l.peek("k").allowed);
        l.forget("k");
        assert!(l.peek("k").allowed);
    }

    #[test]
    fn addresses_key_by_ipv4_or_ipv6_slash_64() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("127.0.0.2"), "127.0.0.2");
        assert_eq!(key("::ffff:10.1.2.3"), "10.1.2.3");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:1:2:3"), key("2001:db8:1:2::9"));
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    #[test]
    fn header_seconds_round_up() {
        assert_eq!(header_secs(Duration::ZERO), 0);
        assert_eq!(header_secs(Duration::from_millis(1)), 1);
        assert_eq!(header_secs(Duration::from_millis(1500)), 2);
    }
}
