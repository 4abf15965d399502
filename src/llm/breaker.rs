//! A circuit breaker per provider: after `threshold` consecutive failures it opens and refuses
//! at once for `cooldown`; then it lets one probe through (half-open), and that probe's outcome
//! closes or re-opens it. State is per process behind this type, so a shared backend can
//! replace it when several boxes share providers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the breaker is doing, for `/ready` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe was let through at `since`; another is allowed if it never reports back.
    HalfOpen {
        since: Instant,
    },
}

/// Opens after consecutive failures, half-opens after a cool-down.
#[derive(Debug)]
pub struct Breaker {
    /// The provider it guards, for the log.
    name: &'static str,
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    /// A closed breaker; `threshold` of 0 is taken as 1.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            name: "",
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
        }
    }

    /// The breaker, naming `provider` in what it logs.
    pub fn named(self, provider: &'static str) -> Breaker {
        Breaker { name: provider, ..self }
    }

    /// Whether a request may go out now.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// Records a request that got an answer.
    pub fn success(&self) {
        let was = std::mem::replace(&mut *self.lock(), Inner::Closed { failures: 0 });
        if !matches!(was, Inner::Closed { .. }) {
            tracing::info!(
                provider = self.name,
                "circuit breaker closed: the provider answers again"
            );
        }
    }

    /// Records a request that failed in a way that says the provider is unwell.
    pub fn failure(&self) {
        self.failure_at(Instant::now())
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn allow_at(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now < until => false,
            Inner::HalfOpen { since } if now < since + self.cooldown => false,
            Inner::Open { .. } | Inner::HalfOpen { .. } => {
                *inner = Inner::HalfOpen { since: now };
                true
            }
        }
    }

    fn failure_at(&self, now: Instant) {
        let mut inner = self.lock();
        let (name, cooldown_ms) = (self.name, self.cooldown.as_millis() as u64);
        *inner =
            match *inner {
                Inner::Closed { failures } if failures + 1 < self.threshold => {
                    Inner::Closed { failures: failures + 1 }
                }
                Inner::Closed { .. } => {
                    tracing::warn!(provider = name, failures = self.threshold, cooldown_ms,
                    "circuit breaker opened: requests skip the provider until the cool-down ends");
                    Inner::Open { until: now + self.cooldown }
                }
                Inner::HalfOpen { .. } => {
                    tracing::warn!(
                        provider = name,
                        cooldown_ms,
                        "circuit breaker probe failed: open again"
                    );
                    Inner::Open { until: now + self.cooldown }
                }
                Inner::Open { .. } => Inner::Open { until: now + self.cooldown },
            };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once_after_cooldown() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            b.failure_at(t0);
            assert!(b.allow_at(t0));
        }
        b.failure_at(t0);
        assert!(!b.allow_at(t0), "open");
        assert!(!b.allow_at(t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(10);
        assert!(b.allow_at(later), "one probe");
        assert!(!b.allow_at(later), "only one");
        b.failure_at(later);
        assert!(!b.allow_at(later + Duration::from_secs(1)), "re-opened");
        assert!(b.allow_at(later + Duration::from_secs(10)));
        b.success();
        assert!(b.allow_at(later + Duration::from_secs(10)) && b.state() == BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(10));
        b.failure();
        b.success();
        b.failure();
        assert!(b.allow(), "failures must be consecutive");
    }
}
