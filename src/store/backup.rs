//! Online backups and offline restores of the redb file.
//!
//! A backup is a logical copy: every table read in one read transaction (a consistent snapshot
//! that never blocks writers) and written into a fresh file, which comes out compacted and
//! cleanly closed. It appears under its final name only once complete and synced.

use super::{access, tables, Redb, StoreError, Wait, FILE_NAME, SCHEMA_VERSION};
use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Copies one table; returns its name. Errors writing the copy name `dest`; errors reading
/// the live file pass through as the store's own (and mark it failed when they are I/O).
fn copy<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    dest: &Path,
    table: TableDefinition<K, V>,
) -> Result<String, StoreError> {
    let source = from.open_table(table)?;
    let mut target = to.open_table(table).map_err(|e| io(dest, e))?;
    for row in source.iter()? {
        let (k, v) = row?;
        target.insert(k.value(), v.value()).map_err(|e| io(dest, e))?;
    }
    Ok(redb::TableHandle::name(&table).to_string())
}

/// Copies every table this build knows; returns their names (a test checks none is missed).
fn copy_all(
    from: &ReadTransaction,
    to: &WriteTransaction,
    dest: &Path,
) -> Result<Vec<String>, StoreError> {
    use tables::*;
    Ok(vec![
        copy(from, to, dest, META)?,
        copy(from, to, dest, USERS)?,
        copy(from, to, dest, USER_BY_NAME)?,
        copy(from, to, dest, USER_BY_EMAIL)?,
        copy(from, to, dest, API_KEYS)?,
        copy(from, to, dest, API_KEY_BY_HASH)?,
        copy(from, to, dest, API_KEYS_BY_USER)?,
        copy(from, to, dest, REFRESH_TOKENS)?,
        copy(from, to, dest, REFRESH_BY_EXPIRY)?,
        copy(from, to, dest, REVOKED_FAMILIES)?,
        copy(from, to, dest, CONVERSATIONS)?,
        copy(from, to, dest, CONVERSATIONS_BY_USER)?,
        copy(from, to, dest, MESSAGES)?,
        copy(from, to, dest, JOBS)?,
        copy(from, to, dest, JOBS_QUEUED)?,
        copy(from, to, dest, JOBS_RUNNING)?,
        copy(from, to, dest, JOBS_FINISHED)?,
        copy(from, to, dest, JOBS_BY_USER)?,
        copy(from, to, dest, JOBS_ACTIVE_BY_USER)?,
        copy(from, to, dest, JOB_COUNTS)?,
    ])
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(format!("{}: {e}", path.display()))
}

/// `path` with `suffix` appended to its file name.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

impl Redb {
    /// Writes a consistent copy of the whole database to `dest` (which must not exist yet)
    /// while the server keeps serving; returns the copy's size in bytes. Blocking. Refused,
    /// with the store's own message, while the store cannot write (a full disk): its file is
    /// then readable only where redb's page cache still holds it, so the copy could not finish.
    pub fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        self.writable()?;
        if dest.exists() {
            return Err(io(dest, "already exists; choose a new name"));
        }
        let partial = beside(dest, ".partial");
        let _ = std::fs::remove_file(&partial);
        let result = (|| {
            let copy = Database::create(&partial).map_err(|e| io(&partial, e))?;
            std::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| io(&partial, e))?;
            self.shared.with_db(Wait::Block, |db| {
                let snapshot = db.begin_read()?;
                let tx = copy.begin_write().map_err(|e| io(&partial, e))?;
                copy_all(&snapshot, &tx, &partial)?;
                tx.commit().map_err(|e| io(&partial, e))
            })?;
            drop(copy);
            std::fs::rename(&partial, dest).map_err(|e| io(dest, e))?;
            sync_dir(dest)?;
            std::fs::metadata(dest).map(|m| m.len()).map_err(|e| io(dest, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }
}

/// Puts the backup at `source` in place as the database of `data_dir`; the server must be
/// stopped. The file it replaces is kept beside it as `edgechat.redb.replaced-<unix time>`.
/// Returns where the replaced file went, if there was one.
pub fn restore(source: &Path, data_dir: &Path) -> Result<Option<PathBuf>, StoreError> {
    super::private_dir(data_dir).map_err(|e| io(data_dir, e))?;
    let live = data_dir.join(FILE_NAME);
    if live.exists() && locked_elsewhere(&live)? {
        return Err(StoreError::AlreadyInUse { path: live });
    }
    let incoming = beside(&live, ".restoring");
    std::fs::copy(source, &incoming).map_err(|e| io(source, e))?;
    let checked = check_backup(&incoming);
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&incoming);
        return Err(e);
    }
    // The owner and mode of the file it replaces (or, for a first file, the data directory's
    // owner): a restore run as root must leave a file the service's user can open.
    let owned = match std::fs::metadata(&live) {
        Ok(old) => access::copy_owner(&incoming, &old, old.permissions().mode() & 0o777),
        Err(_) => {
            std::fs::metadata(data_dir).and_then(|d| access::copy_owner(&incoming, &d, 0o600))
        }
    };
    if let Err(e) = owned {
        let _ = std::fs::remove_file(&incoming);
        return Err(io(&live, format!("cannot give the restored file its owner and mode: {e}")));
    }
    std::fs::File::open(&incoming).and_then(|f| f.sync_all()).map_err(|e| io(&incoming, e))?;
    let replaced = live
        .exists()
        .then(|| beside(&live, &format!(".replaced-{}", crate::clock::now_ms() / 1000)));
    if let Some(old) = &replaced {
        std::fs::rename(&live, old).map_err(|e| io(&live, e))?;
    }
    std::fs::rename(&incoming, &live).map_err(|e| io(&live, e))?;
    sync_dir(&live)?;
    Ok(replaced)
}

/// Whether a process has the file open as a database: redb holds `flock(LOCK_EX)` on it while
/// open. Probing the lock rather than opening the database lets a corrupt file be replaced.
fn locked_elsewhere(path: &Path) -> Result<bool, StoreError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    // SAFETY: a lock request on a descriptor we own; closing `file` releases it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(false);
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
        e => Err(io(path, e)),
    }
}

/// A backup must be a redb file holding an edgechat schema this build can read.
fn check_backup(path: &Path) -> Result<(), StoreError> {
    let db = Database::open(path).map_err(|e| io(path, format!("not a redb database: {e}")))?;
    let tx = db.begin_read()?;
    let version = match tx.open_table(tables::META) {
        Ok(meta) => meta.get("schema_version")?.map(|v| v.value()),
        Err(_) => None,
    };
    match version {
        None => Err(io(path, "not an edgechat database (no schema version)")),
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema {
            place: path.display().to_string(),
            found: v,
            supported: SCHEMA_VERSION,
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::TableHandle;

    #[test]
    fn a_backup_copies_every_table_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Redb::open(&dir.path().join("live")).unwrap();
        let scratch = dir.path().join("scratch.redb");
        let (mut listed, mut copied) = store
            .shared
            .with_db(Wait::Block, |db| {
                let tx = db.begin_read()?;
                let listed: Vec<String> = tx.list_tables()?.map(|t| t.name().to_string()).collect();
                let out = Database::create(&scratch)?;
                let w = out.begin_write()?;
                Ok((listed, copy_all(&tx, &w, &scratch)?))
            })
            .unwrap();
        listed.sort();
        copied.sort();
        assert_eq!(copied, listed, "a table was added without adding it to copy_all");

        let dest = dir.path().join("copy.redb");
        assert!(store.backup(&dest).unwrap() > 0);
        assert!(store.backup(&dest).unwrap_err().to_string().contains("already exists"));
        let restored = dir.path().join("restored");
        std::fs::create_dir(&restored).unwrap();
        assert_eq!(restore(&dest, &restored).unwrap(), None);
        assert_eq!(Redb::open(&restored).unwrap().schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn restore_refuses_a_running_database_and_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Redb::open(dir.path()).unwrap();
        let backup = dir.path().join("b.redb");
        store.backup(&backup).unwrap();
        let err = restore(&backup, dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyInUse { .. }), "{err}");
        drop(store);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not a database").unwrap();
        let err = restore(&junk, dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a redb database"), "{err}");
        assert!(!dir.path().join("edgechat.redb.restoring").exists());
    }

    #[test]
    fn restore_replaces_a_corrupt_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let backup = dir.path().join("b.redb");
        Redb::open(&dir.path().join("old")).unwrap().backup(&backup).unwrap();
        let live = dir.path().join(FILE_NAME);
        std::fs::write(&live, b"torn by a failing disk").unwrap();
        assert!(Redb::open(dir.path()).is_err(), "the live file is unreadable");
        let replaced = restore(&backup, dir.path()).unwrap().expect("the old file is kept");
        assert_eq!(std::fs::read(replaced).unwrap(), b"torn by a failing disk");
        assert_eq!(Redb::open(dir.path()).unwrap().schema_version().unwrap(), SCHEMA_VERSION);
    }
}
