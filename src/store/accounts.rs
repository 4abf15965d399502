//! Users, API keys and refresh tokens; and deleting a user with everything they own.

use super::tables::{self, decode, encode, get};
use super::{Redb, StoreError, UniqueField};
use crate::clock::Millis;
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An account. `password_hash` is an argon2id PHC string, never the password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub is_admin: bool,
    #[serde(default)]
    pub disabled: bool,
    pub created_at: Millis,
}

impl User {
    /// The account `new` becomes, created at `now` (both backends store it so).
    pub(super) fn new(new: NewUser, now: Millis) -> User {
        User {
            id: Uuid::now_v7(),
            username: new.username,
            email: new.email,
            password_hash: new.password_hash,
            is_admin: new.is_admin,
            disabled: false,
            created_at: now,
        }
    }
}

/// What `create_user` needs; the store assigns the id and the creation time.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub is_admin: bool,
}

/// An API key as stored: its SHA-256, never the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub hash: [u8; 32],
    pub created_at: Millis,
    pub last_used_at: Option<Millis>,
}

/// A refresh token as stored, under its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RefreshRecord {
    pub(super) user_id: Uuid,
    pub(super) family: Uuid,
    pub(super) expires_at: Millis,
    /// Set when the token was exchanged for a new one; presenting it again is reuse.
    pub(super) rotated: bool,
}

/// What `update_user` changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserChange {
    pub is_admin: Option<bool>,
    pub disabled: Option<bool>,
    /// A new argon2id PHC string; setting one also deletes the user's refresh tokens.
    pub password_hash: Option<String>,
}

/// The outcome of an account change that a rule may refuse.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountChange<T> {
    Done(T),
    /// Refused: it would leave no active (enabled) admin. Nothing was written.
    LastAdmin,
}

/// A deleted user and how much of their data went with them.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletedUser {
    pub user: User,
    pub conversations: u64,
    pub messages: u64,
    pub api_keys: u64,
    pub refresh_tokens: u64,
    pub jobs: u64,
}

/// The result of presenting a refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was live; it is now rotated and the new one stored in the same family.
    Rotated { user_id: Uuid },
    /// The token had already been rotated: its whole family is now revoked.
    Reused,
    /// Unknown, expired, or of a revoked family.
    Invalid,
}

impl Redb {
    /// Creates a user; usernames and emails are unique ignoring case.
    pub async fn create_user(&self, new: NewUser, now: Millis) -> Result<User, StoreError> {
        self.write(move |tx| {
            let mut by_name = tx.open_table(tables::USER_BY_NAME)?;
            let mut by_email = tx.open_table(tables::USER_BY_EMAIL)?;
            let (name_key, email_key) = (new.username.to_lowercase(), new.email.to_lowercase());
            if by_name.get(name_key.as_str())?.is_some() {
                return Err(StoreError::Conflict(UniqueField::Username));
            }
            if by_email.get(email_key.as_str())?.is_some() {
                return Err(StoreError::Conflict(UniqueField::Email));
            }
            let user = User::new(new, now);
            by_name.insert(name_key.as_str(), user.id.as_u128())?;
            by_email.insert(email_key.as_str(), user.id.as_u128())?;
            tx.open_table(tables::USERS)?.insert(user.id.as_u128(), encode(&user).as_slice())?;
            Ok(user)
        })
        .await
    }

    /// The user with this id, disabled or not.
    pub fn user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        self.read(|tx| get(&tx.open_table(tables::USERS)?, "users", id.as_u128()))
    }

    /// The user with this username, ignoring case.
    pub fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        self.read(|tx| {
            let id = tx.open_table(tables::USER_BY_NAME)?.get(username.to_lowercase().as_str())?;
            match id {
                Some(id) => get(&tx.open_table(tables::USERS)?, "users", id.value()),
                None => Ok(None),
            }
        })
    }

    /// Every user, oldest first (ids are UUIDv7, so id order is creation order).
    pub fn users(&self) -> Result<Vec<User>, StoreError> {
        self.read(|tx| {
            let table = tx.open_table(tables::USERS)?;
            let mut out = Vec::new();
            for row in table.iter()? {
                out.push(decode("users", row?.1.value())?);
            }
            Ok(out)
        })
    }

    /// Changes a user; demoting the last active admin is refused (`LastAdmin`).
    pub async fn update_user(
        &self,
        id: Uuid,
        change: UserChange,
    ) -> Result<AccountChange<User>, StoreError> {
        self.write(move |tx| {
            let mut user: User = get(&tx.open_table(tables::USERS)?, "users", id.as_u128())?
                .ok_or(StoreError::NotFound)?;
            if change.is_admin == Some(false) && is_last_admin(tx, &user)? {
                return Ok(AccountChange::LastAdmin);
            }
            user.is_admin = change.is_admin.unwrap_or(user.is_admin);
            user.disabled = change.disabled.unwrap_or(user.disabled);
            if let Some(hash) = change.password_hash {
                user.password_hash = hash;
                delete_refresh_tokens(tx, id)?;
            }
            tx.open_table(tables::USERS)?.insert(id.as_u128(), encode(&user).as_slice())?;
            Ok(AccountChange::Done(user))
        })
        .await
    }

    /// Deletes a user and, in the same transaction, their conversations and messages, API keys,
    /// refresh tokens and background jobs (with their indexes and counts). Deleting the last
    /// active admin is refused (`LastAdmin`).
    pub async fn delete_user(&self, id: Uuid) -> Result<AccountChange<DeletedUser>, StoreError> {
        self.write(move |tx| {
            let user: User = get(&tx.open_table(tables::USERS)?, "users", id.as_u128())?
                .ok_or(StoreError::NotFound)?;
            if is_last_admin(tx, &user)? {
                return Ok(AccountChange::LastAdmin);
            }
            tx.open_table(tables::USERS)?.remove(id.as_u128())?;
            tx.open_table(tables::USER_BY_NAME)?.remove(user.username.to_lowercase().as_str())?;
            tx.open_table(tables::USER_BY_EMAIL)?.remove(user.email.to_lowercase().as_str())?;
            let api_keys = delete_api_keys(tx, id)?;
            let refresh_tokens = delete_refresh_tokens(tx, id)?;
            let (conversations, messages) = super::conversations::delete_all_in(tx, id)?;
            let jobs = super::jobs::delete_user_jobs_in(tx, id)?;
            Ok(AccountChange::Done(DeletedUser {
                user,
                conversations,
                messages,
                api_keys,
                refresh_tokens,
                jobs,
            }))
        })
        .await
    }

    /// Stores a new API key record (the caller made the key and hashed it); `NotFound` when
    /// its user was deleted meanwhile.
    pub async fn create_api_key(&self, key: ApiKeyRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            ensure_user(tx, key.user_id)?;
            tx.open_table(tables::API_KEY_BY_HASH)?
                .insert(key.hash.as_slice(), key.id.as_u128())?;
            tx.open_table(tables::API_KEYS_BY_USER)?
                .insert((key.user_id.as_u128(), key.id.as_u128()), ())?;
            tx.open_table(tables::API_KEYS)?.insert(key.id.as_u128(), encode(&key).as_slice())?;
            Ok(())
        })
        .await
    }

    /// The live key with this hash, if any.
    pub fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.read(|tx| {
            let id = tx.open_table(tables::API_KEY_BY_HASH)?.get(hash.as_slice())?;
            match id {
                Some(id) => get(&tx.open_table(tables::API_KEYS)?, "api_keys", id.value()),
                None => Ok(None),
            }
        })
    }

    /// A user's live keys, oldest first.
    pub fn api_keys(&self, user_id: Uuid) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.read(|tx| {
            let index = tx.open_table(tables::API_KEYS_BY_USER)?;
            let keys = tx.open_table(tables::API_KEYS)?;
            let u = user_id.as_u128();
            let mut out = Vec::new();
            for row in index.range((u, 0)..=(u, u128::MAX))? {
                let (_, id) = row?.0.value();
                out.extend(get::<u128, ApiKeyRecord>(&keys, "api_keys", id)?);
            }
            Ok(out)
        })
    }

    /// Deletes one of the user's keys; `NotFound` when it is not theirs.
    pub async fn revoke_api_key(&self, user_id: Uuid, key_id: Uuid) -> Result<(), StoreError> {
        self.write(move |tx| {
            let mut keys = tx.open_table(tables::API_KEYS)?;
            let key: ApiKeyRecord =
                get(&keys, "api_keys", key_id.as_u128())?.ok_or(StoreError::NotFound)?;
            if key.user_id != user_id {
                return Err(StoreError::NotFound);
            }
            keys.remove(key_id.as_u128())?;
            tx.open_table(tables::API_KEY_BY_HASH)?.remove(key.hash.as_slice())?;
            tx.open_table(tables::API_KEYS_BY_USER)?
                .remove((user_id.as_u128(), key_id.as_u128()))?;
            Ok(())
        })
        .await
    }

    /// Records that a key was used; a revoked key is left alone.
    pub async fn touch_api_key(&self, key_id: Uuid, now: Millis) -> Result<(), StoreError> {
        self.write(move |tx| {
            let mut keys = tx.open_table(tables::API_KEYS)?;
            let found: Option<ApiKeyRecord> = get(&keys, "api_keys", key_id.as_u128())?;
            if let Some(mut key) = found {
                key.last_used_at = Some(now);
                keys.insert(key_id.as_u128(), encode(&key).as_slice())?;
            }
            Ok(())
        })
        .await
    }

    /// Stores the first refresh token of a new family (a login); `NotFound` when its user was
    /// deleted meanwhile.
    pub async fn insert_refresh_token(
        &self,
        hash: [u8; 32],
        user_id: Uuid,
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        let record = RefreshRecord { user_id, family: Uuid::now_v7(), expires_at, rotated: false };
        self.write(move |tx| {
            ensure_user(tx, user_id)?;
            tx.open_table(tables::REFRESH_TOKENS)?
                .insert(hash.as_slice(), encode(&record).as_slice())?;
            index_expiry(tx, &hash, expires_at)
        })
        .await
    }

    /// Deletes up to `limit` refresh tokens that expired before `now`; returns how many.
    /// Revoked families stay (a few bytes each) so a stolen token never comes back to life.
    pub async fn purge_expired_refresh_tokens(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut by_expiry = tx.open_table(tables::REFRESH_BY_EXPIRY)?;
            let mut tokens = tx.open_table(tables::REFRESH_TOKENS)?;
            let mut expired = Vec::new();
            for row in by_expiry.range::<(u64, &[u8])>(..(now.max(0) as u64, &[][..]))? {
                let key = row?.0;
                let (at, hash) = key.value();
                expired.push((at, hash.to_vec()));
                if expired.len() == limit {
                    break;
                }
            }
            for (at, hash) in &expired {
                by_expiry.remove((*at, hash.as_slice()))?;
                tokens.remove(hash.as_slice())?;
            }
            Ok(expired.len())
        })
        .await
    }

    /// Exchanges `old` for `new` in one transaction: rotation, and reuse detection that
    /// revokes the whole family when a rotated token comes back.
    pub async fn rotate_refresh_token(
        &self,
        old: [u8; 32],
        new: [u8; 32],
        now: Millis,
        new_expires_at: Millis,
    ) -> Result<RotateOutcome, StoreError> {
        // A made-up token costs a read, not a durable commit.
        if !self.has_refresh_token(&old)? {
            return Ok(RotateOutcome::Invalid);
        }
        self.write(move |tx| {
            let mut tokens = tx.open_table(tables::REFRESH_TOKENS)?;
            let mut revoked = tx.open_table(tables::REVOKED_FAMILIES)?;
            let Some(mut record) =
                get::<&[u8], RefreshRecord>(&tokens, "refresh_tokens", old.as_slice())?
            else {
                return Ok(RotateOutcome::Invalid);
            };
            let family = record.family.as_u128();
            if revoked.get(family)?.is_some() || record.expires_at <= now {
                return Ok(RotateOutcome::Invalid);
            }
            if record.rotated {
                revoked.insert(family, now)?;
                return Ok(RotateOutcome::Reused);
            }
            record.rotated = true;
            tokens.insert(old.as_slice(), encode(&record).as_slice())?;
            let next =
                RefreshRecord { expires_at: new_expires_at, rotated: false, ..record.clone() };
            tokens.insert(new.as_slice(), encode(&next).as_slice())?;
            drop(tokens);
            index_expiry(tx, &new, new_expires_at)?;
            Ok(RotateOutcome::Rotated { user_id: record.user_id })
        })
        .await
    }

    pub(super) fn has_refresh_token(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.read(|tx| Ok(tx.open_table(tables::REFRESH_TOKENS)?.get(hash.as_slice())?.is_some()))
    }

    /// Revokes the family of this refresh token (logout); unknown tokens are ignored.
    pub async fn revoke_refresh_token(
        &self,
        hash: [u8; 32],
        now: Millis,
    ) -> Result<(), StoreError> {
        if !self.has_refresh_token(&hash)? {
            return Ok(());
        }
        self.write(move |tx| {
            let tokens = tx.open_table(tables::REFRESH_TOKENS)?;
            let found = get::<&[u8], RefreshRecord>(&tokens, "refresh_tokens", hash.as_slice())?;
            if let Some(record) = found {
                tx.open_table(tables::REVOKED_FAMILIES)?.insert(record.family.as_u128(), now)?;
            }
            Ok(())
        })
        .await
    }
}

/// `NotFound` unless the user exists: rows written for a user deleted a moment ago would
/// outlive them.
fn ensure_user(tx: &redb::WriteTransaction, id: Uuid) -> Result<(), StoreError> {
    match tx.open_table(tables::USERS)?.get(id.as_u128())? {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound),
    }
}

/// Whether `user` is an active admin and no other active admin exists (a scan of the users:
/// admin changes are rare).
fn is_last_admin(tx: &redb::WriteTransaction, user: &User) -> Result<bool, StoreError> {
    if !user.is_admin || user.disabled {
        return Ok(false);
    }
    for row in tx.open_table(tables::USERS)?.iter()? {
        let other: User = decode("users", row?.1.value())?;
        if other.id != user.id && other.is_admin && !other.disabled {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Deletes every API key of `user_id`; returns how many.
fn delete_api_keys(tx: &redb::WriteTransaction, user_id: Uuid) -> Result<u64, StoreError> {
    let u = user_id.as_u128();
    let mut index = tx.open_table(tables::API_KEYS_BY_USER)?;
    let ids: Vec<u128> = index
        .range((u, 0)..=(u, u128::MAX))?
        .map(|row| row.map(|(k, _)| k.value().1))
        .collect::<Result<_, _>>()?;
    let mut keys = tx.open_table(tables::API_KEYS)?;
    let mut by_hash = tx.open_table(tables::API_KEY_BY_HASH)?;
    for id in &ids {
        if let Some(key) = get::<u128, ApiKeyRecord>(&keys, "api_keys", *id)? {
            by_hash.remove(key.hash.as_slice())?;
        }
        keys.remove(*id)?;
        index.remove((u, *id))?;
    }
    Ok(ids.len() as u64)
}

/// Deletes every refresh token of `user_id` (and their families' revocation marks); returns
/// how many. Tokens are keyed by hash, so this scans them all: admin operations are rare, and
/// the purge keeps the table to the tokens of the last `refresh_token_ttl_secs`.
fn delete_refresh_tokens(tx: &redb::WriteTransaction, user_id: Uuid) -> Result<u64, StoreError> {
    let mut tokens = tx.open_table(tables::REFRESH_TOKENS)?;
    let mut theirs = Vec::new();
    for row in tokens.iter()? {
        let (hash, record) = row?;
        let record: RefreshRecord = decode("refresh_tokens", record.value())?;
        if record.user_id == user_id {
            theirs.push((hash.value().to_vec(), record));
        }
    }
    let mut by_expiry = tx.open_table(tables::REFRESH_BY_EXPIRY)?;
    let mut revoked = tx.open_table(tables::REVOKED_FAMILIES)?;
    for (hash, record) in &theirs {
        tokens.remove(hash.as_slice())?;
        by_expiry.remove((record.expires_at.max(0) as u64, hash.as_slice()))?;
        revoked.remove(record.family.as_u128())?;
    }
    Ok(theirs.len() as u64)
}

/// Files a refresh token under its expiry so the purge finds it without a scan.
fn index_expiry(
    tx: &redb::WriteTransaction,
    hash: &[u8],
    expires_at: Millis,
) -> Result<(), StoreError> {
    tx.open_table(tables::REFRESH_BY_EXPIRY)?.insert((expires_at.max(0) as u64, hash), ())?;
    Ok(())
}

/// Schema 1 → 2: index every stored refresh token by its expiry.
pub(super) fn migrate_refresh_expiry(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let tokens = tx.open_table(tables::REFRESH_TOKENS)?;
    for row in tokens.iter()? {
        let (hash, record) = row?;
        let record: RefreshRecord = decode("refresh_tokens", record.value())?;
        index_expiry(tx, hash.value(), record.expires_at)?;
    }
    Ok(())
}

#[cfg(test)]
impl Redb {
    /// Rows in every table, by name.
    pub(super) fn table_sizes(&self) -> Vec<(String, u64)> {
        use redb::ReadableTableMetadata;
        macro_rules! lens {
            ($tx:ident, $($t:ident),*) => {
                vec![$((stringify!($t).to_string(), $tx.open_table(tables::$t)?.len()?)),*]
            };
        }
        self.read(|tx| {
            Ok(lens!(
                tx,
                USERS,
                USER_BY_NAME,
                USER_BY_EMAIL,
                API_KEYS,
                API_KEY_BY_HASH,
                API_KEYS_BY_USER,
                REFRESH_TOKENS,
                REFRESH_BY_EXPIRY,
                REVOKED_FAMILIES,
                CONVERSATIONS,
                CONVERSATIONS_BY_USER,
                MESSAGES,
                JOBS,
                JOBS_QUEUED,
                JOBS_RUNNING,
                JOBS_FINISHED,
                JOBS_BY_USER,
                JOBS_ACTIVE_BY_USER,
                JOB_COUNTS
            ))
        })
        .unwrap()
    }
}
