//! Account administration: what admins do over `/admin/users*` and operators through
//! `edgechat user …` — reset a password, grant or revoke admin, disable, delete with all the
//! user's data, and see or revoke another user's API keys.
//!
//! Two rules keep a server administrable: no change may leave it without an active admin
//! (deleting or demoting the last one is refused; disabling stays possible, as an emergency
//! brake the CLI can undo), and over the API an admin cannot delete, demote or disable their
//! own account — another admin or the CLI can.

use super::{Auth, AuthError};
use crate::config::{AuthConfig, RegistrationMode};
use crate::secret::Secret;
use crate::store::{AccountChange, ApiKeyRecord, DeletedUser, StoreError, User, UserChange};
use std::net::SocketAddr;
use uuid::Uuid;

/// Who asks for an account change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// An admin over HTTP, by user id: may not act on their own account's role or existence.
    Admin(Uuid),
    /// The operator through the CLI (shell access to the data directory).
    Operator,
}

/// The warning to log at start when anyone who can reach `listen` may create an account.
pub fn registration_warning(auth: &AuthConfig, listen: SocketAddr) -> Option<String> {
    if auth.registration == RegistrationMode::Closed || listen.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "registration is open on {listen}, beyond loopback: anyone who reaches this port can \
         create an account and use the configured providers; set auth.registration = \"closed\" \
         and create accounts with `edgechat user create` or POST /admin/users"
    ))
}

fn found<T>(change: AccountChange<T>) -> Result<T, AuthError> {
    match change {
        AccountChange::Done(v) => Ok(v),
        AccountChange::LastAdmin => Err(AuthError::LastAdmin),
    }
}

fn user_error(e: StoreError) -> AuthError {
    match e {
        StoreError::NotFound => AuthError::UserNotFound,
        other => other.into(),
    }
}

impl Auth {
    /// Every account, oldest first.
    pub async fn users(&self) -> Result<Vec<User>, AuthError> {
        Ok(self.store.users().await?)
    }

    /// The account with this id.
    pub async fn user(&self, id: Uuid) -> Result<User, AuthError> {
        self.store.user(id).await?.ok_or(AuthError::UserNotFound)
    }

    /// The account with this username (ignoring case).
    pub async fn user_named(&self, username: &str) -> Result<User, AuthError> {
        self.store.user_by_username(username).await?.ok_or(AuthError::UserNotFound)
    }

    /// Sets a new password (already checked by `check_password`) and ends every session (refresh token) of the account; access
    /// tokens already issued live out their lifetime, API keys stay.
    pub async fn reset_password(&self, id: Uuid, password: &Secret) -> Result<User, AuthError> {
        let hash = self.hasher.hash(password).await?;
        let change = UserChange { password_hash: Some(hash), ..UserChange::default() };
        found(self.store.update_user(id, change).await.map_err(user_error)?)
    }

    /// Grants or revokes admin rights (`is_admin`) and disables or re-enables (`disabled`) in
    /// one write; `None` leaves that field. A disabled account's tokens and keys stop at once.
    pub async fn change_access(
        &self,
        actor: Actor,
        id: Uuid,
        is_admin: Option<bool>,
        disabled: Option<bool>,
    ) -> Result<User, AuthError> {
        let loses_access = is_admin == Some(false) || disabled == Some(true);
        if loses_access && actor == Actor::Admin(id) {
            return Err(AuthError::OwnAccount);
        }
        let change = UserChange { is_admin, disabled, password_hash: None };
        found(self.store.update_user(id, change).await.map_err(user_error)?)
    }

    /// Deletes the account and everything it owns in one transaction: conversations and their
    /// messages, API keys, refresh tokens, background jobs. A job running at that moment loses
    /// its lease at the next renewal and its result is discarded.
    pub async fn delete_user(&self, actor: Actor, id: Uuid) -> Result<DeletedUser, AuthError> {
        if actor == Actor::Admin(id) {
            return Err(AuthError::OwnAccount);
        }
        found(self.store.delete_user(id).await.map_err(user_error)?)
    }

    /// Another account's API keys (without the keys), oldest first.
    pub async fn user_api_keys(&self, id: Uuid) -> Result<Vec<ApiKeyRecord>, AuthError> {
        self.user(id).await?;
        self.api_keys(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_registration_beyond_loopback_is_warned_about() {
        let open = AuthConfig::default();
        let closed = AuthConfig { registration: RegistrationMode::Closed, ..open.clone() };
        for addr in ["127.0.0.1:8000", "[::1]:8000", "127.0.0.2:1"] {
            assert!(registration_warning(&open, addr.parse().unwrap()).is_none(), "{addr}");
        }
        for addr in ["0.0.0.0:8000", "[::]:8000", "10.0.0.5:443"] {
            let warning = registration_warning(&open, addr.parse().unwrap()).unwrap();
            assert!(warning.contains("auth.registration"), "{warning}");
            assert!(registration_warning(&closed, addr.parse().unwrap()).is_none());
        }
    }
}
