//! Group commit: writes that arrive while another commit is under way wait for it, then go
//! together in the next transaction, so that N concurrent writers pay one fsync, not N. The
//! first writer to find no commit running starts one (on the blocking pool for redb, in a
//! task for PostgreSQL's enqueues); that commit keeps taking what queued meanwhile until the
//! queue is empty. Each writer is answered only after
//! the commit that holds its write, so "acknowledged" still means "durable"; a writer that
//! stops waiting (its client left) does not stop the commit.

use super::{Redb, StoreError};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// Writes one transaction holds at most (bounds the time a commit keeps the write lock).
const MAX_BATCH: usize = 256;

/// Applies one queued item inside the batch's transaction. It must fail, if at all, before it
/// writes anything — except with a storage failure, which aborts the whole batch — so that
/// one item's refusal (`NotFound`, `Conflict`) leaves the others' writes intact.
pub(super) type Apply<I, O> = fn(&redb::WriteTransaction, I) -> Result<O, StoreError>;

/// Where a queued write's outcome goes.
pub(super) type Answer<O> = oneshot::Sender<Result<O, StoreError>>;

type Waiter<I, O> = (I, Answer<O>);

/// Writers waiting for the next commit, and whether a commit is draining them: the part of
/// group commit both backends share (redb drains on the blocking pool, PostgreSQL in a task).
pub(super) struct Queue<I, O> {
    lane: Mutex<Lane<I, O>>,
}

struct Lane<I, O> {
    waiting: Vec<Waiter<I, O>>,
    committing: bool,
}

impl<I, O> Queue<I, O> {
    pub(super) fn new() -> Queue<I, O> {
        Queue { lane: Mutex::new(Lane { waiting: Vec::new(), committing: false }) }
    }

    fn lane(&self) -> std::sync::MutexGuard<'_, Lane<I, O>> {
        self.lane.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`: its answer, and whether the caller must start draining (no commit is).
    pub(super) fn push(&self, item: I) -> (oneshot::Receiver<Result<O, StoreError>>, bool) {
        let (tx, rx) = oneshot::channel();
        let mut lane = self.lane();
        lane.waiting.push((item, tx));
        (rx, !std::mem::replace(&mut lane.committing, true))
    }

    /// The next batch to commit (at most `MAX_BATCH`), or `None` once nothing waits: the
    /// drain ends and the next write leads a new one.
    pub(super) fn next_batch(&self) -> Option<(Vec<I>, Vec<Answer<O>>)> {
        let mut lane = self.lane();
        if lane.waiting.is_empty() {
            lane.committing = false;
            return None;
        }
        let n = lane.waiting.len().min(MAX_BATCH);
        Some(lane.waiting.drain(..n).unzip())
    }

    /// Held by a drain: should it panic, every waiter is answered with an error (its sender
    /// drops) and the next write leads a new drain, so no writer waits forever.
    pub(super) fn draining(&self) -> Draining<'_, I, O> {
        Draining(self)
    }
}

/// See `Queue::draining`.
pub(super) struct Draining<'a, I, O>(&'a Queue<I, O>);

impl<I, O> Drop for Draining<'_, I, O> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut lane = self.0.lane();
            lane.waiting.clear();
            lane.committing = false;
        }
    }
}

/// Sends each writer its outcome, or every writer the batch's failure.
pub(super) fn answer<O>(
    answers: Vec<Answer<O>>,
    outcome: Result<Vec<Result<O, StoreError>>, StoreError>,
) {
    match outcome {
        Ok(outcomes) => answers.into_iter().zip(outcomes).for_each(|(a, o)| {
            let _ = a.send(o);
        }),
        Err(e) => answers.into_iter().for_each(|a| {
            let _ = a.send(Err(e.clone()));
        }),
    }
}

/// Awaits a queued write's answer.
pub(super) async fn answered<O>(
    rx: oneshot::Receiver<Result<O, StoreError>>,
) -> Result<O, StoreError> {
    rx.await.map_err(|_| StoreError::Db("the group commit ended without an answer".into()))?
}

/// One kind of grouped redb write: its queue, and how each item is applied.
pub(super) struct Group<I, O> {
    apply: Apply<I, O>,
    queue: Queue<I, O>,
}

impl<I: Send + 'static, O: Send + 'static> Group<I, O> {
    /// A group that applies each queued item with `apply`.
    pub(super) fn new(apply: Apply<I, O>) -> Arc<Group<I, O>> {
        Arc::new(Group { apply, queue: Queue::new() })
    }

    /// Queues `item` and resolves after the commit that holds it.
    pub(super) async fn write(self: &Arc<Self>, store: &Redb, item: I) -> Result<O, StoreError> {
        let (rx, lead) = self.queue.push(item);
        if lead {
            let (group, store) = (self.clone(), store.clone());
            tokio::task::spawn_blocking(move || group.drain(&store));
        }
        answered(rx).await
    }

    /// Commits batches until nothing is waiting (runs on the blocking pool).
    fn drain(&self, store: &Redb) {
        let _guard = self.queue.draining();
        while let Some((items, answers)) = self.queue.next_batch() {
            answer(answers, store.write_now(|tx| self.apply_all(tx, items)));
        }
    }

    /// Every item's outcome; a storage failure aborts the batch (nothing of it is kept).
    fn apply_all(
        &self,
        tx: &redb::WriteTransaction,
        items: Vec<I>,
    ) -> Result<Vec<Result<O, StoreError>>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match (self.apply)(tx, item) {
                Err(e) if e.is_storage_failure() => return Err(e),
                outcome => out.push(outcome),
            }
        }
        Ok(out)
    }
}
