//! The job queue on PostgreSQL, shared by every replica: a claim takes the due job no other
//! replica holds (`FOR UPDATE SKIP LOCKED`) with a lease; any replica rescues an expired lease;
//! an attempt settles only while the job is still running as that attempt, under its row lock.

use super::conversations::record_turn_in;
use super::{col, exec, one, rows, snapshot, Pg};
use crate::clock::Millis;
use crate::store::group::{answer, answered, Queue};
use crate::store::jobs::CONVERSATION_GONE;
use crate::store::{
    CancelOutcome, Job, JobState, JobStats, QueueLimits, Refusal, Settlement, StoreError,
};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use std::collections::HashMap;
use tokio_postgres::Row;
use uuid::Uuid;

const JOB_COLUMNS: &str = "id, user_id, state, attempts, request, result, error, created_at, \
                           started_at, finished_at, run_at, lease_until";

/// The channel replicas `LISTEN` on: an enqueue (or a retry that is due) notifies it.
pub(super) const CHANNEL: &str = "edgechat_jobs";

fn state_of(name: &str) -> Result<JobState, StoreError> {
    JobState::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| StoreError::Corrupt {
        table: "jobs",
        message: format!("unknown state {name:?}"),
    })
}

fn job_of(row: &Row) -> Result<Job, StoreError> {
    let t = "jobs";
    let attempts: i32 = col(row, t, "attempts")?;
    Ok(Job {
        id: col(row, t, "id")?,
        user_id: col(row, t, "user_id")?,
        state: state_of(col(row, t, "state")?)?,
        attempts: attempts.max(0) as u32,
        request: col(row, t, "request")?,
        result: col(row, t, "result")?,
        error: col(row, t, "error")?,
        created_at: col(row, t, "created_at")?,
        started_at: col(row, t, "started_at")?,
        finished_at: col(row, t, "finished_at")?,
        run_at: col(row, t, "run_at")?,
        lease_until: col(row, t, "lease_until")?,
    })
}

/// Writes `job`'s mutable fields (its id, user, request and creation never change).
async fn save<C: GenericClient>(c: &C, job: &Job) -> Result<(), StoreError> {
    exec(
        c,
        "UPDATE jobs SET state = $2, attempts = $3, result = $4, error = $5, started_at = $6,
                         finished_at = $7, run_at = $8, lease_until = $9
         WHERE id = $1",
        &[
            &job.id,
            &job.state.as_str(),
            &(job.attempts as i32),
            &job.result,
            &job.error,
            &job.started_at,
            &job.finished_at,
            &job.run_at,
            &job.lease_until,
        ],
    )
    .await?;
    Ok(())
}

/// Job rows as they are, in one statement however many (enqueue batches, `store copy`).
pub(in crate::store) async fn insert_jobs<C: GenericClient>(
    c: &C,
    jobs: &[Job],
) -> Result<(), StoreError> {
    let column = |f: &dyn Fn(&Job) -> Option<i64>| jobs.iter().map(f).collect::<Vec<_>>();
    exec(
        c,
        "INSERT INTO jobs (id, user_id, state, attempts, request, result, error, created_at,
                           started_at, finished_at, run_at, lease_until)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::jsonb[],
                              $6::jsonb[], $7::text[], $8::int8[], $9::int8[], $10::int8[],
                              $11::int8[], $12::int8[])",
        &[
            &jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            &jobs.iter().map(|j| j.user_id).collect::<Vec<_>>(),
            &jobs.iter().map(|j| j.state.as_str()).collect::<Vec<_>>(),
            &jobs.iter().map(|j| j.attempts as i32).collect::<Vec<_>>(),
            &jobs.iter().map(|j| &j.request).collect::<Vec<_>>(),
            &jobs.iter().map(|j| j.result.as_ref()).collect::<Vec<_>>(),
            &jobs.iter().map(|j| j.error.as_deref()).collect::<Vec<_>>(),
            &column(&|j| Some(j.created_at)),
            &column(&|j| j.started_at),
            &column(&|j| j.finished_at),
            &column(&|j| Some(j.run_at)),
            &column(&|j| j.lease_until),
        ],
    )
    .await
    .map(|_| ())
}

/// The job under its row lock, if it still exists.
async fn locked<C: GenericClient>(c: &C, id: Uuid) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE");
    one(c, &sql, &[&id]).await?.as_ref().map(job_of).transpose()
}

/// Which jobs of a batch may be stored, in the order redb checks: the user exists, is under
/// their cap, the queue under its own. `users` are the batch's users with their unfinished
/// counts, read under their row locks (so the per-user cap is exact across replicas); `total`
/// is the queue's count as the batch began: another replica's batch committing meanwhile may
/// pass the total cap by its size.
fn admit(
    jobs: Vec<(Job, QueueLimits)>,
    users: &mut HashMap<Uuid, i64>,
    mut total: u64,
) -> Vec<Result<Job, Refusal>> {
    let mut out = Vec::with_capacity(jobs.len());
    for (job, limits) in jobs {
        let outcome = match users.get_mut(&job.user_id) {
            None => Err(Refusal::UserGone),
            Some(n) if *n >= limits.per_user as i64 => Err(Refusal::UserLimit(limits.per_user)),
            Some(_) if total >= limits.total => Err(Refusal::QueueFull(limits.total)),
            Some(n) => {
                *n += 1;
                total += 1;
                Ok(())
            }
        };
        out.push(outcome.map(|()| job));
    }
    out
}

/// Moves the queue's unfinished count by `delta` (on a shard picked at random, so that
/// concurrent transactions seldom wait for each other's row).
async fn count_active<C: GenericClient>(c: &C, delta: i64) -> Result<(), StoreError> {
    let shard = (rand::random::<u8>() % 16) as i16;
    exec(c, "UPDATE job_totals SET active = active + $2 WHERE shard = $1", &[&shard, &delta])
        .await?;
    Ok(())
}

/// `job` has just finished (it was queued or running): its user and the queue count one
/// unfinished job fewer.
async fn count_finished<C: GenericClient>(c: &C, job: &Job) -> Result<(), StoreError> {
    let sql = "UPDATE users SET active_jobs = greatest(active_jobs - 1, 0) WHERE id = $1";
    exec(c, sql, &[&job.user_id]).await?;
    count_active(c, -1).await
}

/// Deletes every job of `user` (their account is going), taking their unfinished ones off the
/// queue's count; returns how many.
pub(super) async fn delete_user_jobs<C: GenericClient>(
    c: &C,
    user: Uuid,
) -> Result<u64, StoreError> {
    let sql = "SELECT active_jobs FROM users WHERE id = $1";
    let active: i32 = one(c, sql, &[&user]).await?.map_or(0, |r| r.get(0));
    count_active(c, -(active as i64)).await?;
    exec(c, "DELETE FROM jobs WHERE user_id = $1", &[&user]).await
}

/// Sets every count from the jobs themselves (after `store copy` wrote them as they were).
pub(super) async fn recount<C: GenericClient>(c: &C) -> Result<(), StoreError> {
    c.batch_execute(
        "UPDATE users u SET active_jobs = (SELECT count(*) FROM jobs j
             WHERE j.user_id = u.id AND j.state IN ('queued', 'running'));
         UPDATE job_totals SET active = 0;
         UPDATE job_totals SET active = (SELECT count(*) FROM jobs
             WHERE state IN ('queued', 'running')) WHERE shard = 0;",
    )
    .await?;
    Ok(())
}

/// Enqueues waiting for their group commit.
pub(super) type Enqueues = Queue<(Job, QueueLimits), Result<Job, Refusal>>;

impl Pg {
    /// Adds a job, checked against `limits`, and returns after the commit; enqueues arriving
    /// meanwhile share the next transaction (and its WAL flush), as redb's group commit does.
    pub(in crate::store) async fn enqueue_job(
        &self,
        job: Job,
        limits: QueueLimits,
    ) -> Result<Result<Job, Refusal>, StoreError> {
        let (rx, lead) = self.enqueues.push((job, limits));
        if lead {
            let pg = self.clone();
            tokio::spawn(async move { pg.drain_enqueues().await });
        }
        answered(rx).await
    }

    /// Commits batches of waiting enqueues until none is left.
    async fn drain_enqueues(&self) {
        let _guard = self.enqueues.draining();
        while let Some((items, answers)) = self.enqueues.next_batch() {
            let outcome = self.enqueue_jobs(items).await;
            answer(answers, outcome.map(|all| all.into_iter().map(Ok).collect()));
        }
    }

    /// Stores each job checked against its limits, all in one transaction of a few
    /// statements however many jobs; one outcome per job, in order. A refusal writes nothing
    /// for that job and spares the others.
    pub(in crate::store) async fn enqueue_jobs(
        &self,
        jobs: Vec<(Job, QueueLimits)>,
    ) -> Result<Vec<Result<Job, Refusal>>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut ids: Vec<Uuid> = jobs.iter().map(|(j, _)| j.user_id).collect();
        ids.sort();
        ids.dedup();
        // Locked in id order: two replicas' batches never wait for each other in a cycle.
        let sql = "SELECT id, active_jobs FROM users WHERE id = ANY($1) ORDER BY id
                   FOR NO KEY UPDATE";
        let mut users = HashMap::new();
        for row in rows(&tx, sql, &[&ids]).await? {
            let n: i32 = col(&row, "users", "active_jobs")?;
            users.insert(col::<Uuid>(&row, "users", "id")?, n as i64);
        }
        let row = one(&tx, "SELECT sum(active)::bigint FROM job_totals", &[]).await?;
        let total = row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0).max(0) as u64;
        let out = admit(jobs, &mut users, total);
        let stored: Vec<Job> = out.iter().filter_map(|o| o.as_ref().ok().cloned()).collect();
        if !stored.is_empty() {
            insert_jobs(&tx, &stored).await?;
            let mut added: HashMap<Uuid, i32> = HashMap::new();
            stored.iter().for_each(|j| *added.entry(j.user_id).or_default() += 1);
            let (ids, ns): (Vec<Uuid>, Vec<i32>) = added.into_iter().unzip();
            exec(
                &tx,
                "UPDATE users u SET active_jobs = u.active_jobs + d.n
                 FROM unnest($1::uuid[], $2::int[]) AS d(id, n) WHERE u.id = d.id",
                &[&ids, &ns],
            )
            .await?;
            count_active(&tx, stored.len() as i64).await?;
            exec(&tx, "SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(in crate::store) async fn claim_job(
        &self,
        now: Millis,
        lease_until: Millis,
    ) -> Result<Option<Job>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1,
                             started_at = coalesce(started_at, $1), lease_until = $2
             WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= $1
                         ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        );
        one(&client, &sql, &[&now, &lease_until]).await?.as_ref().map(job_of).transpose()
    }

    pub(in crate::store) async fn next_job_due(&self) -> Result<Option<Millis>, StoreError> {
        let client = self.client().await?;
        let row = one(&client, "SELECT min(run_at) FROM jobs WHERE state = 'queued'", &[]).await?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    pub(in crate::store) async fn renew_lease(
        &self,
        id: Uuid,
        attempt: u32,
        until: Millis,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = exec(
            &client,
            "UPDATE jobs SET lease_until = $3 WHERE id = $1 AND state = 'running' AND attempts = $2",
            &[&id, &(attempt as i32), &until],
        )
        .await?;
        Ok(n == 1)
    }

    pub(in crate::store) async fn settle_job(
        &self,
        id: Uuid,
        attempt: u32,
        how: Settlement,
        now: Millis,
    ) -> Result<Option<Job>, StoreError> {
        let mut client = self.client().await?;
        let mut tx = client.transaction().await?;
        let Some(old) = locked(&tx, id).await? else { return Ok(None) };
        if old.state != JobState::Running || old.attempts != attempt {
            return Ok(None);
        }
        let mut job = Job { lease_until: None, ..old };
        match how {
            Settlement::Succeeded { turn: Some((target, messages)), result } => {
                // A savepoint: a turn refused for a conversation deleted meanwhile must not
                // abort the job's own update.
                let sp = tx.savepoint("turn").await?;
                match record_turn_in(&sp, job.user_id, target, messages, now).await {
                    Ok((c, m)) => {
                        sp.commit().await?;
                        job.succeed(result(Some((&c, &m))), now);
                    }
                    Err(StoreError::NotFound) => {
                        sp.rollback().await?;
                        job.fail(CONVERSATION_GONE.into(), now);
                    }
                    Err(e) => return Err(e),
                }
            }
            Settlement::Succeeded { turn: None, result } => job.succeed(result(None), now),
            Settlement::Retry { error, run_at } => job.retry(error, run_at),
            Settlement::Failed { error } => job.fail(error, now),
        }
        save(&tx, &job).await?;
        if job.state.is_finished() {
            count_finished(&tx, &job).await?;
        }
        tx.commit().await?;
        Ok(Some(job))
    }

    pub(in crate::store) async fn cancel_job(
        &self,
        user_id: Uuid,
        id: Uuid,
        now: Millis,
    ) -> Result<CancelOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let old = locked(&tx, id).await?.filter(|j| j.user_id == user_id);
        let old = old.ok_or(StoreError::NotFound)?;
        if old.state.is_finished() {
            return Ok(CancelOutcome::Finished(old));
        }
        let job =
            Job { state: JobState::Cancelled, finished_at: Some(now), lease_until: None, ..old };
        save(&tx, &job).await?;
        count_finished(&tx, &job).await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled(job))
    }

    pub(in crate::store) async fn rescue_jobs(&self, now: Millis) -> Result<usize, StoreError> {
        let client = self.client().await?;
        // Jobs another replica is settling right now are skipped: their lease is its business.
        let n = exec(
            &client,
            "UPDATE jobs SET state = 'queued', lease_until = NULL
             WHERE id IN (SELECT id FROM jobs WHERE state = 'running' AND lease_until <= $1
                          FOR UPDATE SKIP LOCKED)",
            &[&now],
        )
        .await?;
        if n > 0 {
            exec(&client, "SELECT pg_notify($1, '')", &[&CHANNEL]).await?;
        }
        Ok(n as usize)
    }

    pub(in crate::store) async fn upgrade_queued_requests(
        &self,
        upgrade: impl Fn(&Value) -> Option<Value> + Send + 'static,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let queued = rows(
            &tx,
            "SELECT id, request FROM jobs WHERE state = 'queued' FOR UPDATE SKIP LOCKED",
            &[],
        )
        .await?;
        let mut changed = 0;
        for row in &queued {
            let (id, request): (Uuid, Value) =
                (col(row, "jobs", "id")?, col(row, "jobs", "request")?);
            if let Some(request) = upgrade(&request) {
                exec(&tx, "UPDATE jobs SET request = $2 WHERE id = $1", &[&id, &request]).await?;
                changed += 1;
            }
        }
        tx.commit().await?;
        Ok(changed)
    }

    pub(in crate::store) async fn purge_jobs(
        &self,
        before: Millis,
        batch: usize,
    ) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let n = exec(
            &client,
            "DELETE FROM jobs WHERE id IN
                 (SELECT id FROM jobs
                  WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1
                  ORDER BY finished_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&before, &(batch as i64)],
        )
        .await?;
        Ok(n as usize)
    }

    pub(in crate::store) async fn job(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> Result<Option<Job>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND user_id = $2");
        one(&client, &sql, &[&id, &user_id]).await?.as_ref().map(job_of).transpose()
    }

    pub(in crate::store) async fn jobs(
        &self,
        user_id: Uuid,
        limit: usize,
        before: Option<Uuid>,
    ) -> Result<(Vec<Job>, bool), StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE user_id = $1 AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        );
        let found = rows(&client, &sql, &[&user_id, &before, &(limit as i64 + 1)]).await?;
        let mut items = found.iter().map(job_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > limit;
        items.truncate(limit);
        Ok((items, more))
    }

    pub(in crate::store) async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let client = self.client().await?;
        counts(&client).await
    }

    pub(in crate::store) async fn job_stats(
        &self,
        now: Millis,
        since: Millis,
        recent: usize,
    ) -> Result<JobStats, StoreError> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let counts = counts(&tx).await?;
        let oldest =
            one(&tx, "SELECT min(created_at) FROM jobs WHERE state = 'queued'", &[]).await?;
        let oldest_queued_ms = oldest.and_then(|r| r.get::<_, Option<i64>>(0)).map(|t| now - t);
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'running' ORDER BY lease_until, id"
        );
        let running = rows(&tx, &sql, &[]).await?.iter().map(job_of).collect::<Result<_, _>>()?;
        let window = one(
            &tx,
            "SELECT count(*) AS finished, count(*) FILTER (WHERE state = 'failed') AS failed
             FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= $1",
            &[&since],
        )
        .await?
        .ok_or_else(|| StoreError::Db("count returned no row".into()))?;
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'failed' AND finished_at >= $1
             ORDER BY finished_at DESC, id DESC LIMIT $2"
        );
        let recent_failures = rows(&tx, &sql, &[&since, &(recent as i64)]).await?;
        let recent_failures = recent_failures.iter().map(job_of).collect::<Result<_, _>>()?;
        tx.commit().await?;
        Ok(JobStats {
            counts,
            oldest_queued_ms,
            finished_in_window: col::<i64>(&window, "jobs", "finished")?.max(0) as u64,
            failed_in_window: col::<i64>(&window, "jobs", "failed")?.max(0) as u64,
            running,
            recent_failures,
        })
    }

    pub(in crate::store) async fn job_backlog(&self) -> Result<(u64, u64), StoreError> {
        let counts = self.job_counts().await?;
        let of = |s| counts.iter().find(|(state, _)| *state == s).map_or(0, |(_, n)| *n);
        Ok((of(JobState::Queued), of(JobState::Running)))
    }
}

/// Jobs in each state, every state listed.
async fn counts<C: GenericClient>(c: &C) -> Result<Vec<(JobState, u64)>, StoreError> {
    let found = rows(c, "SELECT state, count(*) AS n FROM jobs GROUP BY state", &[]).await?;
    let mut out: Vec<(JobState, u64)> = JobState::ALL.into_iter().map(|s| (s, 0)).collect();
    for row in &found {
        let state = state_of(col(row, "jobs", "state")?)?;
        let n: i64 = col(row, "jobs", "n")?;
        if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
            slot.1 = n.max(0) as u64;
        }
    }
    Ok(out)
}
