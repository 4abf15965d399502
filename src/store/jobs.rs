//! Background jobs, durable in the same file: a job row plus indexes that make each step one
//! range read — queued jobs by (run_at, id) for claiming, running ones by (lease deadline, id)
//! for rescue, finished ones by (finished_at, id) for retention and the admin view, and every
//! job by (user, id) for listing. Each state change moves a job between indexes and adjusts the
//! per-state counts in the same transaction, so they never disagree.
//!
//! What a job runs and what it produced are opaque JSON here: the store knows no chat.

use super::conversations::{record_turn_in, Conversation, Message, NewMessage, TurnTarget};
use super::tables::{self, encode, get};
use super::{Redb, StoreError};
use crate::clock::Millis;
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Every state, in the order the admin view lists them.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The lowercase name used in the API and the count table.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed and cancelled jobs never change again.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A background job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub user_id: Uuid,
    pub state: JobState,
    /// Attempts started so far (a rescued or retried job counts each).
    pub attempts: u32,
    /// What to run, as the API accepted it.
    pub request: Value,
    pub result: Option<Value>,
    /// The last attempt's error, for failed (and retried) jobs.
    pub error: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// When a queued job may run (later than `created_at` after a failure, for backoff).
    pub run_at: Millis,
    /// Until when the running attempt owns the job; a later claim may rescue it.
    pub lease_until: Option<Millis>,
}

impl Job {
    /// A queued job for `user`, runnable now.
    pub fn new(user_id: Uuid, request: Value, now: Millis) -> Job {
        Job {
            id: Uuid::now_v7(),
            user_id,
            state: JobState::Queued,
            attempts: 0,
            request,
            result: None,
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            run_at: now,
            lease_until: None,
        }
    }
}

/// A successful attempt whose conversation was deleted while it ran fails with this: a retry
/// would fail the same way.
pub(super) const CONVERSATION_GONE: &str = "the conversation no longer exists";

impl Job {
    /// Ends it as succeeded with `result`.
    pub(super) fn succeed(&mut self, result: Value, now: Millis) {
        (self.result, self.error) = (Some(result), None);
        (self.state, self.finished_at) = (JobState::Succeeded, Some(now));
    }

    /// Queues it again, to run at `run_at`.
    pub(super) fn retry(&mut self, error: String, run_at: Millis) {
        (self.error, self.state, self.run_at) = (Some(error), JobState::Queued, run_at);
    }

    /// Ends it as failed.
    pub(super) fn fail(&mut self, error: String, now: Millis) {
        (self.error, self.state, self.finished_at) = (Some(error), JobState::Failed, Some(now));
    }
}

/// Why an enqueue was refused; nothing was written for that job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The user already has this many jobs queued or running.
    UserLimit(u32),
    /// The whole queue holds this many unfinished jobs.
    QueueFull(u64),
    /// The user no longer exists (deleted while the request was on its way).
    UserGone,
}

/// Caps checked when enqueueing.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub per_user: u32,
    pub total: u64,
}

/// Builds a job's result from the turn as stored (ids included), inside the transaction.
pub type MakeResult = Box<dyn FnOnce(Option<(&Conversation, &[Message])>) -> Value + Send>;

/// How an attempt ended.
pub enum Settlement {
    /// Store the turn (when there is one) and the result built from what was stored.
    Succeeded {
        turn: Option<(TurnTarget, Vec<NewMessage>)>,
        result: MakeResult,
    },
    /// Queue it again to run at `run_at`.
    Retry {
        error: String,
        run_at: Millis,
    },
    Failed {
        error: String,
    },
}

/// What `cancel_job` found.
#[derive(Debug)]
pub enum CancelOutcome {
    /// It was queued or running and is now cancelled.
    Cancelled(Job),
    /// It had already finished; unchanged.
    Finished(Job),
}

/// The queue as a whole, for `/admin/jobs`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobStats {
    pub counts: Vec<(JobState, u64)>,
    /// Age of the queued job waiting longest, in ms.
    pub oldest_queued_ms: Option<Millis>,
    /// Jobs finished within the window, and how many of those failed.
    pub finished_in_window: u64,
    pub failed_in_window: u64,
    pub running: Vec<Job>,
    pub recent_failures: Vec<Job>,
}

fn ms(t: Millis) -> u64 {
    t.max(0) as u64
}

fn counts(
    table: &impl ReadableTable<&'static str, u64>,
) -> Result<Vec<(JobState, u64)>, StoreError> {
    JobState::ALL
        .into_iter()
        .map(|state| Ok((state, table.get(state.as_str())?.map_or(0, |v| v.value()))))
        .collect()
}

/// Reads a job, or `NotFound`.
fn load(tx: &WriteTransaction, id: Uuid) -> Result<Job, StoreError> {
    find(tx, id)?.ok_or(StoreError::NotFound)
}

/// Reads a job that may have been deleted (with its user) while it ran.
fn find(tx: &WriteTransaction, id: Uuid) -> Result<Option<Job>, StoreError> {
    get(&tx.open_table(tables::JOBS)?, "jobs", id.as_u128())
}

/// Deletes every job of `user_id` in any state, with its index entries, and takes them off the
/// per-state counts, inside the caller's transaction (`Store::delete_user`); returns how many.
pub(super) fn delete_user_jobs_in(tx: &WriteTransaction, user_id: Uuid) -> Result<u64, StoreError> {
    let u = user_id.as_u128();
    let mut by_user = tx.open_table(tables::JOBS_BY_USER)?;
    let ids: Vec<u128> = by_user
        .range((u, 0)..=(u, u128::MAX))?
        .map(|row| row.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    let mut counts = tx.open_table(tables::JOB_COUNTS)?;
    for id in &ids {
        by_user.remove((u, *id))?;
        let Some(job) = find(tx, Uuid::from_u128(*id))? else { continue };
        let (index, at) = match job.state {
            JobState::Queued => (tables::JOBS_QUEUED, job.run_at),
            JobState::Running => (tables::JOBS_RUNNING, job.lease_until.unwrap_or(0)),
            _ => (tables::JOBS_FINISHED, job.finished_at.unwrap_or(0)),
        };
        tx.open_table(index)?.remove((ms(at), *id))?;
        let n = counts.get(job.state.as_str())?.map_or(0, |v| v.value());
        counts.insert(job.state.as_str(), n.saturating_sub(1))?;
        tx.open_table(tables::JOBS)?.remove(*id)?;
    }
    tx.open_table(tables::JOBS_ACTIVE_BY_USER)?.remove(u)?;
    Ok(ids.len() as u64)
}

/// Writes `job` in its new state, moving it between indexes and counts from `old`.
fn save(tx: &WriteTransaction, old: Option<&Job>, job: &Job) -> Result<(), StoreError> {
    let id = job.id.as_u128();
    let mut queued = tx.open_table(tables::JOBS_QUEUED)?;
    let mut running = tx.open_table(tables::JOBS_RUNNING)?;
    let mut finished = tx.open_table(tables::JOBS_FINISHED)?;
    let mut counts = tx.open_table(tables::JOB_COUNTS)?;
    let mut active = tx.open_table(tables::JOBS_ACTIVE_BY_USER)?;
    let user = job.user_id.as_u128();
    if let Some(old) = old {
        match old.state {
            JobState::Queued => queued.remove((ms(old.run_at), id)).map(|_| ())?,
            JobState::Running => {
                running.remove((ms(old.lease_until.unwrap_or(0)), id)).map(|_| ())?
            }
            _ => finished.remove((ms(old.finished_at.unwrap_or(0)), id)).map(|_| ())?,
        }
        let n = counts.get(old.state.as_str())?.map_or(0, |v| v.value());
        counts.insert(old.state.as_str(), n.saturating_sub(1))?;
        if !old.state.is_finished() {
            let n = active.get(user)?.map_or(0, |v| v.value());
            active.insert(user, n.saturating_sub(1))?;
        }
    }
    match job.state {
        JobState::Queued => queued.insert((ms(job.run_at), id), ())?,
        JobState::Running => running.insert((ms(job.lease_until.unwrap_or(0)), id), ())?,
        _ => finished.insert((ms(job.finished_at.unwrap_or(0)), id), ())?,
    };
    let n = counts.get(job.state.as_str())?.map_or(0, |v| v.value());
    counts.insert(job.state.as_str(), n + 1)?;
    if !job.state.is_finished() {
        let n = active.get(user)?.map_or(0, |v| v.value());
        active.insert(user, n + 1)?;
    }
    tx.open_table(tables::JOBS)?.insert(id, encode(job).as_slice())?;
    Ok(())
}

fn count(tx: &WriteTransaction, state: JobState) -> Result<u64, StoreError> {
    Ok(tx.open_table(tables::JOB_COUNTS)?.get(state.as_str())?.map_or(0, |v| v.value()))
}

/// A job waiting for its group commit, and the caps it is checked against.
pub(super) type Enqueue = (Job, QueueLimits);

/// One enqueue inside a transaction: refusals are answers, not errors, and come before any
/// write (the group commit relies on it).
pub(super) fn enqueue_in(
    tx: &redb::WriteTransaction,
    (job, limits): Enqueue,
) -> Result<Result<Job, Refusal>, StoreError> {
    // Authenticated a moment before the user was deleted: store nothing for nobody.
    if tx.open_table(tables::USERS)?.get(job.user_id.as_u128())?.is_none() {
        return Ok(Err(Refusal::UserGone));
    }
    let mine = tx
        .open_table(tables::JOBS_ACTIVE_BY_USER)?
        .get(job.user_id.as_u128())?
        .map_or(0, |v| v.value());
    if mine >= limits.per_user {
        return Ok(Err(Refusal::UserLimit(limits.per_user)));
    }
    if count(tx, JobState::Queued)? + count(tx, JobState::Running)? >= limits.total {
        return Ok(Err(Refusal::QueueFull(limits.total)));
    }
    save(tx, None, &job)?;
    tx.open_table(tables::JOBS_BY_USER)?.insert((job.user_id.as_u128(), job.id.as_u128()), ())?;
    Ok(Ok(job))
}

impl Redb {
    /// Adds jobs in one transaction (group commit), each checked against `limits`; returns
    /// after the commit, one outcome per job in order.
    pub async fn enqueue_jobs(
        &self,
        jobs: Vec<Job>,
        limits: QueueLimits,
    ) -> Result<Vec<Result<Job, Refusal>>, StoreError> {
        self.write(move |tx| jobs.into_iter().map(|job| enqueue_in(tx, (job, limits))).collect())
            .await
    }

    /// Adds a job, checked against `limits`, and returns after the commit; enqueues made at the
    /// same time share that transaction and its fsync (group commit).
    pub async fn enqueue_job(
        &self,
        job: Job,
        limits: QueueLimits,
    ) -> Result<Result<Job, Refusal>, StoreError> {
        self.enqueues.write(self, (job, limits)).await
    }

    /// Takes the queued job due first (run_at ≤ now) for one attempt until `lease_until`.
    pub async fn claim_job(
        &self,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<Job>, StoreError> {
        self.write(move |tx| {
            let first = tx.open_table(tables::JOBS_QUEUED)?.first()?.map(|(k, _)| k.value());
            let Some((run_at, id)) = first.filter(|(run_at, _)| *run_at <= ms(now)) else {
                return Ok(None);
            };
            let _ = run_at;
            let old = load(tx, Uuid::from_u128(id))?;
            let mut job = old.clone();
            job.state = JobState::Running;
            job.attempts += 1;
            job.started_at.get_or_insert(now);
            job.lease_until = Some(lease_until);
            save(tx, Some(&old), &job)?;
            Ok(Some(job))
        })
        .await
    }

    /// When the next queued job becomes due, if any is queued.
    pub fn next_job_due(&self) -> Result<Option<Millis>, StoreError> {
        self.read(|tx| {
            let first = tx.open_table(tables::JOBS_QUEUED)?.first()?.map(|(k, _)| k.value().0);
            Ok(first.map(|t| t as Millis))
        })
    }

    /// Extends the lease of attempt `attempt`; `false` when the job is no longer that attempt's
    /// (cancelled, or rescued after the lease ran out).
    pub async fn renew_lease(
        &self,
        id: Uuid,
        attempt: u32,
        until: Millis,
    ) -> Result<bool, StoreError> {
        self.write(move |tx| {
            let Some(old) = find(tx, id)? else { return Ok(false) };
            if old.state != JobState::Running || old.attempts != attempt {
                return Ok(false);
            }
            let job = Job { lease_until: Some(until), ..old.clone() };
            save(tx, Some(&old), &job)?;
            Ok(true)
        })
        .await
    }

    /// Ends attempt `attempt` as `how`, in one transaction with its conversation turn. Returns
    /// `None` when the job is no longer that attempt's (it was cancelled or rescued): nothing is
    /// written, so a second answer is never stored.
    pub async fn settle_job(
        &self,
        id: Uuid,
        attempt: u32,
        how: Settlement,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        self.write(move |tx| {
            let Some(old) = find(tx, id)? else { return Ok(None) };
            if old.state != JobState::Running || old.attempts != attempt {
                return Ok(None);
            }
            let mut job = Job { lease_until: None, ..old.clone() };
            match how {
                Settlement::Succeeded { turn: Some((target, messages)), result } => {
                    match record_turn_in(tx, job.user_id, target, messages, now) {
                        Ok((c, m)) => job.succeed(result(Some((&c, &m))), now),
                        // Its conversation (or its user) was deleted while it ran: a retry
                        // would fail the same way, so it fails now, once.
                        Err(StoreError::NotFound) => job.fail(CONVERSATION_GONE.into(), now),
                        Err(e) => return Err(e),
                    }
                }
                Settlement::Succeeded { turn: None, result } => job.succeed(result(None), now),
                Settlement::Retry { error, run_at } => job.retry(error, run_at),
                Settlement::Failed { error } => job.fail(error, now),
            }
            save(tx, Some(&old), &job)?;
            Ok(Some(job))
        })
        .await
    }

    /// Cancels the user's job if it is queued or running.
    pub async fn cancel_job(
        &self,
        user_id: Uuid,
        id: Uuid,
        now: Millis,
    ) -> Result<CancelOutcome, StoreError> {
        self.write(move |tx| {
            let old = load(tx, id)?;
            if old.user_id != user_id {
                return Err(StoreError::NotFound);
            }
            if old.state.is_finished() {
                return Ok(CancelOutcome::Finished(old));
            }
            let job = Job {
                state: JobState::Cancelled,
                finished_at: Some(now),
                lease_until: None,
                ..old.clone()
            };
            save(tx, Some(&old), &job)?;
            Ok(CancelOutcome::Cancelled(job))
        })
        .await
    }

    /// Puts back in the queue every running job whose lease ended before `now` (at start, with
    /// `Millis::MAX`: the file lock proves no other process runs them). Returns how many.
    pub async fn rescue_jobs(&self, now: Millis) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let expired: Vec<u128> = tx
                .open_table(tables::JOBS_RUNNING)?
                .range((0, 0)..=(ms(now), u128::MAX))?
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for id in &expired {
                let old = load(tx, Uuid::from_u128(*id))?;
                // It keeps its place in the queue: it was due before the jobs behind it.
                let job = Job { state: JobState::Queued, lease_until: None, ..old.clone() };
                save(tx, Some(&old), &job)?;
            }
            Ok(expired.len())
        })
        .await
    }

    /// Rewrites the request of every queued job with `upgrade` (`None` keeps it), in one
    /// transaction; returns how many changed. The caller owns the request format: this is how
    /// it migrates records queued by an older build before any worker reads them.
    pub async fn upgrade_queued_requests(
        &self,
        upgrade: impl Fn(&Value) -> Option<Value> + Send + 'static,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let queued: Vec<u128> = tx
                .open_table(tables::JOBS_QUEUED)?
                .iter()?
                .map(|row| row.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            let mut changed = 0;
            for id in queued {
                let old = load(tx, Uuid::from_u128(id))?;
                if let Some(request) = upgrade(&old.request) {
                    tx.open_table(tables::JOBS)?
                        .insert(id, encode(&Job { request, ..old }).as_slice())?;
                    changed += 1;
                }
            }
            Ok(changed)
        })
        .await
    }

    /// Deletes up to `batch` jobs that finished before `before`; returns how many.
    pub async fn purge_jobs(&self, before: Millis, batch: usize) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let old: Vec<(u64, u128)> = tx
                .open_table(tables::JOBS_FINISHED)?
                .range((0, 0)..(ms(before), 0))?
                .take(batch)
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            for (finished_at, id) in &old {
                let job = load(tx, Uuid::from_u128(*id))?;
                tx.open_table(tables::JOBS_FINISHED)?.remove((*finished_at, *id))?;
                tx.open_table(tables::JOBS)?.remove(*id)?;
                tx.open_table(tables::JOBS_BY_USER)?.remove((job.user_id.as_u128(), *id))?;
                let mut counts = tx.open_table(tables::JOB_COUNTS)?;
                let n = counts.get(job.state.as_str())?.map_or(0, |v| v.value());
                counts.insert(job.state.as_str(), n.saturating_sub(1))?;
            }
            Ok(old.len())
        })
        .await
    }

    /// The user's job, or `None` (also for another user's).
    pub fn job(&self, user_id: Uuid, id: Uuid) -> Result<Option<Job>, StoreError> {
        self.read(|tx| {
            let job: Option<Job> = get(&tx.open_table(tables::JOBS)?, "jobs", id.as_u128())?;
            Ok(job.filter(|j| j.user_id == user_id))
        })
    }

    /// Up to `limit` of the user's jobs, newest first, older than `before` when given; and
    /// whether more follow.
    pub fn jobs(
        &self,
        user_id: Uuid,
        limit: usize,
        before: Option<Uuid>,
    ) -> Result<(Vec<Job>, bool), StoreError> {
        self.read(|tx| {
            let u = user_id.as_u128();
            let index = tx.open_table(tables::JOBS_BY_USER)?;
            let end = before.map_or(u128::MAX, |b| b.as_u128());
            let rows = match before {
                Some(_) => index.range((u, 0)..(u, end))?,
                None => index.range((u, 0)..=(u, end))?,
            };
            let table = tx.open_table(tables::JOBS)?;
            let mut items = Vec::with_capacity(limit);
            for row in rows.rev() {
                if items.len() == limit {
                    return Ok((items, true));
                }
                let id = row?.0.value().1;
                items.extend(get::<u128, Job>(&table, "jobs", id)?);
            }
            Ok((items, false))
        })
    }

    /// The queue's figures: counts, the oldest wait, what finished since `since`, the running
    /// jobs and the latest failures.
    /// Jobs in each state (one small table: cheap enough for every metrics scrape).
    pub fn job_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        self.read(|tx| counts(&tx.open_table(tables::JOB_COUNTS)?))
    }

    pub fn job_stats(
        &self,
        now: Millis,
        since: Millis,
        recent: usize,
    ) -> Result<JobStats, StoreError> {
        self.read(|tx| {
            let counts = counts(&tx.open_table(tables::JOB_COUNTS)?)?;
            let jobs = tx.open_table(tables::JOBS)?;
            let mut oldest_queued_ms = None;
            for row in tx.open_table(tables::JOBS_QUEUED)?.iter()? {
                let id = row?.0.value().1;
                if let Some(j) = get::<u128, Job>(&jobs, "jobs", id)? {
                    let age = now - j.created_at;
                    oldest_queued_ms = Some(oldest_queued_ms.map_or(age, |o: Millis| o.max(age)));
                }
            }
            let mut running = Vec::new();
            for row in tx.open_table(tables::JOBS_RUNNING)?.iter()? {
                running.extend(get::<u128, Job>(&jobs, "jobs", row?.0.value().1)?);
            }
            let finished = tx.open_table(tables::JOBS_FINISHED)?;
            let (mut finished_in_window, mut failed_in_window) = (0, 0);
            let mut recent_failures = Vec::new();
            for row in finished.range((ms(since), 0)..)?.rev() {
                let Some(j) = get::<u128, Job>(&jobs, "jobs", row?.0.value().1)? else { continue };
                finished_in_window += 1;
                if j.state == JobState::Failed {
                    failed_in_window += 1;
                    if recent_failures.len() < recent {
                        recent_failures.push(j);
                    }
                }
            }
            Ok(JobStats {
                counts,
                oldest_queued_ms,
                finished_in_window,
                failed_in_window,
                running,
                recent_failures,
            })
        })
    }

    /// How many jobs are queued and running (cheap; for metrics and the admin view).
    pub fn job_backlog(&self) -> Result<(u64, u64), StoreError> {
        self.read(|tx| {
            Ok((
                tx.open_table(tables::JOBS_QUEUED)?.len()?,
                tx.open_table(tables::JOBS_RUNNING)?.len()?,
            ))
        })
    }
}
