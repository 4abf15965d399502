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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Open,
    /// Go ahead after waiting this long: the username has too many failures from anywhere.
    Slowed(Duration),
    /// This address (for this username, or for all) has failed too often; answer `429`.
    Refused(Decision),
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

    /// Decides, taking nothing, whether `address` may try `username` (`None`: a name no
    /// account can have, so only the address counts). `username` is already lowercase.
    pub fn gate(&self, address: &str, username: Option<&str>) -> Gate {
        let mut refusals = vec![self.per_address.peek(address)];
        if let Some(name) = username {
            refusals.push(self.per_address_and_username.peek(&pair(address, name)));
        }
        // When both refuse, the longer wait is the true one.
        if let Some(d) = refusals.into_iter().filter(|d| !d.allowed).max_by_key(|d| d.retry_after) {
            return Gate::Refused(d);
        }
        match username.map(|name| self.per_username.peek(name)) {
            Some(d) if !d.allowed && !self.slowdown.is_zero() => Gate::Slowed(self.slowdown),
            _ => Gate::Open,
        }
    }

    /// Counts a failed attempt against every limit it falls under.
    pub fn failed(&self, address: &str, username: Option<&str>) {
        // `charge`, not `check`: a failure counts even when the attempt raced past `gate`.
        self.per_address.charge(address, 1);
        if let Some(name) = username {
            self.per_address_and_username.charge(&pair(address, name), 1);
            self.per_username.charge(name, 1);
        }
    }

    /// A correct password from `address` clears that pair's failures (its own typos), and
    /// nothing else: the address and the username keep what others did.
    pub fn succeeded(&self, address: &str, username: &str) {
        self.per_address_and_username.forget(&pair(address, username));
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

    #[test]
    fn an_address_is_refused_for_a_name_then_for_all_while_others_are_only_slowed() {
        let l = limits();
        for _ in 0..2 {
            assert_eq!(l.gate("a", Some("kate")), Gate::Open);
            l.failed("a", Some("kate"));
        }
        assert!(matches!(l.gate("a", Some("kate")), Gate::Refused(_)), "the pair is spent");
        assert_eq!(l.gate("a", Some("liam")), Gate::Open, "other names from a are fine");
        assert_eq!(l.gate("b", Some("kate")), Gate::Open, "kate from b is fine");
        l.failed("b", Some("kate"));
        // Three failures on kate in all: slowed, from any address, never refused.
        assert_eq!(l.gate("c", Some("kate")), Gate::Slowed(Duration::from_millis(50)));
        l.failed("a", Some("liam"));
        l.failed("a", None);
        let refused = l.gate("a", Some("zoe"));
        assert!(matches!(refused, Gate::Refused(d) if d.retry_after > Duration::ZERO));
        assert!(matches!(l.gate("a", None), Gate::Refused(_)), "four from a: all names");
    }

    #[test]
    fn success_clears_only_its_own_pair() {
        let l = limits();
        l.failed("a", Some("kate"));
        l.failed("a", Some("kate"));
        l.succeeded("a", "kate");
        assert_eq!(l.gate("a", Some("kate")), Gate::Open);
        l.failed("a", Some("kate"));
        assert!(matches!(l.gate("a", None), Gate::Open), "3 of the address's 4 are used");
        l.failed("a", None);
        assert!(matches!(l.gate("a", None), Gate::Refused(_)), "the address kept its count");
    }
}
