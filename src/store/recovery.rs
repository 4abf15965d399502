//! Surviving a full disk (or any other I/O error) without a restart.
//!
//! redb poisons a `Database` at its first I/O error: from then on `begin_write`, and every read
//! that misses the page cache, fail with "Previous I/O error occurred. Please close and re-open
//! the database". The way back is to drop it (which releases its file lock, so it must go
//! before the file is opened again in this process) and to open the file again, which repairs
//! it and therefore writes. This module keeps the open database behind a lock so that this can
//! happen in place:
//!
//! - The first I/O error marks the store failed (one log line) and starts one recovery thread.
//!   From then on writes are refused before they start (`DiskFull` or `Unavailable`), so none
//!   is acknowledged; reads keep using the poisoned database, whose page cache still answers.
//! - The thread probes for room (a small file written, synced and removed beside the
//!   database) with bounded exponential backoff. Once the probe passes, it takes the lock for
//!   writing — which waits for in-flight transactions to drain and turns new readers away
//!   instead of blocking them — drops the old database, opens the file again, and proves it
//!   with one durable write before writes are let in. A reopen that fails backs off longer
//!   (it may scan the whole file).

use super::StoreError;
use redb::Database;
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, TryLockError, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The room the probe asks for: enough for a repair and a few transactions, so that a store
/// that reopens does not fail again at its next write.
const PROBE_BYTES: usize = 1 << 20;
/// The probe's file, beside the database.
const PROBE_NAME: &str = ".edgechat-space-probe";
/// Probes: the first soon after the failure, then doubling up to the cap.
const PROBE_FIRST: Duration = Duration::from_millis(250);
const PROBE_MAX: Duration = Duration::from_secs(2);
/// After a reopen that failed although the probe passed.
const REOPEN_FIRST: Duration = Duration::from_secs(2);
const REOPEN_MAX: Duration = Duration::from_secs(60);
/// A recovery thread silent this long is stuck; the watchdog's heartbeat then fails.
const RECOVERY_STALL: Duration = Duration::from_secs(120);

/// What an I/O error under redb was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoFailure {
    /// ENOSPC or EDQUOT: no room on the disk, or over quota.
    #[error("no space left on the disk")]
    DiskFull,
    /// Any other I/O error, as the OS words it.
    #[error("{0}")]
    Other(String),
    /// redb refusing because of an earlier I/O error (whose cause was seen then).
    #[error("refused after an earlier I/O error")]
    Earlier,
}

impl IoFailure {
    /// Classifies an OS error.
    pub(super) fn of(e: &std::io::Error) -> IoFailure {
        use std::io::ErrorKind::{QuotaExceeded, StorageFull};
        match e.kind() {
            StorageFull | QuotaExceeded => IoFailure::DiskFull,
            _ => IoFailure::Other(e.to_string()),
        }
    }
}

/// Why the store cannot write.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    DiskFull,
    Io(String),
}

impl Cause {
    fn of(failure: &IoFailure) -> Cause {
        match failure {
            IoFailure::DiskFull => Cause::DiskFull,
            other => Cause::Io(other.to_string()),
        }
    }

    /// The cause behind a failed reopen.
    fn of_error(e: &StoreError) -> Cause {
        match e {
            StoreError::Io(f) => Cause::of(f),
            StoreError::DiskFull { .. } => Cause::DiskFull,
            other => Cause::Io(other.to_string()),
        }
    }
}

/// Where the store stands.
struct State {
    /// Why writes are refused; `None` while they are not.
    failure: Option<Cause>,
    /// A recovery thread is running.
    recovering: bool,
    /// When the recovery thread last moved (the watchdog's heartbeat looks at it).
    progress: Instant,
    /// When writes were first refused, for the log line that says they are back.
    since: Instant,
}

/// Whether a transaction may wait for the database while it is being reopened.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    /// On the blocking pool: wait.
    Block,
    /// Inline on an async worker: answer "unavailable" at once instead.
    No,
}

/// The open database and what the store knows about its health; shared by every `Store`
/// clone and the recovery thread.
pub(super) struct Shared {
    /// The redb file.
    pub(super) path: PathBuf,
    cache_bytes: usize,
    /// `None` only between dropping a poisoned database and a reopen that succeeded.
    db: RwLock<Option<Database>>,
    state: Mutex<State>,
    /// `true` while writes are let in; tasks that back off wait on it.
    writable: watch::Sender<bool>,
    /// How the file is opened and the disk probed.
    disk: Disk,
}

/// How the store reaches its disk: the real file system, or a faulty stand-in in tests.
#[derive(Clone, Copy)]
pub(super) struct Disk {
    /// Opens and proves the file (the store's own open path, schema check included).
    pub(super) open: fn(&Path, usize) -> Result<Database, StoreError>,
    /// Proves the directory takes new data (see `probe_room`).
    pub(super) probe: fn(&Path) -> std::io::Result<()>,
}

impl Shared {
    /// Wraps a database `disk.open` produced, keeping `disk` to reopen it later.
    pub(super) fn new(path: PathBuf, cache_bytes: usize, db: Database, disk: Disk) -> Arc<Shared> {
        Arc::new(Shared {
            path,
            cache_bytes,
            db: RwLock::new(Some(db)),
            state: Mutex::new(State {
                failure: None,
                recovering: false,
                progress: Instant::now(),
                since: Instant::now(),
            }),
            writable: watch::channel(true).0,
            disk,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The directory holding the file, for messages.
    fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    fn error(&self, cause: &Cause) -> StoreError {
        match cause {
            Cause::DiskFull => StoreError::DiskFull { dir: self.dir() },
            Cause::Io(reason) => StoreError::Unavailable { reason: reason.clone() },
        }
    }

    /// `Ok` while writes are let in; otherwise the error that says why not.
    pub(super) fn writable(&self) -> Result<(), StoreError> {
        match &self.state().failure {
            None => Ok(()),
            Some(cause) => Err(self.error(cause)),
        }
    }

    /// Resolves once writes are let in (at once when they are).
    pub(super) async fn writable_again(&self) {
        let _ = self.writable.subscribe().wait_for(|w| *w).await;
    }

    /// While writes are refused: whether the recovery thread is alive and moving, so that the
    /// watchdog does not restart a process that is waiting for disk space (a restart would not
    /// make room, and would lose the page cache reads are served from).
    pub(super) fn recovery_alive(&self) -> Result<(), StoreError> {
        let state = self.state();
        match &state.failure {
            None => Ok(()),
            Some(_) if state.recovering && state.progress.elapsed() < RECOVERY_STALL => Ok(()),
            Some(cause) => Err(StoreError::Unavailable {
                reason: format!("recovery stalled ({})", self.error(cause)),
            }),
        }
    }

    /// Runs `f` against the open database. I/O errors mark the store failed and come back as
    /// the error that says why it cannot write.
    pub(super) fn with_db<T>(
        self: &Arc<Self>,
        wait: Wait,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard: RwLockReadGuard<'_, Option<Database>> = match wait {
            Wait::Block => self.db.read().unwrap_or_else(PoisonError::into_inner),
            Wait::No => match self.db.try_read() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return Err(self.reopening()),
            },
        };
        let Some(db) = guard.as_ref() else {
            drop(guard);
            return Err(self.reopening());
        };
        // Noted while the database is still held: a reopen cannot slip in between, so a late
        // error is never taken for a new failure of the reopened file.
        let result = f(db).map_err(|e| self.noted(e));
        drop(guard);
        result
    }

    /// The answer while the database is closed for a reopen.
    fn reopening(&self) -> StoreError {
        match &self.state().failure {
            Some(cause) => self.error(cause),
            None => StoreError::Unavailable { reason: "the database is being reopened".into() },
        }
    }

    /// Turns an I/O error into the store's state (and its error); passes others through.
    fn noted(self: &Arc<Self>, e: StoreError) -> StoreError {
        let StoreError::Io(failure) = e else { return e };
        let cause = match failure {
            // Poisoned earlier: the cause was recorded then (or, if it slipped past us, is
            // unknown; the probe will tell).
            IoFailure::Earlier => self
                .state()
                .failure
                .clone()
                .unwrap_or_else(|| Cause::Io("an earlier I/O error".into())),
            other => Cause::of(&other),
        };
        self.fail(cause.clone());
        self.error(&cause)
    }

    /// Records that writes cannot happen, logging the change, and starts the recovery thread.
    fn fail(self: &Arc<Self>, cause: Cause) {
        let mut state = self.state();
        if state.failure.as_ref() == Some(&cause) {
            return;
        }
        let error = self.error(&cause);
        match state.failure.replace(cause) {
            None => {
                state.since = Instant::now();
                tracing::error!(path = %self.path.display(), %error, "storage cannot be written; writes are refused until the database reopens (no restart needed)")
            }
            Some(_) => {
                tracing::warn!(path = %self.path.display(), %error, "storage still cannot be written, now because")
            }
        }
        self.writable.send_replace(false);
        if !state.recovering {
            state.recovering = true;
            state.progress = Instant::now();
            let weak = Arc::downgrade(self);
            let spawned =
                std::thread::Builder::new().name("store-recovery".into()).spawn(|| recover(weak));
            if let Err(e) = spawned {
                state.recovering = false;
                tracing::error!(error = %e, "cannot start the storage recovery thread; the next failure tries again");
            }
        }
    }

    /// The recovery thread moved; `cause` when its attempt failed.
    fn attempted(&self, cause: Option<Cause>) {
        let mut state = self.state();
        state.progress = Instant::now();
        if let Some(cause) = cause {
            if state.failure.as_ref() != Some(&cause) {
                tracing::warn!(path = %self.path.display(), error = %self.error(&cause), "storage still cannot be written, now because");
                state.failure = Some(cause);
            }
        }
    }

    /// The database is open again and proved writable: writes are let in.
    fn recovered(&self) {
        let mut state = self.state();
        state.failure = None;
        state.recovering = false;
        let refused_ms = state.since.elapsed().as_millis() as u64;
        // Under the state lock, as `fail` does: the flag and `failure` never disagree.
        self.writable.send_replace(true);
        drop(state);
        tracing::info!(path = %self.path.display(), refused_ms, "storage writable again: database reopened");
    }

    /// One reopen: drains transactions, drops the poisoned database (releasing its file
    /// lock), opens the file again and proves it writable. Called only once the probe passed.
    fn reopen(&self) -> Result<(), Cause> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        drop(slot.take());
        let db = (self.disk.open)(&self.path, self.cache_bytes).map_err(|e| Cause::of_error(&e))?;
        *slot = Some(db);
        Ok(())
    }
}

/// Writes, syncs and removes `PROBE_BYTES` in `dir`: proof there is room for the reopen's
/// repair and the next writes (a quota shows here too, where `statvfs` would not).
pub(super) fn probe_room(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(PROBE_NAME);
    let written = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&vec![0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written
}

/// Doubling waits, capped.
struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, first, max }
    }

    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// The recovery thread: probes with backoff and reopens once there is room; ends when the
/// store is writable again or every `Store` handle is gone. It holds the store only while it
/// works, never while it sleeps.
fn recover(store: Weak<Shared>) {
    let mut probes = Backoff::new(PROBE_FIRST, PROBE_MAX);
    let mut reopens = Backoff::new(REOPEN_FIRST, REOPEN_MAX);
    let mut not_before = Instant::now();
    loop {
        std::thread::sleep(probes.step());
        let Some(shared) = store.upgrade() else { return };
        if let Err(e) = (shared.disk.probe)(&shared.dir()) {
            shared.attempted(Some(Cause::of(&IoFailure::of(&e))));
            continue;
        }
        shared.attempted(None);
        if Instant::now() < not_before {
            continue;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| shared.reopen())) {
            Ok(Ok(())) => return shared.recovered(),
            Ok(Err(cause)) => {
                tracing::debug!(?cause, "reopening the database failed; backing off");
                shared.attempted(Some(cause));
            }
            Err(_) => shared.attempted(Some(Cause::Io("reopening the database panicked".into()))),
        }
        not_before = Instant::now() + reopens.step();
        probes.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_by_kind() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(IoFailure::of(&full), IoFailure::DiskFull);
        let quota = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(IoFailure::of(&quota), IoFailure::DiskFull);
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(IoFailure::of(&eio), IoFailure::Other(m) if m.contains("Input/output")));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let steps: Vec<u128> = (0..6).map(|_| b.step().as_millis()).collect();
        assert_eq!(steps, [250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(250));
    }

    #[test]
    fn the_probe_leaves_nothing_behind_and_names_a_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        probe_room(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(probe_room(&dir.path().join("gone")).is_err());
    }
}
