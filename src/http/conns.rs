//! Who holds a connection, and for how long it may keep it.
//!
//! Every accepted connection is registered here with the address group it came from (an IPv4
//! address, or an IPv6 /64, which one host usually owns whole). The registry refuses a group
//! past its cap, closes a connection that has had no request in flight for the idle timeout
//! (HTTP/2 with GOAWAY, HTTP/1 keep-alive by closing), cuts an HTTP/1 request head that takes
//! longer than the header timeout, and, when the server is nearly full, closes the
//! longest-idle connections first so that new clients find room.

use crate::ratelimit::AddressGroup;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
// tokio's clock, so that tests with paused time see deadlines pass.
use tokio::time::Instant;

/// The share of `max_connections` above which idle connections are closed to make room.
const PRESSURE_PERCENT: usize = 90;

/// How often a refused connection may be logged (a flood must not become a log flood).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Refused connections held at once, as a multiple of `max_connections` (see `tarpit`).
pub(super) const TARPIT_FACTOR: usize = 4;

/// Process-wide connection figures for `/metrics` (read with [`stats`]).
static STATS: Stats = Stats {
    open: AtomicUsize::new(0),
    held: AtomicUsize::new(0),
    refused: AtomicU64::new(0),
    idle: AtomicU64::new(0),
    header_timeout: AtomicU64::new(0),
    evicted: AtomicU64::new(0),
};

/// Connections now, and how many ended each way since the process started.
#[derive(Debug)]
pub struct Stats {
    /// Open and counted against the caps.
    pub open: AtomicUsize,
    /// Refused and held before being closed.
    pub held: AtomicUsize,
    /// Refused because their address held its cap.
    pub refused: AtomicU64,
    /// Closed after the idle timeout.
    pub idle: AtomicU64,
    /// Cut because a request head did not arrive in time.
    pub header_timeout: AtomicU64,
    /// Closed to make room while the server was nearly full.
    pub evicted: AtomicU64,
}

/// The process's connection figures.
pub fn stats() -> &'static Stats {
    &STATS
}

impl Close {
    /// Counts a close for `/metrics`.
    pub fn count(self) {
        let counter = match self {
            Close::Idle => &STATS.idle,
            Close::HeaderTimeout => &STATS.header_timeout,
            Close::Evicted => &STATS.evicted,
            Close::Shutdown => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The timeouts and caps the registry enforces.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub max_connections: usize,
    pub per_address: usize,
    pub idle: Duration,
    pub header_read: Duration,
    /// How long a refused connection is held before it is closed.
    pub tarpit: Duration,
}

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Close {
    /// No request in flight for the idle timeout.
    Idle,
    /// An HTTP/1 request head that did not arrive whole within the header timeout.
    HeaderTimeout,
    /// Closed to make room while the server was nearly full.
    Evicted,
    /// The server is shutting down.
    Shutdown,
}

const NO_ORDER: u8 = 0;
const ORDER_EVICT: u8 = 1;
const ORDER_SHUTDOWN: u8 = 2;

/// What one connection's task and the registry share about it.
#[derive(Debug)]
pub(super) struct ConnState {
    /// Set once the protocol is known (after TLS and sniffing).
    h2: AtomicBool,
    /// Requests whose response body has not been dropped yet (HTTP/2: open streams).
    in_flight: AtomicU32,
    /// Milliseconds since the registry's epoch when `in_flight` last fell to zero.
    idle_since: AtomicU64,
    /// HTTP/1: when the first byte of the next request head arrived, `u64::MAX` if none yet.
    head_since: AtomicU64,
    /// An order from outside the connection's task (`ORDER_*`).
    order: AtomicU8,
    wake: Notify,
    epoch: Instant,
}

impl ConnState {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a request until the returned guard (kept with its response body) drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(u64::MAX, Ordering::Release);
        InFlight(self.clone())
    }

    fn is_between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Whether bytes of an HTTP/1 head arrived that never became a request: a response written
    /// now is hyper's own answer to a head it could not parse. (A response of ours may still be
    /// flushed after its request ended, but by then `InFlight`'s drop has cleared `head_since`,
    /// and hyper flushes before it reads the next head.)
    pub fn answering_unparsed_head(&self) -> bool {
        !self.is_h2()
            && self.is_between_requests()
            && self.head_since.load(Ordering::Acquire) != u64::MAX
    }

    /// Records the protocol the connection speaks, once known; an HTTP/1 head has begun then.
    pub fn set_h2(&self, h2: bool) {
        self.h2.store(h2, Ordering::Release);
        if !h2 {
            self.head_since.store(self.now(), Ordering::Release);
        }
    }

    fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Acquire)
    }

    /// Bytes arrived: on an idle HTTP/1 connection they begin the next request head, which
    /// now has `header_read` to arrive whole.
    pub fn bytes_read(&self) {
        if self.is_h2() || !self.is_between_requests() {
            return;
        }
        if self.head_since.load(Ordering::Acquire) == u64::MAX {
            self.head_since.store(self.now(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    fn idle_for(&self, now: u64) -> Option<u64> {
        self.is_between_requests()
            .then(|| now.saturating_sub(self.idle_since.load(Ordering::Acquire)))
    }

    fn order(&self, order: u8) {
        // The first order stands: a shutdown does not turn an eviction back into a drain.
        if self.order.compare_exchange(NO_ORDER, order, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Resolves when this connection should be closed, and says why.
    pub async fn closing(&self, policy: &Policy) -> Close {
        loop {
            match self.order.load(Ordering::Acquire) {
                ORDER_EVICT => return Close::Evicted,
                ORDER_SHUTDOWN => return Close::Shutdown,
                _ => {}
            }
            let now = self.now();
            let (deadline, why) = self.deadline(now, policy);
            if deadline <= now {
                return why;
            }
            let wait = Duration::from_millis(deadline - now);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Resolves once no request has been in flight for `quiet`, counting from this call: a
    /// connection told to close gets that long to say goodbye, and requests that started
    /// meanwhile are never cut short by it.
    pub async fn quiet_for(&self, quiet: Duration) {
        let from = self.now();
        let quiet = quiet.as_millis() as u64;
        loop {
            let now = self.now();
            let since = from.max(self.idle_since.load(Ordering::Acquire));
            if self.is_between_requests() && now >= since + quiet {
                return;
            }
            let wait = (since + quiet).saturating_sub(now).clamp(50, quiet.max(50));
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }

    fn deadline(&self, now: u64, policy: &Policy) -> (u64, Close) {
        let idle = policy.idle.as_millis() as u64;
        if !self.is_between_requests() {
            // Busy: look again an idle period from now (a stream may last minutes).
            return (now + idle, Close::Idle);
        }
        let head = self.head_since.load(Ordering::Acquire);
        if !self.is_h2() && head != u64::MAX {
            return (head + policy.header_read.as_millis() as u64, Close::HeaderTimeout);
        }
        (self.idle_since.load(Ordering::Acquire) + idle, Close::Idle)
    }
}

/// A request in flight on a connection; dropping it (with the response body) ends it.
#[derive(Debug)]
pub(super) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let s = &self.0;
        s.idle_since.store(s.now(), Ordering::Release);
        s.head_since.store(u64::MAX, Ordering::Release);
        s.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry {
    group: AddressGroup,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    per_group: HashMap<AddressGroup, usize>,
    conns: HashMap<u64, Entry>,
    /// Connections ordered to close that have not gone yet.
    closing: usize,
    refused_since_log: u64,
    last_refusal_log: Option<Instant>,
}

/// Every open connection, by id and by address group.
pub(super) struct Registry {
    policy: Policy,
    epoch: Instant,
    inner: Mutex<Inner>,
    empty: Notify,
    tarpitted: Arc<AtomicUsize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    PerAddressCap,
}

/// A registered connection; dropping it unregisters it.
pub(super) struct Lease {
    registry: Arc<Registry>,
    id: u64,
    pub state: Arc<ConnState>,
}

impl Lease {
    /// The deadlines this connection keeps.
    pub fn policy(&self) -> &Policy {
        self.registry.policy()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if let Some(entry) = inner.conns.remove(&self.id) {
            if entry.state.order.load(Ordering::Acquire) != NO_ORDER {
                inner.closing -= 1;
            }
            if let Some(n) = inner.per_group.get_mut(&entry.group) {
                *n -= 1;
                if *n == 0 {
                    inner.per_group.remove(&entry.group);
                }
            }
        }
        STATS.open.fetch_sub(1, Ordering::Relaxed);
        if inner.conns.is_empty() {
            self.registry.empty.notify_waiters();
        }
    }
}

impl Registry {
    /// An empty registry enforcing `policy`.
    pub fn new(policy: Policy) -> Arc<Registry> {
        Arc::new(Registry {
            policy,
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
            empty: Notify::new(),
            tarpitted: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The caps and deadlines it enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing under this lock can panic half-way; a poisoned lock still holds valid data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection from `peer` as it is accepted (before any handshake, so that a
    /// refused one costs nothing), or refuses it when its address group is at its cap.
    /// Admitting one past the pressure mark orders the longest-idle connection closed.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Lease, Refused> {
        let group = AddressGroup::of(peer.ip());
        let mut inner = self.lock();
        let count = inner.per_group.get(&group).copied().unwrap_or(0);
        if count >= self.policy.per_address {
            STATS.refused.fetch_add(1, Ordering::Relaxed);
            self.log_refusal(&mut inner, peer);
            return Err(Refused::PerAddressCap);
        }
        *inner.per_group.entry(group).or_insert(0) += 1;
        let now = self.epoch.elapsed().as_millis() as u64;
        let state = Arc::new(ConnState {
            h2: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            // An HTTP/1 client's first head is due from the moment it connects.
            head_since: AtomicU64::new(now),
            order: AtomicU8::new(NO_ORDER),
            wake: Notify::new(),
            epoch: self.epoch,
        });
        inner.next_id += 1;
        let id = inner.next_id;
        inner.conns.insert(id, Entry { group, state: state.clone() });
        STATS.open.fetch_add(1, Ordering::Relaxed);
        self.relieve_pressure(&mut inner, now);
        Ok(Lease { registry: self.clone(), id, state })
    }

    /// Above the pressure mark, orders the longest-idle connections closed until the ones
    /// staying are below it again.
    fn relieve_pressure(&self, inner: &mut Inner, now: u64) {
        let mark = (self.policy.max_connections * PRESSURE_PERCENT).div_ceil(100);
        while inner.conns.len() - inner.closing > mark.max(1) {
            let oldest = inner
                .conns
                .values()
                .filter(|e| e.state.order.load(Ordering::Acquire) == NO_ORDER)
                .filter_map(|e| e.state.idle_for(now).map(|idle| (idle, &e.state)))
                .max_by_key(|(idle, _)| *idle)
                .map(|(_, s)| s.clone());
            let Some(victim) = oldest else { return };
            victim.order(ORDER_EVICT);
            inner.closing += 1;
        }
    }

    fn log_refusal(&self, inner: &mut Inner, peer: SocketAddr) {
        inner.refused_since_log += 1;
        let due = inner.last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY);
        if due {
            tracing::warn!(
                %peer,
                refused = inner.refused_since_log,
                cap = self.policy.per_address,
                "connections refused: this address (IPv6: its /64) holds \
                 server.max_connections_per_address"
            );
            inner.refused_since_log = 0;
            inner.last_refusal_log = Some(Instant::now());
        }
    }

    /// Holds a refused connection, unread, for up to `policy.tarpit` before closing it, up to
    /// `TARPIT_FACTOR × max_connections` at once (beyond that it is closed at once). Closing a
    /// refused connection at once invites its client to reconnect at once: thousands of such
    /// loops fill the kernel's accept queue, and then everyone's connections wait in it.
    pub fn tarpit<T: Send + 'static>(&self, conn: T) {
        let held = self.tarpitted.fetch_add(1, Ordering::AcqRel);
        if held >= TARPIT_FACTOR * self.policy.max_connections {
            self.tarpitted.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        // Spread over half the hold to a full one, so held clients do not all return at once.
        let hold = self.policy.tarpit.mul_f64(rand::random::<f64>().mul_add(0.5, 0.5));
        let count = self.tarpitted.clone();
        STATS.held.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            drop(conn);
            count.fetch_sub(1, Ordering::AcqRel);
            STATS.held.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Orders every connection to finish its requests and close (the accept loop has ended:
    /// no new one comes).
    pub fn shut_down(&self) {
        let mut inner = self.lock();
        let mut ordered = 0;
        for e in inner.conns.values() {
            if e.state.order.load(Ordering::Acquire) == NO_ORDER {
                e.state.order(ORDER_SHUTDOWN);
                ordered += 1;
            }
        }
        inner.closing += ordered;
    }

    /// The connections open now.
    pub fn open(&self) -> usize {
        self.lock().conns.len()
    }

    /// Resolves once no connection is registered.
    pub async fn drained(&self) {
        loop {
            let notified = self.empty.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: usize, per_address: usize) -> Policy {
        Policy {
            max_connections: max,
            per_address,
            idle: Duration::from_secs(60),
            header_read: Duration::from_secs(10),
            tarpit: Duration::from_secs(10),
        }
    }

    fn peer(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 40000)
    }

    #[tokio::test]
    async fn an_address_past_its_cap_is_refused_and_a_freed_slot_is_reused() {
        let r = Registry::new(policy(100, 2));
        let one = r.admit(peer("127.0.0.1")).unwrap();
        let _two = r.admit(peer("127.0.0.1")).unwrap();
        assert_eq!(r.admit(peer("127.0.0.1")).err(), Some(Refused::PerAddressCap));
        assert!(r.admit(peer("127.0.0.2")).is_ok(), "another address is not limited");
        drop(one);
        assert!(r.admit(peer("127.0.0.1")).is_ok());
    }

    #[tokio::test]
    async fn under_pressure_the_longest_idle_connection_is_ordered_closed() {
        let r = Registry::new(policy(10, 100));
        let first = r.admit(peer("127.0.0.1")).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut busy = Vec::new();
        let mut rest = Vec::new();
        for i in 0..8 {
            let lease = r.admit(peer("127.0.0.1")).unwrap();
            if i % 2 == 0 {
                busy.push(lease.state.request_started());
            }
            rest.push(lease);
        }
        // 9 open: the mark (9) is not passed yet.
        assert_eq!(first.state.order.load(Ordering::Acquire), NO_ORDER);
        let tenth = r.admit(peer("127.0.0.1")).unwrap();
        let why = tokio::time::timeout(Duration::from_secs(1), first.state.closing(r.policy()));
        assert_eq!(why.await.unwrap(), Close::Evicted, "the oldest idle one goes first");
        for lease in rest.iter().chain([&tenth]) {
            assert_eq!(lease.state.order.load(Ordering::Acquire), NO_ORDER);
        }
    }

    #[tokio::test]
    async fn idle_and_header_deadlines() {
        let short = Policy {
            idle: Duration::from_millis(300),
            header_read: Duration::from_millis(200),
            ..policy(10, 10)
        };
        let r = Registry::new(short);
        let h2 = r.admit(peer("127.0.0.1")).unwrap();
        h2.state.set_h2(true);
        let guard = h2.state.request_started();
        let closing = h2.state.closing(r.policy());
        tokio::pin!(closing);
        // Busy for longer than the idle timeout: not closed.
        assert!(tokio::time::timeout(Duration::from_millis(600), &mut closing).await.is_err());
        drop(guard);
        let started = Instant::now();
        assert_eq!(closing.await, Close::Idle);
        assert!(started.elapsed() >= Duration::from_millis(250));

        let h1 = r.admit(peer("127.0.0.1")).unwrap();
        h1.state.set_h2(false);
        // After a response, the next byte starts a head that must arrive within its timeout.
        drop(h1.state.request_started());
        h1.state.bytes_read();
        assert_eq!(h1.state.closing(r.policy()).await, Close::HeaderTimeout);
    }
}
