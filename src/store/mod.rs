//! The one redb file that holds every user, key, token and conversation.
//!
//! Nothing above this module sees a redb type or a transaction: callers get records and
//! `StoreError`s, so a second backend (PostgreSQL) can stand behind the same methods later.
//! Every write runs on tokio's blocking pool and returns only after its commit is durable
//! (redb's immediate durability), so a caller may acknowledge it to a client at once.

mod accounts;
mod backup;
mod conversations;
mod jobs;
mod tables;

pub use accounts::{
    AccountChange, ApiKeyRecord, DeletedUser, NewUser, RotateOutcome, User, UserChange,
};
pub use backup::restore;
pub use conversations::{
    Conversation, ConversationPage, Cursor, Message, NewMessage, Role, TurnTarget, Usage,
};
pub use jobs::{CancelOutcome, Job, JobState, JobStats, QueueLimits, Refusal, Settlement};

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
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `open`: another process holds the file's lock.
    #[error("{path} is already in use by another edgechat process; stop it first or use another --data-dir")]
    AlreadyInUse { path: PathBuf },
    /// `open`: the file was written by a newer edgechat.
    #[error("{path} has schema version {found}, newer than this edgechat supports ({supported}); run a newer edgechat")]
    NewerSchema { path: PathBuf, found: u64, supported: u64 },
    /// A write would break a uniqueness rule (username or email).
    #[error("{0:?} already taken")]
    Conflict(UniqueField),
    /// The record to change does not exist (or belongs to another user).
    #[error("not found")]
    NotFound,
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    /// Any failure of redb or of the file system underneath.
    #[error("storage failure: {0}")]
    Db(String),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(e.to_string())
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

/// Creates the data directory (and parents) with mode 0700 when it does not exist yet.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A cheap, cloneable handle to the open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir/edgechat.redb`, checks its schema and creates missing tables.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Like `open`, keeping at most `cache_bytes` of the file's pages in memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        private_dir(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = redb::Builder::new().set_cache_size(cache_bytes).create(&path).map_err(
            |e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::AlreadyInUse { path: path.clone() }
                }
                other => StoreError::Db(format!("{}: {other}", path.display())),
            },
        )?;
        // Password hashes and emails: readable by the server's user only.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let store = Store { db: Arc::new(db), path };
        store.check_schema()?;
        Ok(store)
    }

    /// Where the file lives, for messages and backups.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Proves the file is readable; `/ready` calls it.
    pub fn check(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_read()?;
        tx.open_table(tables::META)?;
        Ok(())
    }

    /// Proves the file is readable and its single write lock can be taken (a stuck writer
    /// would stall every request that writes); the systemd watchdog calls it. The write is
    /// not synced: it leaves nothing that matters behind.
    pub fn heartbeat(&self) -> Result<(), StoreError> {
        self.check()?;
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None);
        tx.commit()?;
        Ok(())
    }

    /// Refuses a newer file; brings an older one up to `SCHEMA_VERSION`; stamps a new one.
    fn check_schema(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        let found = tx.open_table(tables::META)?.get("schema_version")?.map(|v| v.value());
        let from = match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::NewerSchema {
                    path: self.path.clone(),
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(0) => {
                return Err(StoreError::Db("schema_version 0 is not an edgechat file".into()))
            }
            Some(v) => v,
            None => SCHEMA_VERSION,
        };
        tables::create_all(&tx)?;
        for (step, migrate) in MIGRATIONS.iter().enumerate().skip(from as usize - 1) {
            migrate(&tx)?;
            tracing::info!(path = %self.path.display(), from = step + 1, to = step + 2, "migrated the schema");
        }
        tx.open_table(tables::META)?.insert("schema_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
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
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Db(format!("write task failed: {e}")))?
    }

    /// Runs `f` in a read transaction. Reads never wait for writers (redb is MVCC), so they
    /// run inline.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_read()?;
        f(&tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_and_newer_schema_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyInUse { .. }), "{err}");
        assert!(err.to_string().contains("already in use"));
        drop(store);

        let db = Database::create(dir.path().join(FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(tables::META).unwrap().insert("schema_version", SCHEMA_VERSION + 1).unwrap();
        tx.commit().unwrap();
        drop(db);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
