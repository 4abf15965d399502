//! Table definitions and the JSON encoding of records.
//!
//! Keys are chosen so that every listing is one range scan: conversations by
//! (user, updated_at, id) read newest-first in reverse, messages by (conversation, sequence).
//! Values are JSON so that a field added later (with a serde default) reads old rows as is.

use super::StoreError;
use redb::{ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

/// `schema_version` and other single values.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// user id → `User`.
pub const USERS: TableDefinition<u128, &[u8]> = TableDefinition::new("users");
/// lowercase username → user id.
pub const USER_BY_NAME: TableDefinition<&str, u128> = TableDefinition::new("user_by_name");
/// lowercase email → user id.
pub const USER_BY_EMAIL: TableDefinition<&str, u128> = TableDefinition::new("user_by_email");
/// key id → `ApiKeyRecord`.
pub const API_KEYS: TableDefinition<u128, &[u8]> = TableDefinition::new("api_keys");
/// SHA-256 of the key → key id.
pub const API_KEY_BY_HASH: TableDefinition<&[u8], u128> = TableDefinition::new("api_key_by_hash");
/// (user id, key id) → (): a user's keys.
pub const API_KEYS_BY_USER: TableDefinition<(u128, u128), ()> =
    TableDefinition::new("api_keys_by_user");
/// SHA-256 of a refresh token → `RefreshRecord`.
pub const REFRESH_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("refresh_tokens");
/// (expires_at ms, SHA-256 of a refresh token) → (): tokens by expiry, for the purge (schema 2).
pub const REFRESH_BY_EXPIRY: TableDefinition<(u64, &[u8]), ()> =
    TableDefinition::new("refresh_by_expiry");
/// family id → when it was revoked (ms): every token of the family is dead.
pub const REVOKED_FAMILIES: TableDefinition<u128, i64> = TableDefinition::new("revoked_families");
/// conversation id → `Conversation`.
pub const CONVERSATIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("conversations");
/// (user id, updated_at ms, conversation id) → (): a user's conversations by activity.
pub const CONVERSATIONS_BY_USER: TableDefinition<(u128, u64, u128), ()> =
    TableDefinition::new("conversations_by_user");
/// (conversation id, sequence) → `Message`.
pub const MESSAGES: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("messages");
/// job id → `Job`.
pub const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// (run_at ms, job id) → (): queued jobs in the order they may run.
pub const JOBS_QUEUED: TableDefinition<(u64, u128), ()> = TableDefinition::new("jobs_queued");
/// (lease deadline ms, job id) → (): running jobs, expired leases first.
pub const JOBS_RUNNING: TableDefinition<(u64, u128), ()> = TableDefinition::new("jobs_running");
/// (finished_at ms, job id) → (): finished jobs, oldest first (retention, recent failures).
pub const JOBS_FINISHED: TableDefinition<(u64, u128), ()> = TableDefinition::new("jobs_finished");
/// (user id, job id) → (): a user's jobs, newest last (ids are UUIDv7).
pub const JOBS_BY_USER: TableDefinition<(u128, u128), ()> = TableDefinition::new("jobs_by_user");
/// user id → jobs queued or running (the per-user cap).
pub const JOBS_ACTIVE_BY_USER: TableDefinition<u128, u32> =
    TableDefinition::new("jobs_active_by_user");
/// state name → jobs in that state.
pub const JOB_COUNTS: TableDefinition<&str, u64> = TableDefinition::new("job_counts");

/// Creates every table so that read transactions never meet a missing one.
pub fn create_all(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(USERS)?;
    tx.open_table(USER_BY_NAME)?;
    tx.open_table(USER_BY_EMAIL)?;
    tx.open_table(API_KEYS)?;
    tx.open_table(API_KEY_BY_HASH)?;
    tx.open_table(API_KEYS_BY_USER)?;
    tx.open_table(REFRESH_TOKENS)?;
    tx.open_table(REFRESH_BY_EXPIRY)?;
    tx.open_table(REVOKED_FAMILIES)?;
    tx.open_table(CONVERSATIONS)?;
    tx.open_table(CONVERSATIONS_BY_USER)?;
    tx.open_table(MESSAGES)?;
    tx.open_table(JOBS)?;
    tx.open_table(JOBS_QUEUED)?;
    tx.open_table(JOBS_RUNNING)?;
    tx.open_table(JOBS_FINISHED)?;
    tx.open_table(JOBS_BY_USER)?;
    tx.open_table(JOBS_ACTIVE_BY_USER)?;
    tx.open_table(JOB_COUNTS)?;
    Ok(())
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize infallibly")
}

pub fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, message: e.to_string() })
}

/// Reads and decodes one JSON record.
pub fn get<'a, K, T>(
    table: &impl ReadableTable<K, &'static [u8]>,
    name: &'static str,
    key: impl std::borrow::Borrow<K::SelfType<'a>>,
) -> Result<Option<T>, StoreError>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
{
    match table.get(key)? {
        Some(v) => Ok(Some(decode(name, v.value())?)),
        None => Ok(None),
    }
}
