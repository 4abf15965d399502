//! Keyed GCRA rate limiting (the generic cell rate algorithm), in process.
//!
//! Each key keeps one number: its theoretical arrival time (TAT). A request is allowed when
//! TAT − now ≤ (burst − 1) × interval, and then moves TAT one interval on. State is per process
//! behind this small type, so a shared backend can replace it when edgechat runs on several boxes.

use std::collections::HashMap;
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

/// Beyond this many keys a shard drops those whose bucket is full again (they hold no state).
const PRUNE_AT: usize = 4096;
const SHARDS: usize = 16;

/// A limiter over string keys (client addresses, usernames, user ids).
#[derive(Debug)]
pub struct Limiter {
    quota: Quota,
    interval: Duration,
    tolerance: Duration,
    epoch: Instant,
    hasher: std::hash::RandomState,
    shards: Vec<Mutex<HashMap<String, Duration>>>,
}

impl Limiter {
    /// A limiter enforcing `quota`; zero fields are raised to one.
    pub fn new(quota: Quota) -> Limiter {
        let requests = quota.requests.max(1);
        let burst = quota.burst.max(1);
        let interval = (quota.period / requests).max(Duration::from_nanos(1));
        Limiter {
            quota: Quota { requests, burst, ..quota },
            interval,
            tolerance: interval * (burst - 1),
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
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

    fn decide(&self, key: &str, take: bool, at: Instant) -> Decision {
        let now = at.saturating_duration_since(self.epoch);
        let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        let tat = shard.get(key).copied().unwrap_or(now).max(now);
        let allowed = tat - now <= self.tolerance;
        let new_tat = if allowed && take { tat + self.interval } else { tat };
        if allowed && take {
            if shard.len() >= PRUNE_AT {
                shard.retain(|_, t| *t > now);
            }
            shard.insert(key.to_string(), new_tat);
        }
        let backlog = new_tat.saturating_sub(now);
        let used = backlog.as_nanos().div_ceil(self.interval.as_nanos()) as u32;
        let retry_after =
            if allowed { Duration::ZERO } else { (tat - now).saturating_sub(self.tolerance) };
        Decision {
            allowed,
            limit: self.quota.burst,
            remaining: self.quota.burst.saturating_sub(used),
            reset: backlog,
            retry_after,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Duration>> {
        use std::hash::BuildHasher;
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }
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
    fn header_seconds_round_up() {
        assert_eq!(header_secs(Duration::ZERO), 0);
        assert_eq!(header_secs(Duration::from_millis(1)), 1);
        assert_eq!(header_secs(Duration::from_millis(1500)), 2);
    }
}
