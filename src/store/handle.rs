//! `Store`, the handle everything above this module holds: one of the two backends, chosen at
//! start, behind the same operations. Each method's doc is the contract both keep;
//! `suite.rs` runs one test suite against each.

use super::postgres::{CopyReport, Pg};
use super::{
    AccountChange, ApiKeyRecord, CancelOutcome, Conversation, ConversationPage, Cursor,
    DeletedUser, Job, JobState, JobStats, Message, NewMessage, NewUser, QueueLimits, Redb, Refusal,
    RotateOutcome, Settlement, StoreError, TurnTarget, User, UserChange,
};
use crate::clock::Millis;
use crate::secret::Secret;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// How to reach PostgreSQL (`storage.url` and its neighbours).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database?sslmode=require`.
    pub url: Secret,
    /// Connections this replica keeps open at most.
    pub pool_size: usize,
    /// The longest any statement, or any wait for a row lock, may take.
    pub statement_timeout: Duration,
    /// The longest a new connection may take.
    pub connect_timeout: Duration,
    /// A PEM file of CA certificates trusted besides the web's roots.
    pub ca_file: Option<PathBuf>,
}

impl PostgresOptions {
    /// The defaults for `url`.
    pub fn new(url: Secret) -> Self {
        PostgresOptions {
            url,
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }

    /// The password in `url`, for the log mask.
    pub fn password(&self) -> Option<Secret> {
        let config: tokio_postgres::Config = self.url.expose().parse().ok()?;
        config.get_password().map(|p| Secret::new(String::from_utf8_lossy(p)))
    }
}

/// One step on a shared counter (a GCRA "theoretical arrival time", Unix ms, per key).
#[derive(Debug, Clone, Copy)]
pub enum CounterStep {
    /// Moves the time on by `interval` if it runs at most `tolerance` ahead of `now`.
    Take { now: Millis, interval: Millis, tolerance: Millis },
    /// Reads the time.
    Peek,
    /// Moves the time on by `amount` whatever the limit.
    Charge { now: Millis, amount: Millis },
    /// Moves the time back by `amount`, never before `now`.
    Refund { now: Millis, amount: Millis },
    /// Drops the key.
    Forget,
}

/// A cheap, cloneable handle to the open store.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Redb(Redb),
    Postgres(Pg),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Redb(r) => r.fmt(f),
            Backend::Postgres(p) => f.debug_tuple("Postgres").field(&p.shown()).finish(),
        }
    }
}

/// Calls the same method on whichever backend this is; the redb side's reads are synchronous
/// (MVCC, they never wait), writes and every PostgreSQL call are awaited.
macro_rules! both {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Redb(b) => b.$method($($arg),*).await,
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
    (read $self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Redb(b) => b.$method($($arg),*),
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Opens (or creates) `dir/edgechat.redb`, checks its schema and creates missing tables.
    /// Blocks (file I/O): call it on the blocking pool from async code.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Redb::open(dir).map(|r| Store { backend: Backend::Redb(r) })
    }

    /// Like `open`, keeping at most `cache_bytes` of the file's pages in memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        Redb::open_with_cache(dir, cache_bytes).map(|r| Store { backend: Backend::Redb(r) })
    }

    /// Connects to PostgreSQL and migrates its schema (once, however many replicas start).
    pub async fn connect(options: &PostgresOptions) -> Result<Store, StoreError> {
        Pg::connect(options).await.map(|p| Store { backend: Backend::Postgres(p) })
    }

    /// Copies the redb file at `from` (no server may hold it: copy a backup of a running
    /// one) into the empty PostgreSQL database `to`, every table in one transaction that
    /// commits only when each table's rows add up on both sides. Blocks on the file's reads.
    pub async fn copy(from: &Path, to: &PostgresOptions) -> Result<CopyReport, StoreError> {
        let source = Redb::open_file_at(from)?;
        Pg::connect(to).await?.copy_from(&source).await
    }

    /// The redb file, when that is the backend (backups and restores work on it).
    pub fn file(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Redb(r) => Some(r.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Whether other processes may share this store (PostgreSQL): then a job found running
    /// may be another replica's, per-process state is not shared, and the JWT secret must
    /// come from configuration.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Wake-ups for idle job workers when another process enqueued (or rescued) a job: on
    /// PostgreSQL, a listening connection of its own; `None` for the redb file, whose only
    /// process wakes its workers itself.
    pub fn job_signals(&self) -> Option<super::postgres::JobSignals> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(p) => Some(super::postgres::JobSignals::new(p.clone())),
        }
    }

    /// Proves the store answers a read; `/ready` calls it (with `writable`).
    pub async fn check(&self) -> Result<(), StoreError> {
        both!(read self.check())
    }

    /// `Ok` while writes are let in; otherwise why not (the redb file's full disk). No I/O.
    pub fn writable(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.writable(),
            // Each statement finds out for itself; the pool reconnects.
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Resolves once the redb file takes writes again. On PostgreSQL nothing announces that,
    /// so it never resolves: waiters back off on their own timers.
    pub async fn writable_again(&self) {
        match &self.backend {
            Backend::Redb(r) => r.writable_again().await,
            Backend::Postgres(_) => std::future::pending().await,
        }
    }

    /// Proves the process is not wedged, for the systemd watchdog (see `Redb::heartbeat`). A
    /// database that is down is not this process being stuck, and a restart would not bring
    /// it back: on PostgreSQL this is always `Ok`.
    pub fn heartbeat(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.heartbeat(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// The schema version the store holds (always the build's own once opened).
    pub async fn schema_version(&self) -> Result<u64, StoreError> {
        both!(read self.schema_version())
    }

    /// Copies the redb file into `dest` (see `Redb::backup`); PostgreSQL is backed up with
    /// its own tools. Blocks: call it on the blocking pool.
    pub fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.backup(dest),
            Backend::Postgres(p) => Err(StoreError::Db(format!(
                "the store is PostgreSQL ({}): back it up with pg_dump (or your provider's snapshots), not edgechat backup",
                p.shown()
            ))),
        }
    }

    /// Applies `step` to the shared counter `key`: whether it was allowed (only `Take` can
    /// refuse) and the key's time afterwards (`None`: unknown). Only a shared store keeps
    /// counters; the redb file's single process counts in memory.
    pub async fn counter(
        &self,
        key: &str,
        step: CounterStep,
    ) -> Result<(bool, Option<Millis>), StoreError> {
        match &self.backend {
            Backend::Redb(_) => Err(StoreError::Db("shared counters need PostgreSQL".into())),
            Backend::Postgres(p) => p.counter(key, step).await,
        }
    }

    /// Deletes shared counters whose time has passed (they hold no state); returns how many.
    pub async fn purge_counters(&self, now: Millis) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Redb(_) => Ok(0),
            Backend::Postgres(p) => p.purge_counters(now).await,
        }
    }

    // Accounts.

    /// Creates a user; usernames and emails are unique ignoring case (`Conflict`).
    pub async fn create_user(&self, new: NewUser, now: Millis) -> Result<User, StoreError> {
        both!(self.create_user(new, now))
    }

    /// The user with this id, disabled or not.
    pub async fn user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        both!(read self.user(id))
    }

    /// The user with this username, ignoring case.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        both!(read self.user_by_username(username))
    }

    /// Every user, oldest first.
    pub async fn users(&self) -> Result<Vec<User>, StoreError> {
        both!(read self.users())
    }

    /// Changes a user; demoting the last active admin is refused (`LastAdmin`); a new password
    /// ends the user's sessions (their refresh tokens).
    pub async fn update_user(
        &self,
        id: Uuid,
        change: UserChange,
    ) -> Result<AccountChange<User>, StoreError> {
        both!(self.update_user(id, change))
    }

    /// Deletes a user with their conversations, keys, refresh tokens and jobs, in one
    /// transaction; the last active admin is refused (`LastAdmin`).
    pub async fn delete_user(&self, id: Uuid) -> Result<AccountChange<DeletedUser>, StoreError> {
        both!(self.delete_user(id))
    }

    /// Stores a new API key record; `NotFound` when its user was deleted meanwhile.
    pub async fn create_api_key(&self, key: ApiKeyRecord) -> Result<(), StoreError> {
        both!(self.create_api_key(key))
    }

    /// The live key with this hash and its owner, in one read (every request made with an
    /// API key asks this).
    pub async fn api_key_owner(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<(ApiKeyRecord, User)>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => {
                let Some(key) = r.api_key_by_hash(hash)? else { return Ok(None) };
                Ok(r.user(key.user_id)?.map(|user| (key, user)))
            }
            Backend::Postgres(p) => p.api_key_owner(hash).await,
        }
    }

    /// A user's live keys, oldest first.
    pub async fn api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyRecord>, StoreError> {
        both!(read self.api_keys(user_id))
    }

    /// Deletes one of the user's keys; `NotFound` when it is not theirs.
    pub async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> Result<(), StoreError> {
        both!(self.revoke_api_key(user_id, key_id))
    }

    /// Records that a key was used; a revoked key is left alone.
    pub async fn touch_api_key(&self, key_id: Uuid, now: Millis) -> Result<(), StoreError> {
        both!(self.touch_api_key(key_id, now))
    }

    /// Stores the first refresh token of a new family (a login); `NotFound` when its user was
    /// deleted meanwhile.
    pub async fn insert_refresh_token(
        &self,
        hash: [u8; 32],
        user_id: Uuid,
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        both!(self.insert_refresh_token(hash, user_id, expires_at))
    }

    /// Deletes up to `limit` refresh tokens that expired before `now`; returns how many.
    pub async fn purge_expired_refresh_tokens(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        both!(self.purge_expired_refresh_tokens(now, limit))
    }

    /// Exchanges `old` for `new` in one transaction: rotation, and reuse detection that
    /// revokes the whole family when a rotated token comes back.
    pub async fn rotate_refresh_token(
        &self,
        old: [u8; 32],
        new: [u8; 32],
        now: Millis,
        new_expires_at: Millis,
    ) -> Result<RotateOutcome, StoreError> {
        both!(self.rotate_refresh_token(old, new, now, new_expires_at))
    }

    /// Revokes the family of this refresh token (logout); unknown tokens are ignored.
    pub async fn revoke_refresh_token(
        &self,
        hash: [u8; 32],
        now: Millis,
    ) -> Result<(), StoreError> {
        both!(self.revoke_refresh_token(hash, now))
    }

    // Conversations.

    /// Appends messages to a conversation (creating it for `TurnTarget::New`) in one
    /// transaction: a turn is stored whole or not at all, and the call returns after its
    /// commit. `NotFound` when the conversation (or the user) is gone.
    pub async fn record_turn(
        &self,
        user_id: Uuid,
        target: TurnTarget,
        messages: Vec<NewMessage>,
        now: Millis,
    ) -> Result<(Conversation, Vec<Message>), StoreError> {
        both!(self.record_turn(user_id, target, messages, now))
    }

    /// A page of the user's conversations, newest activity first, starting after `after`.
    pub async fn conversations(
        &self,
        user_id: Uuid,
        limit: usize,
        after: Option<Cursor>,
    ) -> Result<ConversationPage, StoreError> {
        both!(read self.conversations(user_id, limit, after))
    }

    /// The user's conversation without its messages, or `None` (also for another user's).
    pub async fn conversation_header(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Conversation>, StoreError> {
        both!(read self.conversation_header(user_id, id))
    }

    /// The user's conversation with all its messages in order, or `None`.
    pub async fn conversation(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<(Conversation, Vec<Message>)>, StoreError> {
        both!(read self.conversation(user_id, id))
    }

    /// Deletes the user's conversation and its messages; `NotFound` when it is not theirs.
    pub async fn delete_conversation(&self, user_id: Uuid, id: Uuid) -> Result<(), StoreError> {
        both!(self.delete_conversation(user_id, id))
    }

    // Background jobs.

    /// Adds jobs in one transaction, each checked against `limits`; returns after the commit,
    /// one outcome per job in order.
    pub async fn enqueue_jobs(
        &self,
        jobs: Vec<Job>,
        limits: QueueLimits,
    ) -> Result<Vec<Result<Job, Refusal>>, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.enqueue_jobs(jobs, limits).await,
            Backend::Postgres(p) => {
                p.enqueue_jobs(jobs.into_iter().map(|j| (j, limits)).collect()).await
            }
        }
    }

    /// Adds a job, checked against `limits`, and returns after the commit. Enqueues arriving
    /// meanwhile share the next transaction and its one flush (group commit, both backends).
    pub async fn enqueue_job(
        &self,
        job: Job,
        limits: QueueLimits,
    ) -> Result<Result<Job, Refusal>, StoreError> {
        both!(self.enqueue_job(job, limits))
    }

    /// Takes the queued job due first (run_at ≤ now) for one attempt until `lease_until`; no
    /// other worker (of any replica) holds it meanwhile.
    pub async fn claim_job(
        &self,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<Job>, StoreError> {
        both!(self.claim_job(now, lease_until))
    }

    /// When the next queued job becomes due, if any is queued.
    pub async fn next_job_due(&self) -> Result<Option<Millis>, StoreError> {
        both!(read self.next_job_due())
    }

    /// Extends the lease of attempt `attempt`; `false` when the job is no longer that attempt's
    /// (cancelled, or rescued after the lease ran out).
    pub async fn renew_lease(
        &self,
        id: Uuid,
        attempt: u32,
        until: Millis,
    ) -> Result<bool, StoreError> {
        both!(self.renew_lease(id, attempt, until))
    }

    /// Ends attempt `attempt` as `how`, in one transaction with its conversation turn; `None`
    /// when the job is no longer that attempt's (nothing written: one answer, stored once).
    pub async fn settle_job(
        &self,
        id: Uuid,
        attempt: u32,
        how: Settlement,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        both!(self.settle_job(id, attempt, how, now))
    }

    /// Cancels the user's job if it is queued or running.
    pub async fn cancel_job(
        &self,
        user_id: Uuid,
        id: Uuid,
        now: Millis,
    ) -> Result<CancelOutcome, StoreError> {
        both!(self.cancel_job(user_id, id, now))
    }

    /// Queues again every running job whose lease ended before `now`; returns how many.
    pub async fn rescue_jobs(&self, now: Millis) -> Result<usize, StoreError> {
        both!(self.rescue_jobs(now))
    }

    /// At start: queues again what no process runs any more. The redb file's lock proves no
    /// other process runs its jobs, so every running one goes back; a shared database's
    /// running jobs may be other replicas', so only expired leases do.
    pub async fn rescue_orphaned_jobs(&self, now: Millis) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Redb(r) => r.rescue_jobs(Millis::MAX).await,
            Backend::Postgres(p) => p.rescue_jobs(now).await,
        }
    }

    /// Rewrites the request of every queued job with `upgrade` (`None` keeps it); returns how
    /// many changed.
    pub async fn upgrade_queued_requests(
        &self,
        upgrade: impl Fn(&Value) -> Option<Value> + Send + 'static,
    ) -> Result<usize, StoreError> {
        both!(self.upgrade_queued_requests(upgrade))
    }

    /// Deletes up to `batch` jobs that finished before `before`; returns how many.
    pub async fn purge_jobs(&self, before: Millis, batch: usize) -> Result<usize, StoreError> {
        both!(self.purge_jobs(before, batch))
    }

    /// The user's job, or `None` (also for another user's).
    pub async fn job(&self, user_id: Uuid, id: Uuid) -> Result<Option<Job>, StoreError> {
        both!(read self.job(user_id, id))
    }

    /// Up to `limit` of the user's jobs, newest first, older than `before` when given; and
    /// whether more follow.
    pub async fn jobs(
        &self,
        user_id: Uuid,
        limit: usize,
        before: Option<Uuid>,
    ) -> Result<(Vec<Job>, bool), StoreError> {
        both!(read self.jobs(user_id, limit, before))
    }

    /// Jobs in each state (cheap enough for every metrics scrape).
    pub async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        both!(read self.job_counts())
    }

    /// The queue's figures: counts, the oldest wait, what finished since `since`, the running
    /// jobs and the latest `recent` failures.
    pub async fn job_stats(
        &self,
        now: Millis,
        since: Millis,
        recent: usize,
    ) -> Result<JobStats, StoreError> {
        both!(read self.job_stats(now, since, recent))
    }

    /// How many jobs are queued and running.
    pub async fn job_backlog(&self) -> Result<(u64, u64), StoreError> {
        both!(read self.job_backlog())
    }
}

#[cfg(test)]
impl Store {
    /// Whether a refresh token with this hash is stored (tests see purges and deletions).
    pub(super) async fn has_refresh_token(&self, hash: &[u8; 32]) -> bool {
        both!(read self.has_refresh_token(hash)).unwrap()
    }

    /// Rows in every table, by name: what a deletion must leave as it was.
    pub(super) async fn table_sizes(&self) -> Vec<(String, u64)> {
        match &self.backend {
            Backend::Redb(r) => r.table_sizes(),
            Backend::Postgres(p) => p.table_sizes().await,
        }
    }
}
