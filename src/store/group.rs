//! Group commit: writes that arrive while another commit is under way wait for it, then go
//! together in the next transaction, so that N concurrent writers pay one fsync, not N. The
//! first writer to find no commit running starts one on the blocking pool; that commit keeps
//! taking what queued meanwhile until the queue is empty. Each writer is answered only after
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

type Waiter<I, O> = (I, oneshot::Sender<Result<O, StoreError>>);

/// One kind of grouped write: its queue and whether a commit is draining it.
pub(super) struct Group<I, O> {
    apply: Apply<I, O>,
    lane: Mutex<Lane<I, O>>,
}

struct Lane<I, O> {
    waiting: Vec<Waiter<I, O>>,
    committing: bool,
}

impl<I: Send + 'static, O: Send + 'static> Group<I, O> {
    /// A group that applies each queued item with `apply`.
    pub(super) fn new(apply: Apply<I, O>) -> Arc<Group<I, O>> {
        let lane = Mutex::new(Lane { waiting: Vec::new(), committing: false });
        Arc::new(Group { apply, lane })
    }

    fn lane(&self) -> std::sync::MutexGuard<'_, Lane<I, O>> {
        self.lane.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` and resolves after the commit that holds it.
    pub(super) async fn write(self: &Arc<Self>, store: &Redb, item: I) -> Result<O, StoreError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut lane = self.lane();
            lane.waiting.push((item, tx));
            !std::mem::replace(&mut lane.committing, true)
        };
        if lead {
            let (group, store) = (self.clone(), store.clone());
            tokio::task::spawn_blocking(move || group.drain(&store));
        }
        rx.await.map_err(|_| StoreError::Db("the group commit ended without an answer".into()))?
    }

    /// Commits batches until nothing is waiting (runs on the blocking pool).
    fn drain(&self, store: &Redb) {
        // Should an item panic, no writer may wait forever: the batch's waiters and those queued
        // behind it are answered with an error (their senders drop), and the next write leads
        // a new commit.
        struct Reopen<'a, I, O>(&'a Group<I, O>);
        impl<I, O> Drop for Reopen<'_, I, O> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let mut lane = self.0.lane.lock().unwrap_or_else(PoisonError::into_inner);
                    lane.waiting.clear();
                    lane.committing = false;
                }
            }
        }
        let _reopen = Reopen(self);
        loop {
            let batch: Vec<Waiter<I, O>> = {
                let mut lane = self.lane();
                if lane.waiting.is_empty() {
                    lane.committing = false;
                    return;
                }
                let n = lane.waiting.len().min(MAX_BATCH);
                lane.waiting.drain(..n).collect()
            };
            let (items, answers): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
            match store.write_now(|tx| self.apply_all(tx, items)) {
                Ok(outcomes) => answers.into_iter().zip(outcomes).for_each(|(a, o)| {
                    let _ = a.send(o);
                }),
                Err(e) => answers.into_iter().for_each(|a| {
                    let _ = a.send(Err(e.clone()));
                }),
            }
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
