//! Users, API keys and refresh tokens on PostgreSQL. A refresh token is rotated under its row's
//! lock, so two replicas presenting the same token see one rotation and one reuse.

use super::{col, exec, one, rows, Pg, ADMIN_LOCK};
use crate::clock::Millis;
use crate::store::{
    AccountChange, ApiKeyRecord, DeletedUser, NewUser, RotateOutcome, StoreError, User, UserChange,
};
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::Row;
use uuid::Uuid;

const USER_COLUMNS: &str = "id, username, email, password_hash, is_admin, disabled, created_at";
const KEY_COLUMNS: &str = "id, user_id, name, hash, created_at, last_used_at";

fn user_of(row: &Row) -> Result<User, StoreError> {
    let t = "users";
    Ok(User {
        id: col(row, t, "id")?,
        username: col(row, t, "username")?,
        email: col(row, t, "email")?,
        password_hash: col(row, t, "password_hash")?,
        is_admin: col(row, t, "is_admin")?,
        disabled: col(row, t, "disabled")?,
        created_at: col(row, t, "created_at")?,
    })
}

fn key_of(row: &Row) -> Result<ApiKeyRecord, StoreError> {
    let t = "api_keys";
    let hash: Vec<u8> = col(row, t, "hash")?;
    Ok(ApiKeyRecord {
        id: col(row, t, "id")?,
        user_id: col(row, t, "user_id")?,
        name: col(row, t, "name")?,
        hash: hash.try_into().map_err(|_| StoreError::Corrupt {
            table: t,
            message: "hash is not 32 bytes".into(),
        })?,
        created_at: col(row, t, "created_at")?,
        last_used_at: col(row, t, "last_used_at")?,
    })
}

impl Pg {
    pub(in crate::store) async fn create_user(
        &self,
        new: NewUser,
        now: Millis,
    ) -> Result<User, StoreError> {
        let user = User::new(new, now);
        insert_user(&self.client().await?, &user).await?;
        Ok(user)
    }

    pub(in crate::store) async fn user(&self, id: Uuid) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        one(&client, &sql, &[&id]).await?.as_ref().map(user_of).transpose()
    }

    pub(in crate::store) async fn user_by_username(
        &self,
        username: &str,
    ) -> Result<Option<User>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE name_key = $1");
        one(&client, &sql, &[&username.to_lowercase()]).await?.as_ref().map(user_of).transpose()
    }

    pub(in crate::store) async fn users(&self) -> Result<Vec<User>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY id");
        rows(&client, &sql, &[]).await?.iter().map(user_of).collect()
    }

    pub(in crate::store) async fn update_user(
        &self,
        id: Uuid,
        change: UserChange,
    ) -> Result<AccountChange<User>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut user = locked_user(&tx, id).await?.ok_or(StoreError::NotFound)?;
        if change.is_admin == Some(false) && is_last_admin(&tx, &user).await? {
            return Ok(AccountChange::LastAdmin);
        }
        user.is_admin = change.is_admin.unwrap_or(user.is_admin);
        user.disabled = change.disabled.unwrap_or(user.disabled);
        if let Some(hash) = change.password_hash {
            user.password_hash = hash;
            delete_refresh_tokens(&tx, id).await?;
        }
        exec(
            &tx,
            "UPDATE users SET is_admin = $2, disabled = $3, password_hash = $4 WHERE id = $1",
            &[&id, &user.is_admin, &user.disabled, &user.password_hash],
        )
        .await?;
        tx.commit().await?;
        Ok(AccountChange::Done(user))
    }

    pub(in crate::store) async fn delete_user(
        &self,
        id: Uuid,
    ) -> Result<AccountChange<DeletedUser>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let user = locked_user(&tx, id).await?.ok_or(StoreError::NotFound)?;
        if is_last_admin(&tx, &user).await? {
            return Ok(AccountChange::LastAdmin);
        }
        let messages = exec(
            &tx,
            "DELETE FROM messages WHERE conversation_id IN
                 (SELECT id FROM conversations WHERE user_id = $1)",
            &[&id],
        )
        .await?;
        let conversations =
            exec(&tx, "DELETE FROM conversations WHERE user_id = $1", &[&id]).await?;
        let api_keys = exec(&tx, "DELETE FROM api_keys WHERE user_id = $1", &[&id]).await?;
        let refresh_tokens = delete_refresh_tokens(&tx, id).await?;
        let jobs = super::jobs::delete_user_jobs(&tx, id).await?;
        exec(&tx, "DELETE FROM users WHERE id = $1", &[&id]).await?;
        tx.commit().await?;
        Ok(AccountChange::Done(DeletedUser {
            user,
            conversations,
            messages,
            api_keys,
            refresh_tokens,
            jobs,
        }))
    }

    pub(in crate::store) async fn create_api_key(
        &self,
        key: ApiKeyRecord,
    ) -> Result<(), StoreError> {
        // A key for a user deleted meanwhile breaks the foreign key: `NotFound`.
        insert_key(&self.client().await?, &key).await
    }

    pub(in crate::store) async fn api_key_owner(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<(ApiKeyRecord, User)>, StoreError> {
        let client = self.client().await?;
        let sql = "SELECT k.id AS key_id, k.name, k.hash, k.created_at AS key_created_at,
                          k.last_used_at, u.id, u.username, u.email, u.password_hash, u.is_admin,
                          u.disabled, u.created_at
                   FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.hash = $1";
        let Some(row) = one(&client, sql, &[&hash.as_slice()]).await? else { return Ok(None) };
        let user = user_of(&row)?;
        let key = ApiKeyRecord {
            id: col(&row, "api_keys", "key_id")?,
            user_id: user.id,
            name: col(&row, "api_keys", "name")?,
            hash: *hash,
            created_at: col(&row, "api_keys", "key_created_at")?,
            last_used_at: col(&row, "api_keys", "last_used_at")?,
        };
        Ok(Some((key, user)))
    }

    pub(in crate::store) async fn api_keys(
        &self,
        user_id: Uuid,
    ) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY id");
        rows(&client, &sql, &[&user_id]).await?.iter().map(key_of).collect()
    }

    pub(in crate::store) async fn revoke_api_key(
        &self,
        user_id: Uuid,
        key_id: Uuid,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let sql = "DELETE FROM api_keys WHERE id = $1 AND user_id = $2";
        match exec(&client, sql, &[&key_id, &user_id]).await? {
            0 => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    pub(in crate::store) async fn touch_api_key(
        &self,
        key_id: Uuid,
        now: Millis,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        exec(&client, "UPDATE api_keys SET last_used_at = $2 WHERE id = $1", &[&key_id, &now])
            .await?;
        Ok(())
    }

    pub(in crate::store) async fn insert_refresh_token(
        &self,
        hash: [u8; 32],
        user_id: Uuid,
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        exec(
            &client,
            "INSERT INTO refresh_tokens (hash, user_id, family, expires_at, rotated)
             VALUES ($1, $2, $3, $4, false)",
            &[&hash.as_slice(), &user_id, &Uuid::now_v7(), &expires_at],
        )
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn purge_expired_refresh_tokens(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let client = self.client().await?;
        // Replicas purging at once take different rows.
        let n = exec(
            &client,
            "DELETE FROM refresh_tokens WHERE hash IN
                 (SELECT hash FROM refresh_tokens WHERE expires_at < $1
                  ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&now, &(limit as i64)],
        )
        .await?;
        Ok(n as usize)
    }

    pub(in crate::store) async fn rotate_refresh_token(
        &self,
        old: [u8; 32],
        new: [u8; 32],
        now: Millis,
        new_expires_at: Millis,
    ) -> Result<RotateOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = one(
            &tx,
            "SELECT t.user_id, t.family, t.expires_at, t.rotated,
                    EXISTS (SELECT 1 FROM revoked_families r WHERE r.family = t.family) AS revoked
             FROM refresh_tokens t WHERE t.hash = $1 FOR UPDATE OF t",
            &[&old.as_slice()],
        )
        .await?
        else {
            return Ok(RotateOutcome::Invalid);
        };
        let t = "refresh_tokens";
        let (user_id, family): (Uuid, Uuid) = (col(&row, t, "user_id")?, col(&row, t, "family")?);
        let expires_at: Millis = col(&row, t, "expires_at")?;
        if col::<bool>(&row, t, "revoked")? || expires_at <= now {
            return Ok(RotateOutcome::Invalid);
        }
        if col::<bool>(&row, t, "rotated")? {
            revoke_family(&tx, family, now).await?;
            tx.commit().await?;
            return Ok(RotateOutcome::Reused);
        }
        exec(&tx, "UPDATE refresh_tokens SET rotated = true WHERE hash = $1", &[&old.as_slice()])
            .await?;
        exec(
            &tx,
            "INSERT INTO refresh_tokens (hash, user_id, family, expires_at, rotated)
             VALUES ($1, $2, $3, $4, false)",
            &[&new.as_slice(), &user_id, &family, &new_expires_at],
        )
        .await?;
        tx.commit().await?;
        Ok(RotateOutcome::Rotated { user_id })
    }

    #[cfg(test)]
    pub(in crate::store) async fn has_refresh_token(
        &self,
        hash: &[u8; 32],
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let sql = "SELECT 1 FROM refresh_tokens WHERE hash = $1";
        Ok(one(&client, sql, &[&hash.as_slice()]).await?.is_some())
    }

    pub(in crate::store) async fn revoke_refresh_token(
        &self,
        hash: [u8; 32],
        now: Millis,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        exec(
            &client,
            "INSERT INTO revoked_families (family, revoked_at)
             SELECT family, $2 FROM refresh_tokens WHERE hash = $1
             ON CONFLICT (family) DO UPDATE SET revoked_at = EXCLUDED.revoked_at",
            &[&hash.as_slice(), &now],
        )
        .await?;
        Ok(())
    }
}

/// The user, locked until the transaction ends, after the lock that serialises admin changes
/// (two replicas demoting the last two admins at once must not both succeed).
async fn locked_user(tx: &Transaction<'_>, id: Uuid) -> Result<Option<User>, StoreError> {
    exec(tx, "SELECT pg_advisory_xact_lock($1)", &[&ADMIN_LOCK]).await?;
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE");
    one(tx, &sql, &[&id]).await?.as_ref().map(user_of).transpose()
}

/// Whether `user` is an active admin and no other active admin exists.
async fn is_last_admin(tx: &Transaction<'_>, user: &User) -> Result<bool, StoreError> {
    if !user.is_admin || user.disabled {
        return Ok(false);
    }
    let other = one(
        tx,
        "SELECT 1 FROM users WHERE id <> $1 AND is_admin AND NOT disabled LIMIT 1",
        &[&user.id],
    )
    .await?;
    Ok(other.is_none())
}

/// Deletes every refresh token of `user_id` and their families' revocation marks; returns how
/// many tokens.
async fn delete_refresh_tokens<C: GenericClient>(c: &C, user_id: Uuid) -> Result<u64, StoreError> {
    exec(
        c,
        "DELETE FROM revoked_families WHERE family IN
             (SELECT family FROM refresh_tokens WHERE user_id = $1)",
        &[&user_id],
    )
    .await?;
    exec(c, "DELETE FROM refresh_tokens WHERE user_id = $1", &[&user_id]).await
}

async fn revoke_family(tx: &Transaction<'_>, family: Uuid, now: Millis) -> Result<(), StoreError> {
    exec(
        tx,
        "INSERT INTO revoked_families (family, revoked_at) VALUES ($1, $2)
         ON CONFLICT (family) DO UPDATE SET revoked_at = EXCLUDED.revoked_at",
        &[&family, &now],
    )
    .await?;
    Ok(())
}

/// One row as it is (`store copy` writes them too).
pub(super) async fn insert_user<C: GenericClient>(c: &C, u: &User) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO users (id, username, email, name_key, email_key, password_hash, is_admin,
                            disabled, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &u.id,
            &u.username,
            &u.email,
            &u.username.to_lowercase(),
            &u.email.to_lowercase(),
            &u.password_hash,
            &u.is_admin,
            &u.disabled,
            &u.created_at,
        ],
    )
    .await
    .map(|_| ())
}

/// One row as it is (`store copy` writes them too).
pub(super) async fn insert_key<C: GenericClient>(
    c: &C,
    k: &ApiKeyRecord,
) -> Result<(), StoreError> {
    exec(
        c,
        "INSERT INTO api_keys (id, user_id, name, hash, created_at, last_used_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&k.id, &k.user_id, &k.name, &k.hash.as_slice(), &k.created_at, &k.last_used_at],
    )
    .await
    .map(|_| ())
}
