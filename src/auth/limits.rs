//! Failed-login limits that throttle a guesser without locking anyone else out.
//!
//! Failures are counted per (address, username) and per address, and both are checked before
//! any password work: an address over either limit is refused (`429`) whatever it sends, so a
//! refusal tells nothing about the password or whether the account exists (failures for
//! unknown names count the same). Failures per username, from every address together, may only
//! slow that username's logins down — a limit that refused there would let anyone keep the real
//! user out with one wrong password now and then.

use crate::config::{QuotaConfig, RateLimitConfig};
use crate::ratelimit::{Decision, Limiter, Quota};
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
    per_address_and_username: Limiter,
    per_address: Limiter,
    per_username: Limiter,
    slowdown: Duration,
}

fn limiter(q: QuotaConfig) -> Limiter {
    let period = Duration::from_secs(q.per_secs);
    Limiter::new(Quota { requests: q.requests, period, burst: q.burst })
}

/// One key per (address, username); neither contains a space.
fn pair(address: &str, username: &str) -> String {
    format!("{address} {username}")
}

impl LoginLimits {
    /// The limits `[rate_limit]` configures.
    pub fn new(c: &RateLimitConfig) -> LoginLimits {
        LoginLimits {
            per_address_and_username: limiter(c.failed_logins_per_address_and_username),
            per_address: limiter(c.failed_logins_per_address),
            per_username: limiter(c.failed_logins_per_username),
            slowdown: Duration::from_millis(c.login_slowdown_ms),
        }
    }

    /// Decides whether `address` may try `username` (`None`: a name no account can have, so
    /// only the address counts), reserving a failure on both address limits when it may.
    /// `username` is already lowercase.
    pub fn gate(&self, address: &str, username: Option<&str>) -> Gate<'_> {
        let by_address = self.per_address.check(address);
        if !by_address.allowed {
            crate::metrics::rate_limited("failed_logins_per_address");
            return Gate::Refused(by_address);
        }
        if let Some(name) = username {
            let by_pair = self.per_address_and_username.check(&pair(address, name));
            if !by_pair.allowed {
                crate::metrics::rate_limited("failed_logins_per_address_and_username");
                self.per_address.refund(address, 1);
                return Gate::Refused(by_pair);
            }
        }
        let attempt = Attempt {
            limits: self,
            address: address.to_string(),
            username: username.map(str::to_string),
            settled: false,
        };
        match username.map(|name| self.per_username.peek(name)) {
            Some(d) if !d.allowed && !self.slowdown.is_zero() => {
                Gate::Slowed(attempt, self.slowdown)
            }
            _ => Gate::Open(attempt),
        }
    }
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown): the reserved failures stand, and the
    /// username's own count grows.
    pub fn failed(mut self) {
        self.settled = true;
        if let Some(name) = &self.username {
            self.limits.per_username.charge(name, 1);
        }
    }

    /// The password was right: the address gets its reservation back, and the pair's earlier
    /// failures (its own typos) are cleared — nothing else: the address and the username keep
    /// what others did.
    pub fn succeeded(mut self) {
        self.settled = true;
        self.limits.per_address.refund(&self.address, 1);
        if let Some(name) = &self.username {
            self.limits.per_address_and_username.forget(&pair(&self.address, name));
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.limits.per_address.refund(&self.address, 1);
        if let Some(name) = &self.username {
            self.limits.per_address_and_username.refund(&pair(&self.address, name), 1);
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
    fn fail(l: &LoginLimits, address: &str, name: Option<&str>) -> bool {
        match l.gate(address, name) {
            Gate::Open(a) | Gate::Slowed(a, _) => {
                a.failed();
                true
            }
            Gate::Refused(_) => false,
        }
    }

    fn refused(g: Gate<'_>) -> bool {
        matches!(g, Gate::Refused(d) if d.retry_after > Duration::ZERO)
    }

    #[test]
    fn an_address_is_refused_for_a_name_then_for_all_while_others_are_only_slowed() {
        let l = limits();
        assert!(fail(&l, "a", Some("kate")) && fail(&l, "a", Some("kate")));
        assert!(refused(l.gate("a", Some("kate"))), "the pair is spent");
        assert!(matches!(l.gate("a", Some("liam")), Gate::Open(_)), "other names from a");
        assert!(matches!(l.gate("b", Some("kate")), Gate::Open(_)), "kate from b is fine");
        assert!(fail(&l, "b", Some("kate")));
        // Three failures on kate in all: slowed, from any address, never refused.
        let slowed = l.gate("c", Some("kate"));
        assert!(matches!(slowed, Gate::Slowed(_, d) if d == Duration::from_millis(50)));
        assert!(fail(&l, "a", Some("liam")) && fail(&l, "a", None));
        assert!(refused(l.gate("a", Some("zoe"))));
        assert!(refused(l.gate("a", None)), "four from a: all names");
    }

    #[test]
    fn success_clears_only_its_own_pair() {
        let l = limits();
        assert!(fail(&l, "a", Some("kate")));
        let Gate::Open(a) = l.gate("a", Some("kate")) else { panic!("one failure of two") };
        a.succeeded();
        // The pair starts again (two more are let through); the address kept its one.
        assert!(fail(&l, "a", Some("kate")) && fail(&l, "a", Some("kate")));
        assert!(refused(l.gate("a", Some("kate"))));
        assert!(matches!(l.gate("a", None), Gate::Open(_)), "3 of the address's 4 are used");
        assert!(fail(&l, "a", None));
        assert!(refused(l.gate("a", None)), "the address kept its count");
    }

    #[test]
    fn guesses_sent_at_once_cannot_all_pass_and_unsettled_ones_give_back() {
        let l = limits();
        // Twenty guesses in flight at once for one name: the pair's burst (2) lets two through.
        let gates: Vec<Gate<'_>> = (0..20).map(|_| l.gate("a", Some("kate"))).collect();
        let through = gates.iter().filter(|g| !matches!(g, Gate::Refused(_))).count();
        assert_eq!(through, 2);
        // Dropped unsettled (the client left): both reservations come back.
        drop(gates);
        assert!(matches!(l.gate("a", Some("kate")), Gate::Open(_)));
        assert!(fail(&l, "a", Some("kate")) && fail(&l, "a", Some("kate")));
    }
}
