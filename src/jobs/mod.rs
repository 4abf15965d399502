//! Background chat, durable in the redb file: the replacement for Celery, Redis and Flower.
//!
//! - Enqueue commits before it returns (so `202` means stored); concurrent enqueues share one
//!   write transaction (group commit) instead of paying one fsync each.
//! - Workers claim the job due first with a lease, renew it while they run, and settle the
//!   attempt — result, conversation turn and final state — in one transaction that first
//!   checks the attempt still owns the job. A retried or rescued job therefore never stores a
//!   second answer (at-least-once execution, exactly-once effect).
//! - Every job found running at start is queued again: redb's file lock means no other process
//!   was running it. Leases that expire while we run are rescued the same way.
//! - Cancelling a queued job is one write; a running one also has its generation or upstream
//!   request dropped at once, and its late result is discarded by the ownership check.

mod record;

pub use record::{JobAnswer, JobRequest};

use crate::chat::{turn, Chat, ChatError, ChatInput};
use crate::clock::{now_ms, Millis};
use crate::config::JobsConfig;
use crate::metrics;
use crate::store::{
    CancelOutcome, Job, JobStats, QueueLimits, Refusal, Settlement, Store, StoreError,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

/// Enqueues gathered into one transaction at most.
/// Finished jobs deleted per retention transaction.
const PURGE_BATCH: usize = 500;
/// While the store refuses writes, workers look again after these waits (doubling), and at
/// once when it lets writes in again.
const PAUSE_FIRST: Duration = Duration::from_secs(1);
const PAUSE_MAX: Duration = Duration::from_secs(30);

/// Why a job could not be accepted or changed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("you already have {0} jobs queued or running; wait for some to finish")]
    UserLimit(u32),
    #[error("the job queue is full ({0} jobs); retry later")]
    QueueFull(u64),
    #[error("task not found")]
    NotFound,
    /// The job had already finished; it is returned unchanged.
    #[error("the task has already finished")]
    Finished(Box<Job>),
    #[error("your account no longer exists")]
    UserGone,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The job service; `Jobs::start` runs its workers until `shutdown`.
pub struct Jobs {
    store: Store,
    chat: Arc<Chat>,
    config: JobsConfig,
    wake: Notify,
    /// Running attempts' cancel signals.
    running: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Set once at shutdown. Loops stop at their next wait; store calls are never dropped
    /// half-way (their blocking write would outlive the task and keep the file open).
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Workers are waiting for the store to take writes again (logged once per pause).
    paused: AtomicBool,
}

/// Resolves once `stop` is set.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Jobs {
    /// Requeues what a previous process left running, then starts the workers and the
    /// housekeeping task.
    pub async fn start(
        store: Store,
        chat: Arc<Chat>,
        config: JobsConfig,
    ) -> Result<Arc<Jobs>, StoreError> {
        let rescued = store.rescue_orphaned_jobs(now_ms()).await?;
        if rescued > 0 {
            tracing::info!(rescued, "requeued jobs no process runs any more");
        }
        let upgraded = store.upgrade_queued_requests(JobRequest::upgrade).await?;
        if upgraded > 0 {
            tracing::info!(upgraded, "queued jobs' requests upgraded to the current record");
        }
        let jobs = Arc::new(Jobs {
            store,
            chat,
            config,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
        });
        let mut tasks = Vec::new();
        for _ in 0..jobs.config.workers {
            tasks.push(tokio::spawn(jobs.clone().work()));
        }
        if let Some(signals) = jobs.store.job_signals() {
            tasks.push(tokio::spawn(jobs.clone().listen(signals)));
        }
        tasks.push(tokio::spawn(jobs.clone().housekeeping()));
        *jobs.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(jobs)
    }

    /// Stops the workers (their running attempts are dropped; the next start requeues them)
    /// and returns once no task of the service touches the store any more.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stores a job for `input` and returns it once committed (concurrent enqueues share one
    /// commit: the store groups them).
    pub async fn enqueue(&self, input: &ChatInput) -> Result<Job, JobError> {
        let user = input.user;
        let body = serde_json::to_value(JobRequest::of(input)).expect("records serialize");
        let limits = QueueLimits {
            per_user: self.config.max_queued_per_user,
            total: self.config.max_queued,
        };
        let job = self.store.enqueue_job(Job::new(user, body, now_ms()), limits).await?;
        let job = job.map_err(|r| match r {
            Refusal::UserLimit(n) => JobError::UserLimit(n),
            Refusal::QueueFull(n) => JobError::QueueFull(n),
            Refusal::UserGone => JobError::UserGone,
        })?;
        self.wake.notify_one();
        Ok(job)
    }

    /// The user's job.
    pub async fn get(&self, user: Uuid, id: Uuid) -> Result<Job, JobError> {
        self.store.job(user, id).await?.ok_or(JobError::NotFound)
    }

    /// A page of the user's jobs, newest first, and whether more follow.
    pub async fn list(
        &self,
        user: Uuid,
        limit: usize,
        before: Option<Uuid>,
    ) -> Result<(Vec<Job>, bool), JobError> {
        Ok(self.store.jobs(user, limit, before).await?)
    }

    /// Cancels the user's queued or running job.
    pub async fn cancel(&self, user: Uuid, id: Uuid) -> Result<Job, JobError> {
        match self.store.cancel_job(user, id, now_ms()).await {
            Ok(CancelOutcome::Cancelled(job)) => {
                metrics::job_finished("cancelled");
                let signal =
                    self.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
                if let Some(signal) = signal {
                    signal.notify_one();
                }
                Ok(job)
            }
            Ok(CancelOutcome::Finished(job)) => Err(JobError::Finished(Box::new(job))),
            Err(StoreError::NotFound) => Err(JobError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// The queue's figures over the last `window`.
    pub async fn stats(&self, window: Duration) -> Result<JobStats, JobError> {
        let now = now_ms();
        Ok(self.store.job_stats(now, now - window.as_millis() as Millis, 20).await?)
    }

    /// One worker: claim, run, settle; sleep until woken or the next job is due.
    async fn work(self: Arc<Self>) {
        let lease = Duration::from_secs(self.config.lease_secs).as_millis() as Millis;
        let mut pause = PAUSE_FIRST;
        while !*self.stop.borrow() {
            let now = now_ms();
            let claimed = self.store.claim_job(now, now + lease).await;
            if claimed.is_ok() {
                pause = PAUSE_FIRST;
                if self.paused.swap(false, Ordering::AcqRel) {
                    tracing::info!("job workers resumed: storage takes writes again");
                }
            }
            match claimed {
                Ok(Some(job)) => {
                    // Every line logged while the job runs (a fallback, a retry) names it.
                    let span = tracing::info_span!("job", job = %job.id);
                    self.run(job).instrument(span).await
                }
                Err(e) if e.is_unavailable() => self.pause(&e, &mut pause).await,
                Ok(None) => {
                    // Woken by enqueues: in process, and from other replicas by `listen`; the
                    // cap is a safety net, long where notifications cross processes.
                    let cap = if self.store.is_shared() { 30_000 } else { 1_000 };
                    let due = self.store.next_job_due().await.ok().flatten();
                    let wait = due.map_or(cap, |t| (t - now_ms()).clamp(10, cap));
                    let sleep = tokio::time::sleep(Duration::from_millis(wait as u64));
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = sleep => {}
                        _ = stopped(self.stop.subscribe()) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming a job failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Wakes an idle worker whenever another replica enqueues or rescues a job (and after the
    /// listening connection came back, as one may have been missed), until shutdown.
    async fn listen(self: Arc<Self>, mut signals: crate::store::JobSignals) {
        loop {
            tokio::select! {
                _ = signals.next() => self.wake.notify_one(),
                _ = stopped(self.stop.subscribe()) => return,
            }
        }
    }

    /// Waits while the store refuses writes (a full disk): until it takes them again, or
    /// `pause` at most (doubling up to `PAUSE_MAX`: a backstop, not a poll), or shutdown. One
    /// log line per pause for the whole service, not one per worker or attempt.
    async fn pause(&self, e: &StoreError, pause: &mut Duration) {
        if !self.paused.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %e, "job workers paused until storage takes writes again");
        }
        tokio::select! {
            _ = self.store.writable_again() => {}
            _ = tokio::time::sleep(*pause) => {}
            _ = stopped(self.stop.subscribe()) => return,
        }
        *pause = (*pause * 2).min(PAUSE_MAX);
        // Whatever woke us, never retry in a tight loop.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Runs one attempt to its end, its cancellation, the loss of its lease, or shutdown.
    async fn run(&self, job: Job) {
        let signal = Arc::new(Notify::new());
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(job.id, signal.clone());
        let outcome = self.supervise(&job, &signal).await;
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.id);
        if let Some(how) = outcome {
            match self.store.settle_job(job.id, job.attempts, how, now_ms()).await {
                Ok(Some(done)) => {
                    match done.state.is_finished() {
                        true => metrics::job_finished(done.state.as_str()),
                        false => metrics::job_retried(),
                    }
                    tracing::info!(job = %job.id, state = done.state.as_str(), attempts = done.attempts, "job settled")
                }
                Ok(None) => {
                    tracing::info!(job = %job.id, "job changed while it ran; result discarded")
                }
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "settling a job failed; it will be retried")
                }
            }
        }
        // A retry may be due at once, and a finished job frees a slot: look again.
        self.wake.notify_one();
    }

    /// Drives the attempt, renewing its lease at a third of its length; `None` when it was
    /// cancelled, lost its lease, or the service is stopping.
    async fn supervise(&self, job: &Job, cancel: &Notify) -> Option<Settlement> {
        let lease = Duration::from_secs(self.config.lease_secs);
        let attempt = self.attempt(job);
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                settled = &mut attempt => return Some(settled),
                _ = cancel.notified() => return None,
                _ = stopped(self.stop.subscribe()) => return None,
                _ = tokio::time::sleep(lease / 3) => {}
            }
            let until = now_ms() + lease.as_millis() as Millis;
            match self.store.renew_lease(job.id, job.attempts, until).await {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) if e.is_unavailable() => {
                    tracing::debug!(job = %job.id, error = %e, "renewing a lease failed")
                }
                Err(e) => tracing::warn!(job = %job.id, error = %e, "renewing a lease failed"),
            }
        }
    }

    /// Runs the chat and says how the attempt ended.
    async fn attempt(&self, job: &Job) -> Settlement {
        let Some(input) = JobRequest::read(&job.request).map(|r| r.input(job.user_id)) else {
            return Settlement::Failed {
                error: "the stored request is not a valid chat request".into(),
            };
        };
        match self.chat.complete_unsaved(&input).await {
            Ok((who, done)) => Settlement::Succeeded {
                turn: turn(&input, &who, &done),
                result: Box::new(move |stored| {
                    let mut done = done;
                    if let Some((conv, messages)) = stored {
                        done.conversation_id = Some(conv.id);
                        done.message_id = messages.last().map(|m| m.id);
                    }
                    serde_json::to_value(JobAnswer::new(&who, &done)).expect("answers serialize")
                }),
            },
            Err(e) if retryable(&e) && job.attempts < self.config.max_attempts => {
                let delay = backoff(&self.config, job.attempts);
                Settlement::Retry { error: e.to_string(), run_at: now_ms() + delay }
            }
            Err(e) => Settlement::Failed { error: e.to_string() },
        }
    }

    /// Rescues expired leases and deletes old finished jobs, in small transactions; skips its
    /// turn while the store refuses writes (the store logged that once).
    async fn housekeeping(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.lease_secs.clamp(1, 60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopped(self.stop.subscribe()) => return,
            }
            if self.store.writable().is_err() {
                continue;
            }
            match self.store.rescue_jobs(now_ms()).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(rescued = n, "requeued jobs whose lease expired");
                    self.wake.notify_waiters();
                }
                Err(e) => tracing::error!(error = %e, "rescuing jobs failed"),
            }
            let before = now_ms() - (self.config.retention_secs as Millis).saturating_mul(1000);
            loop {
                match self.store.purge_jobs(before, PURGE_BATCH).await {
                    Ok(n) if n == PURGE_BATCH => tokio::task::yield_now().await,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "purging old jobs failed");
                        break;
                    }
                }
            }
        }
    }
}

/// Failures that may pass: a provider or the local model that cannot answer now.
fn retryable(e: &ChatError) -> bool {
    matches!(
        e,
        ChatError::Upstream { .. }
            | ChatError::Unavailable { .. }
            | ChatError::Busy
            | ChatError::Store(_)
    )
}

/// Exponential backoff with full jitter after `attempts` attempts, in ms.
fn backoff(c: &JobsConfig, attempts: u32) -> Millis {
    let exp =
        c.retry_base_ms.saturating_mul(1 << attempts.saturating_sub(1).min(20)).min(c.retry_max_ms);
    (exp as f64 * (0.5 + rand::random::<f64>() / 2.0)) as Millis
}
