//! Accounts and credentials: registration, login, refresh-token rotation, API keys, and
//! turning an `Authorization` bearer value into a `Principal`.
//!
//! Invariants: passwords, tokens and keys are only ever stored hashed; an unknown user and a
//! wrong password take the same work and give the same error; every authentication loads the
//! user, so disabling one takes effect on the next request; failed logins throttle the address
//! that failed, and only slow down (never refuse) a username's logins from elsewhere.

mod admin;
mod limits;
mod password;
mod tokens;

pub use admin::{registration_warning, Actor};
pub use limits::{Gate, LoginLimits};
pub use password::{HashError, PasswordHasher};
pub use tokens::{generate_jwt_secret, Jwt, API_KEY_PREFIX};

use crate::clock::{now_ms, Millis};
use crate::ratelimit::{address_key, Decision};
use crate::secret::Secret;
use crate::store::{ApiKeyRecord, NewUser, RotateOutcome, Store, StoreError, UniqueField, User};
use std::net::IpAddr;
use tokens::{opaque_token, sha256, REFRESH_PREFIX};
use uuid::Uuid;

/// `last_used_at` is written at most this often per key, so a busy key does not cost a
/// write transaction per request.
const TOUCH_EVERY_MS: Millis = 60_000;

/// Why an authentication step failed. `api::error` maps each to a status and a body.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user or wrong password: deliberately indistinguishable.
    #[error("incorrect username or password")]
    BadCredentials,
    /// The right password for a disabled account.
    #[error("account disabled")]
    Disabled,
    /// Too many failed logins from this address (for this username, or for all).
    #[error("too many failed logins")]
    TooManyFailures(Decision),
    /// A bearer token or key that is missing, malformed, expired, forged, revoked, or whose
    /// user is gone or disabled; the reason is for logs only.
    #[error("invalid credentials: {0}")]
    Unauthenticated(&'static str),
    /// A refresh token that is unknown, expired, revoked, or reused.
    #[error("invalid refresh token: {0}")]
    BadRefreshToken(&'static str),
    #[error("username already registered")]
    UsernameTaken,
    #[error("email already registered")]
    EmailTaken,
    /// The API key does not exist or is not the caller's.
    #[error("api key not found")]
    KeyNotFound,
    /// An admin operation named a user that does not exist.
    #[error("user not found")]
    UserNotFound,
    /// Deleting or demoting this account would leave no active admin.
    #[error("the last admin cannot be deleted or demoted; grant admin to another account first")]
    LastAdmin,
    /// An admin tried to delete, demote or disable their own account over the API.
    #[error("admins cannot delete, demote or disable their own account")]
    OwnAccount,
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(UniqueField::Username) => AuthError::UsernameTaken,
            StoreError::Conflict(UniqueField::Email) => AuthError::EmailTaken,
            other => AuthError::Store(other),
        }
    }
}

/// A new account's fields, already validated by `check_username` and friends.
#[derive(Debug, Clone)]
pub struct Registration {
    pub username: String,
    pub email: String,
    pub password: Secret,
}

impl Registration {
    /// Each rule the account's fields break, by field name; empty when it may be created.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        [
            ("username", check_username(&self.username)),
            ("email", check_email(&self.email)),
            ("password", check_password(self.password.expose())),
        ]
        .into_iter()
        .filter_map(|(field, result)| result.err().map(|msg| (field, msg)))
        .collect()
    }
}

/// What login and refresh hand out.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: Secret,
    pub expires_in: u64,
    pub refresh_token: Secret,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: User,
    /// Set when the caller used an API key rather than a JWT.
    pub api_key: Option<Uuid>,
}

/// A new API key: the record as stored, and the key itself, shown to its owner once.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    pub record: ApiKeyRecord,
    pub key: Secret,
}

/// The user a credential names, if they may still act: not deleted, not disabled.
fn live(user: Option<User>) -> Result<User, AuthError> {
    match user {
        Some(u) if !u.disabled => Ok(u),
        Some(_) => Err(AuthError::Unauthenticated("user disabled")),
        None => Err(AuthError::Unauthenticated("user gone")),
    }
}

/// Settings for `Auth::new`.
pub struct AuthSettings {
    pub jwt: Jwt,
    pub refresh_ttl_secs: u64,
    pub max_concurrent_hashes: usize,
    pub login_limits: LoginLimits,
}

impl AuthSettings {
    /// The settings `config` describes, signing with `jwt_secret`.
    pub fn from_config(config: &crate::config::Config, jwt_secret: &Secret) -> AuthSettings {
        let a = &config.auth;
        AuthSettings {
            jwt: Jwt::new(jwt_secret, &a.issuer, &a.audience, a.access_token_ttl_secs),
            refresh_ttl_secs: a.refresh_token_ttl_secs,
            max_concurrent_hashes: a.max_concurrent_hashes,
            login_limits: LoginLimits::new(&config.rate_limit),
        }
    }
}

/// The accounts service.
pub struct Auth {
    store: Store,
    hasher: PasswordHasher,
    jwt: Jwt,
    refresh_ttl_ms: Millis,
    login_limits: LoginLimits,
}

impl Auth {
    /// The service over `store`.
    pub fn new(store: Store, settings: AuthSettings) -> Auth {
        Auth {
            hasher: PasswordHasher::new(settings.max_concurrent_hashes),
            jwt: settings.jwt,
            refresh_ttl_ms: settings.refresh_ttl_secs.saturating_mul(1000) as Millis,
            login_limits: settings.login_limits.share(&store),
            store,
        }
    }

    /// Creates an account (admins only through the CLI).
    pub async fn register(&self, reg: Registration, is_admin: bool) -> Result<User, AuthError> {
        let password_hash = self.hasher.hash(&reg.password).await?;
        let new = NewUser { username: reg.username, email: reg.email, password_hash, is_admin };
        Ok(self.store.create_user(new, now_ms()).await?)
    }

    /// Checks a password from `client` and starts a new refresh-token family.
    ///
    /// Failed-login limits are decided before any work, the same way for every username, so a
    /// refusal reveals nothing; past them, exactly one argon2 verification runs whether or not
    /// the user exists.
    pub async fn login(
        &self,
        username: &str,
        password: &Secret,
        client: IpAddr,
    ) -> Result<TokenPair, AuthError> {
        let address = address_key(client);
        // A name no account can have stays out of the per-name tables (it may be huge).
        let name = check_username(username).is_ok().then(|| username.to_lowercase());
        let attempt = match self.login_limits.gate(&address, name.as_deref()).await {
            Gate::Refused(d) => return Err(AuthError::TooManyFailures(d)),
            Gate::Slowed(attempt, delay) => {
                tokio::time::sleep(delay).await;
                attempt
            }
            Gate::Open(attempt) => attempt,
        };
        let user = match &name {
            Some(_) => self.store.user_by_username(username).await?,
            None => None,
        };
        let ok = match &user {
            Some(u) => self.hasher.verify(password, &u.password_hash).await?,
            None => self.hasher.verify_nobody(password).await?,
        };
        let user = match user {
            Some(u) if ok => u,
            _ => {
                attempt.failed().await;
                return Err(AuthError::BadCredentials);
            }
        };
        attempt.succeeded().await;
        if user.disabled {
            return Err(AuthError::Disabled);
        }
        let (refresh, hash) = opaque_token(REFRESH_PREFIX);
        let expires = now_ms() + self.refresh_ttl_ms;
        match self.store.insert_refresh_token(hash, user.id, expires).await {
            // Deleted while its password was being checked.
            Err(StoreError::NotFound) => return Err(AuthError::BadCredentials),
            other => other?,
        }
        Ok(self.pair(user.id, refresh))
    }

    /// Rotates a refresh token: the old one dies, reuse of a dead one kills its family.
    pub async fn refresh(&self, token: &Secret) -> Result<TokenPair, AuthError> {
        let (next, next_hash) = opaque_token(REFRESH_PREFIX);
        let now = now_ms();
        let outcome = self
            .store
            .rotate_refresh_token(sha256(token.expose()), next_hash, now, now + self.refresh_ttl_ms)
            .await?;
        let user_id = match outcome {
            RotateOutcome::Rotated { user_id } => user_id,
            RotateOutcome::Reused => {
                return Err(AuthError::BadRefreshToken("reused; family revoked"))
            }
            RotateOutcome::Invalid => return Err(AuthError::BadRefreshToken("unknown or expired")),
        };
        self.live_user(user_id).await?;
        Ok(self.pair(user_id, next))
    }

    /// Ends the session this refresh token belongs to.
    pub async fn logout(&self, token: &Secret) -> Result<(), AuthError> {
        Ok(self.store.revoke_refresh_token(sha256(token.expose()), now_ms()).await?)
    }

    /// The caller behind a bearer value: an API key (`ec_…`) or an access JWT.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal, AuthError> {
        if bearer.starts_with(API_KEY_PREFIX) {
            let (key, user) = self
                .store
                .api_key_owner(&sha256(bearer))
                .await?
                .ok_or(AuthError::Unauthenticated("unknown api key"))?;
            let user = live(Some(user))?;
            let now = now_ms();
            if key.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY_MS) {
                // Bookkeeping: a failed write must not fail a valid request.
                if let Err(e) = self.store.touch_api_key(key.id, now).await {
                    tracing::warn!(error = %e, "could not record API key use");
                }
            }
            return Ok(Principal { user, api_key: Some(key.id) });
        }
        let user_id = self.jwt.verify(bearer).map_err(AuthError::Unauthenticated)?;
        Ok(Principal { user: self.live_user(user_id).await?, api_key: None })
    }

    /// Makes a key for `user`; the returned `key` is the only copy that will ever exist.
    pub async fn create_api_key(&self, user: Uuid, name: String) -> Result<IssuedKey, AuthError> {
        let (key, hash) = opaque_token(API_KEY_PREFIX);
        let record = ApiKeyRecord {
            id: Uuid::now_v7(),
            user_id: user,
            name,
            hash,
            created_at: now_ms(),
            last_used_at: None,
        };
        self.store.create_api_key(record.clone()).await.map_err(|e| match e {
            StoreError::NotFound => AuthError::Unauthenticated("user gone"),
            other => other.into(),
        })?;
        Ok(IssuedKey { record, key })
    }

    /// The user's keys, oldest first.
    pub async fn api_keys(&self, user: Uuid) -> Result<Vec<ApiKeyRecord>, AuthError> {
        Ok(self.store.api_keys(user).await?)
    }

    /// Revokes one of the user's keys at once.
    pub async fn revoke_api_key(&self, user: Uuid, key: Uuid) -> Result<(), AuthError> {
        self.store.revoke_api_key(user, key).await.map_err(|e| match e {
            StoreError::NotFound => AuthError::KeyNotFound,
            other => other.into(),
        })
    }

    async fn live_user(&self, id: Uuid) -> Result<User, AuthError> {
        live(self.store.user(id).await?)
    }

    fn pair(&self, user: Uuid, refresh_token: Secret) -> TokenPair {
        let now_secs = (now_ms() / 1000) as u64;
        TokenPair {
            access_token: self.jwt.issue(user, now_secs),
            expires_in: self.jwt.ttl_secs(),
            refresh_token,
        }
    }
}

/// 3–32 characters of `[A-Za-z0-9_.-]`.
pub fn check_username(name: &str) -> Result<(), &'static str> {
    if !(3..=32).contains(&name.chars().count()) {
        return Err("username must be 3 to 32 characters long");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err("username may contain only letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

/// A plausible address: one `@`, something before it, a dotted domain after it, no spaces.
pub fn check_email(email: &str) -> Result<(), &'static str> {
    const BAD: &str = "value is not a valid email address";
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BAD);
    }
    let Some((local, domain)) = email.split_once('@') else { return Err(BAD) };
    let domain_ok = domain.contains('.')
        && !domain.contains('@')
        && !domain.starts_with(['.', '-'])
        && !domain.ends_with(['.', '-'])
        && !domain.contains("..");
    if local.is_empty() || local.len() > 64 || !domain_ok {
        return Err(BAD);
    }
    Ok(())
}

/// An API key's name: 1–100 characters, not all spaces, printable: no control or invisible
/// characters, no line breaks or other whitespace than the space, and no `<` or `>`, so a name
/// can be shown anywhere (a terminal, a log, a page) as the text it looks like.
pub fn check_key_name(name: &str) -> Result<(), &'static str> {
    if name.chars().count() > 100 || name.trim().is_empty() {
        return Err("name must be 1 to 100 characters long, not all spaces");
    }
    if name.chars().any(unprintable) {
        return Err("name may contain only printable characters and spaces (no control or invisible characters, no line breaks, no '<' or '>')");
    }
    Ok(())
}

/// The characters `check_key_name` refuses; the `pattern` of `api::auth::ApiKeyRequest` states
/// the same set for clients (and schemathesis).
fn unprintable(c: char) -> bool {
    matches!(c,
        '<' | '>'
        | '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{a0}' | '\u{ad}' | '\u{61c}' | '\u{1680}'
        | '\u{180e}' | '\u{2000}'..='\u{200f}' | '\u{2028}'..='\u{202f}'
        | '\u{205f}'..='\u{206f}' | '\u{3000}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// At least 8 characters to resist guessing, at most 1024 bytes to bound hashing work.
pub fn check_password(password: &str) -> Result<(), &'static str> {
    if password.chars().count() < 8 {
        return Err("password must be at least 8 characters long");
    }
    if password.len() > 1024 {
        return Err("password must be at most 1024 bytes long");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rules() {
        for ok in ["abc", "a_b.c-D9", &"x".repeat(32)] {
            assert!(check_username(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", &"x".repeat(33), "has space", "émile", "semi;colon"] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(check_email(ok).is_ok(), "{ok}");
        }
        for bad in ["", "plain", "@b.co", "a@b", "a@@b.co", "a b@c.de", "a@.b.co", "a@b..co"] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_password("1234567").is_err());
        assert!(check_password("ééé").is_err(), "6 bytes but 3 characters");
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"p".repeat(1024)).is_ok());
        assert!(check_password(&"p".repeat(1025)).is_err());
        for ok in
            ["laptop", " CI: deploy (prod) ", "café & co", "日本語のキー", "🔑", &"k".repeat(100)]
        {
            assert!(check_key_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "   ",
            "a\0b",
            "<script>",
            "x>y",
            "tab\there",
            "line\nbreak",
            "del\u{7f}",
            "nb\u{a0}sp",
            "zero\u{200b}width",
            "rtl\u{202e}override",
            "bom\u{feff}",
            &"k".repeat(101),
        ] {
            assert!(check_key_name(bad).is_err(), "{bad:?}");
        }
        // Every Unicode whitespace but the space is refused, so `trim` only ever trims spaces.
        for c in (0..=0x10ffff).filter_map(char::from_u32).filter(|c| c.is_whitespace()) {
            assert!(c == ' ' || unprintable(c), "{:04x}", c as u32);
        }
        for c in (0..=0x10ffff).filter_map(char::from_u32).filter(|c| c.is_control()) {
            assert!(unprintable(c), "{:04x}", c as u32);
        }
    }
}
