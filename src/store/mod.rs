//! Every user, key, token, conversation and job: in one redb file (the default), or in
//! PostgreSQL for several replicas (`postgres/`).
//!
//! Nothing above this module sees redb, SQL or a transaction: callers hold a `Store`
//! (`handle.rs`) and get records and `StoreError`s, whichever backend stands behind it.
//! Every write returns only after its commit is durable, so a caller may acknowledge it to a
//! client at once. The redb side: writes run on tokio's blocking pool with immediate
//! durability; reads are MVCC and run inline.

mod access;
mod accounts;
mod backup;
mod conversations;
mod group;
mod handle;
mod jobs;
mod postgres;
mod recovery;
#[cfg(test)]
mod suite;
mod tables;

pub use accounts::{
    AccountChange, ApiKeyRecord, DeletedUser, NewUser, RotateOutcome, User, UserChange,
};
pub use backup::restore;
pub use conversations::{
    Conversation, ConversationPage, Cursor, Message, NewMessage, Role, ToolCall, TurnTarget, Usage,
};
pub use handle::{CounterStep, PostgresOptions, Store};
pub use jobs::{CancelOutcome, Job, JobState, JobStats, QueueLimits, Refusal, Settlement};
pub use postgres::{CopyReport, JobSignals};
pub use recovery::IoFailure;

use recovery::{Disk, Shared, Wait};
use redb::{Database, ReadableTable};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The schema this build writes; a file with a higher number was written by a newer edgechat.
pub const SCHEMA_VERSION: u64 = 2;

/// One step per version: `MIGRATIONS[n - 1]` turns a version-`n` file into version `n + 1`,
/// inside the transaction that opens the file (all steps commit together, or none).
const MIGRATIONS: [Migration; 1] = [accounts::migrate_refresh_expiry];

type Migration = fn(&redb::WriteTransaction) -> Result<(), StoreError>;

/// The page cache of `Store::open` (the server uses `storage.cache_mb`).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// The file name inside the data directory.
pub const FILE_NAME: &str = "edgechat.redb";

/// Which unique field a write collided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniqueField {
    Username,
    Email,
}

/// What can go wrong in the store; callers map these to HTTP in `api::error`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// `open`: another process holds the file's lock.
    #[error("{path} is already in use by another edgechat process; stop it first or use another --data-dir")]
    AlreadyInUse { path: PathBuf },
    /// `open`: the file (or database) was written by a newer edgechat.
    #[error("{place} has schema version {found}, newer than this edgechat supports ({supported}); run a newer edgechat")]
    NewerSchema { place: String, found: u64, supported: u64 },
    /// A write would break a uniqueness rule (username or email).
    #[error("{0:?} already taken")]
    Conflict(UniqueField),
    /// The record to change does not exist (or belongs to another user).
    #[error("not found")]
    NotFound,
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    /// The disk holding the data directory is full (or over quota): writes are refused until
    /// there is room, then the store reopens the file by itself.
    #[error("the disk holding {} is full: free space there; edgechat resumes writing by itself, no restart needed", dir.display())]
    DiskFull { dir: PathBuf },
    /// Writes are refused for now after an I/O error; the store reopens the file by itself.
    #[error(
        "storage cannot be written for now ({reason}); edgechat reopens the database by itself"
    )]
    Unavailable { reason: String },
    /// PostgreSQL cannot be reached for now, or a statement ran past its deadline; the pool
    /// connects again by itself.
    #[error("the database cannot be reached for now ({reason}); edgechat reconnects by itself")]
    Unreachable { reason: String },
    /// An I/O error under redb. The store's plumbing turns it into `DiskFull` or `Unavailable`
    /// (and starts recovering) before it reaches a caller.
    #[error("I/O error: {0}")]
    Io(IoFailure),
    /// Any failure of redb or of the file system underneath.
    #[error("storage failure: {0}")]
    Db(String),
}

impl StoreError {
    /// Whether the storage itself failed (as opposed to a refusal of one write: a missing
    /// record, a taken name), so that a transaction holding other writes must be aborted.
    pub fn is_storage_failure(&self) -> bool {
        !matches!(self, StoreError::NotFound | StoreError::Conflict(_) | StoreError::Corrupt { .. })
    }

    /// Whether this is the store refusing writes for now (full disk, I/O error, reopening):
    /// retrying later may succeed without anyone restarting anything.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. }
                | StoreError::Unavailable { .. }
                | StoreError::Unreachable { .. }
                | StoreError::Io(_)
        )
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(e) => StoreError::Io(IoFailure::of(&e)),
            redb::Error::PreviousIo => StoreError::Io(IoFailure::Earlier),
            other => StoreError::Db(other.to_string()),
        }
    }
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::from(redb::Error::from(e)) }
        }
    )*};
}
db_error_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);

/// Refuses a newer file; brings an older one up to `SCHEMA_VERSION`; stamps a new one. Always
/// one durable write, so a file that opens here has also proved it can be written.
fn check_schema(db: &Database, path: &Path) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    let found = tx.open_table(tables::META)?.get("schema_version")?.map(|v| v.value());
    let from = match found {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::NewerSchema {
                place: path.display().to_string(),
                found: v,
                supported: SCHEMA_VERSION,
            });
        }
        Some(0) => return Err(StoreError::Db("schema_version 0 is not an edgechat file".into())),
        Some(v) => v,
        None => SCHEMA_VERSION,
    };
    tables::create_all(&tx)?;
    for (step, migrate) in MIGRATIONS.iter().enumerate().skip(from as usize - 1) {
        migrate(&tx)?;
        tracing::info!(path = %path.display(), from = step + 1, to = step + 2, "migrated the schema");
    }
    tx.open_table(tables::META)?.insert("schema_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Creates the data directory (and parents) with mode 0700 when it does not exist yet.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The redb file: a cheap, cloneable handle to the open database.
#[derive(Clone)]
pub(crate) struct Redb {
    shared: Arc<Shared>,
    /// Chat turns, group-committed (`record_turn`).
    turns: Arc<group::Group<conversations::Turn, conversations::Recorded>>,
    /// Background jobs, group-committed (`enqueue_job`).
    enqueues: Arc<group::Group<jobs::Enqueue, Result<Job, Refusal>>>,
    /// Write transactions begun, for tests to see what shares one.
    #[cfg(test)]
    transactions: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Redb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redb").field("path", &self.shared.path).finish()
    }
}

/// The real disk: `open_file`, and a probe file written beside the database.
const REAL_DISK: Disk = Disk { open: open_file, probe: recovery::probe_room };

/// Opens `path` as the store's database and proves it: created if missing, mode 0600, schema
/// checked (one durable write). `Store::open` and every reopen after an I/O error use it.
fn open_file(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| open_error(e, path))?;
    prove(db, path)
}

/// redb's refusal to open, named: the lock, an I/O error (classified), or the file's problem.
fn open_error(e: redb::DatabaseError, path: &Path) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            StoreError::AlreadyInUse { path: path.to_path_buf() }
        }
        other => match StoreError::from(other) {
            StoreError::Db(message) => StoreError::Db(format!("{}: {message}", path.display())),
            e => e,
        },
    }
}

/// Makes a freshly opened file private and checks its schema (one durable write).
fn prove(db: Database, path: &Path) -> Result<Database, StoreError> {
    // Password hashes and emails: readable by the server's user only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
    check_schema(&db, path)?;
    Ok(db)
}

impl Redb {
    /// Opens (or creates) `dir/edgechat.redb`, checks its schema and creates missing tables.
    pub fn open(dir: &Path) -> Result<Redb, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Like `open`, keeping at most `cache_bytes` of the file's pages in memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Redb, StoreError> {
        private_dir(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        if let Some(denied) = access::denied(&path) {
            return Err(denied);
        }
        Self::open_path(path, cache_bytes, REAL_DISK)
    }

    /// Opens the redb file at `path` itself (a backup, or a stopped server's file), which
    /// must exist: `store copy` reads it.
    fn open_file_at(path: &Path) -> Result<Redb, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Db(format!("{}: no such redb file", path.display())));
        }
        if let Some(denied) = access::denied(path) {
            return Err(denied);
        }
        Self::open_path(path.to_path_buf(), DEFAULT_CACHE_BYTES, REAL_DISK)
    }

    fn open_path(path: PathBuf, cache_bytes: usize, disk: Disk) -> Result<Redb, StoreError> {
        let db = (disk.open)(&path, cache_bytes).map_err(|e| match e {
            StoreError::Io(IoFailure::DiskFull) => {
                StoreError::DiskFull { dir: path.parent().unwrap_or(Path::new(".")).into() }
            }
            StoreError::Io(other) => StoreError::Db(format!("{}: {other}", path.display())),
            other => other,
        })?;
        Ok(Redb {
            shared: Shared::new(path, cache_bytes, db, disk),
            turns: group::Group::new(conversations::record_grouped),
            enqueues: group::Group::new(jobs::enqueue_in),
            #[cfg(test)]
            transactions: Default::default(),
        })
    }

    /// Where the file lives, for messages and backups.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Proves the file is readable; `/ready` calls it (with `writable`).
    pub fn check(&self) -> Result<(), StoreError> {
        self.read(|tx| {
            tx.open_table(tables::META)?;
            Ok(())
        })
    }

    /// `Ok` while writes are let in; otherwise `DiskFull` or `Unavailable`, which say why. No
    /// I/O: it reports what the last writes found.
    pub fn writable(&self) -> Result<(), StoreError> {
        self.shared.writable()
    }

    /// Resolves once the store lets writes in again (at once when it does): what background
    /// loops wait on instead of retrying into a full disk.
    pub async fn writable_again(&self) {
        self.shared.writable_again().await
    }

    /// Proves the process is not wedged; the systemd watchdog calls it. Normally: the file is
    /// readable and its single write lock can be taken (a stuck writer would stall every
    /// request that writes); the write is not synced and leaves nothing that matters behind.
    /// While writes are refused (a full disk): that the recovery thread is still moving — a
    /// restart would not free space, and the store resumes by itself once there is some.
    pub fn heartbeat(&self) -> Result<(), StoreError> {
        if self.writable().is_err() {
            return self.shared.recovery_alive();
        }
        let proved = self.check().and_then(|()| {
            self.shared.with_db(Wait::Block, |db| {
                let mut tx = db.begin_write()?;
                tx.set_durability(redb::Durability::None);
                tx.commit()?;
                Ok(())
            })
        });
        match proved {
            // This very check met the full disk: recovery has just started.
            Err(e) if e.is_unavailable() => self.shared.recovery_alive(),
            other => other,
        }
    }

    /// The schema version of the open file (always `SCHEMA_VERSION` once opened).
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        self.read(|tx| {
            Ok(tx.open_table(tables::META)?.get("schema_version")?.map_or(0, |v| v.value()))
        })
    }

    /// Runs `f` in one write transaction on the blocking pool and returns after the commit.
    /// `f` returning an error aborts the transaction: nothing it wrote is kept.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write_now(f))
            .await
            .map_err(|e| StoreError::Db(format!("write task failed: {e}")))?
    }

    /// `write` on the calling thread (which may block): for the blocking pool only.
    fn write_now<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // Refused before it starts while the disk is full: nothing is acknowledged then.
        self.shared.writable()?;
        #[cfg(test)]
        self.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.with_db(Wait::Block, |db| {
            let tx = db.begin_write()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// Runs `f` in a read transaction. Reads never wait for writers (redb is MVCC), so they
    /// run inline; while the file is being reopened they answer "unavailable" at once rather
    /// than wait. A database poisoned by an I/O error still answers from its page cache.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.shared.with_db(Wait::No, |db| {
            let tx = db.begin_read()?;
            f(&tx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_and_newer_schema_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Redb::open(dir.path()).unwrap();
        let err = Redb::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyInUse { .. }), "{err}");
        assert!(err.to_string().contains("already in use"));
        drop(store);

        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(tables::META).unwrap().insert("schema_version", SCHEMA_VERSION + 1).unwrap();
        tx.commit().unwrap();
        drop(db);
        let err = Redb::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }

    /// A file whose writes fail with ENOSPC while `FULL` is set, as on a full disk; reads
    /// still work. Only the test below uses it.
    mod full_disk {
        use super::super::*;
        use std::sync::atomic::{AtomicBool, Ordering};

        pub static FULL: AtomicBool = AtomicBool::new(false);

        fn refuse() -> std::io::Result<()> {
            match FULL.load(Ordering::SeqCst) {
                true => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                false => Ok(()),
            }
        }

        #[derive(Debug)]
        struct Filling(redb::backends::FileBackend);

        impl redb::StorageBackend for Filling {
            fn len(&self) -> std::io::Result<u64> {
                self.0.len()
            }
            fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
                self.0.read(offset, len)
            }
            fn set_len(&self, len: u64) -> std::io::Result<()> {
                refuse().and_then(|()| self.0.set_len(len))
            }
            fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
                refuse().and_then(|()| self.0.sync_data(eventual))
            }
            fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
                refuse().and_then(|()| self.0.write(offset, data))
            }
        }

        fn open(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| StoreError::Db(e.to_string()))?;
            let backend =
                Filling(redb::backends::FileBackend::new(file).map_err(|e| open_error(e, path))?);
            let db = redb::Builder::new()
                .set_cache_size(cache_bytes)
                .create_with_backend(backend)
                .map_err(|e| open_error(e, path))?;
            prove(db, path)
        }

        fn probe(dir: &Path) -> std::io::Result<()> {
            refuse().and_then(|()| recovery::probe_room(dir))
        }

        pub const DISK: Disk = Disk { open, probe };
    }

    fn new_user(name: &str) -> NewUser {
        NewUser {
            username: name.into(),
            email: format!("{name}@example.com"),
            password_hash: "x".into(),
            is_admin: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_without_a_restart() {
        use full_disk::FULL;
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let store = Redb::open_path(path.clone(), DEFAULT_CACHE_BYTES, full_disk::DISK).unwrap();
        let alice = store.create_user(new_user("alice"), 1).await.unwrap();

        FULL.store(true, Ordering::SeqCst);
        let err = store.create_user(new_user("bob"), 2).await.unwrap_err();
        assert!(matches!(&err, StoreError::DiskFull { dir: d } if d == dir.path()), "{err}");
        assert!(err.to_string().contains("is full"), "{err}");
        // redb is poisoned now: later writes are refused before they start, reads still
        // answer from its page cache, and the watchdog's heartbeat sees recovery moving.
        let err = store.create_user(new_user("carol"), 3).await.unwrap_err();
        assert!(matches!(err, StoreError::DiskFull { .. }), "{err}");
        assert_eq!(store.user(alice.id).unwrap().unwrap().username, "alice");
        store.check().unwrap();
        assert!(matches!(store.writable(), Err(StoreError::DiskFull { .. })));
        store.heartbeat().unwrap();
        let backup = dir.path().join("copy.redb");
        assert!(matches!(store.backup(&backup), Err(StoreError::DiskFull { .. })));
        // Probes keep failing while the disk is full: still refused a while later.
        let waited = tokio::time::timeout(Duration::from_millis(800), store.writable_again());
        assert!(waited.await.is_err(), "writable again while the disk is still full");
        assert!(store.user_by_username("alice").unwrap().is_some());

        FULL.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), store.writable_again())
            .await
            .expect("the store reopens itself once there is room");
        store.writable().unwrap();
        store.create_user(new_user("bob"), 4).await.unwrap();
        store.heartbeat().unwrap();
        assert!(store.backup(&backup).unwrap() > 0);
        drop(store);

        let names = |store: &Redb| -> Vec<String> {
            store.users().unwrap().into_iter().map(|u| u.username).collect()
        };
        let reopened = Redb::open(dir.path()).unwrap();
        assert_eq!(names(&reopened), ["alice", "bob"], "acknowledged writes only");
        let restored = tempfile::tempdir().unwrap();
        restore(&backup, restored.path()).unwrap();
        assert_eq!(names(&Redb::open(restored.path()).unwrap()), ["alice", "bob"]);
    }
}
