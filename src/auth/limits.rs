//! Failed-login limits that throttle a guesser without locking anyone else out.
//!
//! Failures are counted per (address, username) and per address, and both are checked before
//! any password work: an address over either limit is refused (`429`) whatever it sends, so a
//! refusal tells nothing about the password or whether the account exists (failures for
//! unknown names count the same). Failures per username, from every address together, may only
//! slow that username's logins down — a limit that refused there would let anyone keep the real
//! user out with one wrong password now and then.

use crate::clock::{now_ms, Millis};
use crate::config::{QuotaConfig, RateLimitConfig};
use crate::ratelimit::{Decision, Limiter, Quota};
use crate::store::{CounterStep, Store};
use std::time::Duration;

/// What a login attempt may do before its password is checked.
#[derive(Debug)]
pub enum Gate<'a> {
    /// Go ahead.
    Open(Attempt<'a>),
    /// Go ahead after waiting this long: the username has too many failures from anywhere.
    Slowed(Attempt<'a>, Duration),
    /// This address (for this username, or for all) has failed too often; answer `429`.
    Refused(Decision),
}

/// A login attempt let through the gate. It holds a failure in advance against its address
/// and (address, username), so that guesses sent at once cannot all pass before the first
/// one fails: settle it with `failed` or `succeeded`; dropped unsettled (an error that says
/// nothing of the password, a client that left), it gives the reservation back.
#[derive(Debug)]
pub struct Attempt<'a> {
    limits: &'a LoginLimits,
    address: String,
    username: Option<String>,
    settled: bool,
}

/// The three failed-login counters and the slowdown.
#[derive(Debug)]
pub struct LoginLimits {
    per_address_and_username: Counter,
    per_address: Counter,
    per_username: Counter,
    slowdown: Duration,
}

/// One failed-login counter: in this process, or (`share`) in the store every replica uses,
/// so that spreading guesses over N replicas does not buy N times the guesses. Should the
/// shared store fail, the process's own counter answers (and the failure is logged).
#[derive(Debug)]
struct Counter {
    name: &'static str,
    local: Limiter,
    shared: Option<Store>,
}

fn counter(name: &'static str, q: QuotaConfig) -> Counter {
    let period = Duration::from_secs(q.per_secs);
    let local = Limiter::new(Quota { requests: q.requests, period, burst: q.burst });
    Counter { name, local, shared: None }
}

/// Whole milliseconds, at least one (the shared counters' unit).
fn ms(d: Duration) -> Millis {
    (d.as_millis() as Millis).max(1)
}

fn since_epoch(t: Millis) -> Duration {
    Duration::from_millis(t.max(0) as u64)
}

impl Counter {
    /// Runs `step` on the shared counter; `None` when there is none or it failed.
    async fn shared(&self, key: &str, step: CounterStep) -> Option<(bool, Option<Millis>)> {
        let store = self.shared.as_ref()?;
        let key = format!("login/{}/{key}", self.name);
        match store.counter(&key, step).await {
            Ok(outcome) => Some(outcome),
            Err(e) => {
                tracing::warn!(error = %e, counter = self.name, "shared login limit unavailable; counting in this process");
                None
            }
        }
    }

    async fn check(&self, key: &str) -> Decision {
        let rule = self.local.rule();
        let now = now_ms();
        let step =
            CounterStep::Take { now, interval: ms(rule.interval), tolerance: ms(rule.tolerance) };
        match self.shared(key, step).await {
            Some((allowed, tat)) => {
                let (now, after) = (since_epoch(now), since_epoch(tat.unwrap_or(now)));
                let before =
                    if allowed { after.saturating_sub(rule.interval).max(now) } else { after };
                rule.decision(allowed, before.max(now), after.max(now), now)
            }
            None => self.local.check(key),
        }
    }

    async fn peek(&self, key: &str) -> Decision {
        let rule = self.local.rule();
        match self.shared(key, CounterStep::Peek).await {
            Some((_, tat)) => {
                let now = since_epoch(now_ms());
                let tat = tat.map_or(now, since_epoch).max(now);
                rule.decision(rule.allows(tat, now), tat, tat, now)
            }
            None => self.local.peek(key),
        }
    }

    async fn charge(&self, key: &str) {
        let step = CounterStep::Charge { now: now_ms(), amount: ms(self.local.rule().interval) };
        if self.shared(key, step).await.is_none() {
            self.local.charge(key, 1);
        }
    }

    /// Gives one unit back: at once in process, from a task for the shared store (a dropped
    /// attempt cannot wait for it).
    fn refund(&self, key: &str) {
        let Some(store) = self.shared.clone() else { return self.local.refund(key, 1) };
        let key = format!("login/{}/{key}", self.name);
        let amount = ms(self.local.rule().interval);
        tokio::spawn(async move {
            let step = CounterStep::Refund { now: now_ms(), amount };
            if let Err(e) = store.counter(&key, step).await {
                tracing::warn!(error = %e, "could not give back a reserved login attempt");
            }
        });
    }

    async fn forget(&self, key: &str) {
        if self.shared(key, CounterStep::Forget).await.is_none() {
            self.local.forget(key);
        }
    }
}

/// One key per (address, username); neither contains a space.
fn pair(address: &str, username: &str) -> String {
    format!("{address} {username}")
}

impl LoginLimits {
    /// The limits `[rate_limit]` configures.
    pub fn new(c: &RateLimitConfig) -> LoginLimits {
        LoginLimits {
            per_address_and_username: counter(
                "address_and_username",
                c.failed_logins_per_address_and_username,
            ),
            per_address: counter("address", c.failed_logins_per_address),
            per_username: counter("username", c.failed_logins_per_username),
            slowdown: Duration::from_millis(c.login_slowdown_ms),
        }
    }

    /// Keeps the counts in `store` when it is shared by several replicas (PostgreSQL).
    pub fn share(mut self, store: &Store) -> LoginLimits {
        if store.is_shared() {
            for c in
                [&mut self.per_address_and_username, &mut self.per_address, &mut self.per_username]
            {
                c.shared = Some(store.clone());
            }
        }
        self
    }

    /// Decides whether `address` may try `username` (`None`: a name no account can have, so
    /// only the address counts), reserving a failure on both address limits when it may.
    /// `username` is already lowercase.
    pub async fn gate(&self, address: &str, username: Option<&str>) -> Gate<'_> {
        let by_address = self.per_address.check(address).await;
        if !by_address.allowed {
            crate::metrics::rate_limited("failed_logins_per_address");
            return Gate::Refused(by_address);
        }
        if let Some(name) = username {
            let by_pair = self.per_address_and_username.check(&pair(address, name)).await;
            if !by_pair.allowed {
                crate::metrics::rate_limited("failed_logins_per_address_and_username");
                self.per_address.refund(address);
                return Gate::Refused(by_pair);
            }
        }
        let attempt = Attempt {
            limits: self,
            address: address.to_string(),
            username: username.map(str::to_string),
            settled: false,
        };
        let by_name = match username {
            Some(name) if !self.slowdown.is_zero() => Some(self.per_username.peek(name).await),
            _ => None,
        };
        match by_name {
            Some(d) if !d.allowed => Gate::Slowed(attempt, self.slowdown),
            _ => Gate::Open(attempt),
        }
    }
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown): the reserved failures stand, and the
    /// username's own count grows.
    pub async fn failed(mut self) {
        self.settled = true;
        if let Some(name) = &self.username {
            self.limits.per_username.charge(name).await;
        }
    }

    /// The password was right: the address gets its reservation back, and the pair's earlier
    /// failures (its own typos) are cleared — nothing else: the address and the username keep
    /// what others did.
    pub async fn succeeded(mut self) {
        self.settled = true;
        self.limits.per_address.refund(&self.address);
        if let Some(name) = &self.username {
            self.limits.per_address_and_username.forget(&pair(&self.address, name)).await;
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.limits.per_address.refund(&self.address);
        if let Some(name) = &self.username {
            self.limits.per_address_and_username.refund(&pair(&self.address, name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoginLimits {
        let q = |burst| QuotaConfig { requests: 1, per_secs: 3600, burst };
        LoginLimits::new(&RateLimitConfig {
            failed_logins_per_address_and_username: q(2),
            failed_logins_per_address: q(4),
            failed_logins_per_username: q(3),
            login_slowdown_ms: 50,
            ..RateLimitConfig::default()
        })
    }

    /// Tries `name` from `address` with a wrong password: whether the gate let it through.
    async fn fail(l: &LoginLimits, address: &str, name: Option<&str>) -> bool {
        match l.gate(address, name).await {
            Gate::Open(a) | Gate::Slowed(a, _) => {
                a.failed().await;
                true
            }
            Gate::Refused(_) => false,
        }
    }

    fn refused(g: Gate<'_>) -> bool {
        matches!(g, Gate::Refused(d) if d.retry_after > Duration::ZERO)
    }

    #[tokio::test]
    async fn an_address_is_refused_for_a_name_then_for_all_while_others_are_only_slowed() {
        let l = limits();
        assert!(fail(&l, "a", Some("kate")).await && fail(&l, "a", Some("kate")).await);
        assert!(refused(l.gate("a", Some("kate")).await), "the pair is spent");
        assert!(matches!(l.gate("a", Some("liam")).await, Gate::Open(_)), "other names from a");
        assert!(matches!(l.gate("b", Some("kate")).await, Gate::Open(_)), "kate from b is fine");
        assert!(fail(&l, "b", Some("kate")).await);
        // Three failures on kate in all: slowed, from any address, never refused.
        let slowed = l.gate("c", Some("kate")).await;
        assert!(matches!(slowed, Gate::Slowed(_, d) if d == Duration::from_millis(50)));
        assert!(fail(&l, "a", Some("liam")).await && fail(&l, "a", None).await);
        assert!(refused(l.gate("a", Some("zoe")).await));
        assert!(refused(l.gate("a", None).await), "four from a: all names");
    }

    #[tokio::test]
    async fn success_clears_only_its_own_pair() {
        let l = limits();
        assert!(fail(&l, "a", Some("kate")).await);
        let Gate::Open(a) = l.gate("a", Some("kate")).await else { panic!("one failure of two") };
        a.succeeded().await;
        // The pair starts again (two more are let through); the address kept its one.
        assert!(fail(&l, "a", Some("kate")).await && fail(&l, "a", Some("kate")).await);
        assert!(refused(l.gate("a", Some("kate")).await));
        assert!(matches!(l.gate("a", None).await, Gate::Open(_)), "3 of the address's 4 are used");
        assert!(fail(&l, "a", None).await);
        assert!(refused(l.gate("a", None).await), "the address kept its count");
    }

    #[tokio::test]
    async fn guesses_sent_at_once_cannot_all_pass_and_unsettled_ones_give_back() {
        let l = limits();
        // Twenty guesses in flight at once for one name: the pair's burst (2) lets two through.
        let mut gates: Vec<Gate<'_>> = Vec::new();
        for _ in 0..20 {
            gates.push(l.gate("a", Some("kate")).await);
        }
        let through = gates.iter().filter(|g| !matches!(g, Gate::Refused(_))).count();
        assert_eq!(through, 2);
        // Dropped unsettled (the client left): both reservations come back.
        drop(gates);
        assert!(matches!(l.gate("a", Some("kate")).await, Gate::Open(_)));
        assert!(fail(&l, "a", Some("kate")).await && fail(&l, "a", Some("kate")).await);
    }
}
