//! `/auth/*`: registration, login (JSON or OAuth2 form), refresh, logout, `/auth/me`, API keys.

use super::error::FieldError;
use super::extract::{from_value, Checks, Encoded};
use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::auth::{check_key_name, Registration, TokenPair};
use crate::clock::rfc3339;
use crate::config::RegistrationMode;
use crate::http::{empty, json, Body};
use crate::secret::Secret;
use crate::store::{ApiKeyRecord, User};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::ToSchema;

type Answer = Result<Response<Body>, ApiError>;

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("auth", summary);
    r.add(
        Method::POST,
        "/auth/register",
        handler(register),
        doc("Create an account (403 when auth.registration is closed)")
            .body::<RegisterRequest>()
            .json::<UserOut>(200)
            .errors(&[403, 409]),
    );
    r.add(
        Method::POST,
        "/auth/login",
        handler(login),
        doc("Sign in with a password (JSON or OAuth2 form); 429 after repeated failures")
            .body::<LoginRequest>()
            .form()
            .json::<TokenOut>(200)
            .errors(&[401]),
    );
    r.add(
        Method::POST,
        "/auth/refresh",
        handler(refresh),
        doc("Exchange a refresh token for a new pair (the old one stops working)")
            .body::<RefreshRequest>()
            .json::<TokenOut>(200)
            .errors(&[401]),
    );
    r.add(
        Method::POST,
        "/auth/logout",
        handler(logout),
        doc("End the session of a refresh token").body::<RefreshRequest>().empty(204),
    );
    r.add(
        Method::GET,
        "/auth/me",
        handler(me),
        doc("The signed-in user").secured().json::<MeOut>(200),
    );
    r.add(
        Method::POST,
        "/auth/api-keys",
        handler(create_key),
        doc("Create an API key; the key is shown only in this answer")
            .secured()
            .body::<ApiKeyRequest>()
            .json::<ApiKeyCreated>(201),
    );
    r.add(
        Method::GET,
        "/auth/api-keys",
        handler(list_keys),
        doc("Your API keys (without the keys)").secured().json_list::<ApiKeyOut>(200),
    );
    r.add(
        Method::DELETE,
        "/auth/api-keys/{id}",
        handler(revoke_key),
        doc("Revoke an API key at once").secured().empty(204).errors(&[404]),
    );
}

/// `POST /auth/register`.
#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// 3–32 characters of letters, digits, `_`, `.`, `-`; unique ignoring case.
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]{3,32}$")]
    username: String,
    /// A plausible address, unique ignoring case.
    #[schema(format = Email, max_length = 254)]
    email: String,
    /// At least 8 characters and at most 1024 bytes (UTF-8).
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 1024)]
    password: Secret,
}

/// `POST /auth/login`.
#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    username: String,
    #[schema(value_type = String, format = Password)]
    password: Secret,
}

/// `POST /auth/refresh` and `POST /auth/logout`.
#[derive(Deserialize, ToSchema)]
pub struct RefreshRequest {
    #[schema(value_type = String)]
    refresh_token: Secret,
}

/// `POST /auth/api-keys`.
#[derive(Deserialize, ToSchema)]
pub struct ApiKeyRequest {
    /// 1–100 printable characters (not all spaces; no control or invisible characters, no line
    /// breaks, no `<` or `>`), to tell your keys apart. The pattern is `auth::check_key_name`'s
    /// rule: spaces around at least one allowed character.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^ *[^ <>\\x00-\\x1f\\x7f-\\xa0\\xad\\u061c\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f\
                   \\u205f-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb][^<>\\x00-\\x1f\\x7f-\\xa0\\xad\\u061c\\u1680\
                   \\u180e\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb]*$"
    )]
    name: String,
}

/// A user as others may see it.
#[derive(Serialize, ToSchema)]
pub struct UserOut {
    id: String,
    username: String,
    email: String,
    created_at: String,
}

/// The signed-in user.
#[derive(Serialize, ToSchema)]
pub struct MeOut {
    id: String,
    username: String,
    email: String,
    created_at: String,
    is_admin: bool,
}

/// An access token and the refresh token that renews it.
#[derive(Serialize, ToSchema)]
pub struct TokenOut {
    access_token: String,
    /// Always `bearer`.
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    refresh_token: String,
}

/// A new API key; `key` is never shown again.
#[derive(Serialize, ToSchema)]
pub struct ApiKeyCreated {
    id: String,
    name: String,
    key: String,
    created_at: String,
}

/// An API key without the key.
#[derive(Serialize, ToSchema)]
pub(super) struct ApiKeyOut {
    id: String,
    name: String,
    created_at: String,
    last_used_at: Option<String>,
}

impl From<&User> for UserOut {
    fn from(u: &User) -> Self {
        UserOut {
            id: u.id.to_string(),
            username: u.username.clone(),
            email: u.email.clone(),
            created_at: rfc3339(u.created_at),
        }
    }
}

impl From<&ApiKeyRecord> for ApiKeyOut {
    fn from(k: &ApiKeyRecord) -> Self {
        ApiKeyOut {
            id: k.id.to_string(),
            name: k.name.clone(),
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

/// The one place tokens leave the server: to their owner.
fn tokens(pair: TokenPair) -> Response<Body> {
    let out = TokenOut {
        access_token: pair.access_token.expose().to_string(),
        token_type: "bearer",
        expires_in: pair.expires_in,
        refresh_token: pair.refresh_token.expose().to_string(),
    };
    no_store(json(StatusCode::OK, &out))
}

/// Credentials in a response must not be kept by any cache (RFC 6749 §5.1).
fn no_store(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r.headers_mut().insert(http::header::PRAGMA, http::HeaderValue::from_static("no-cache"));
    r
}

async fn register(app: Arc<App>, mut req: Req) -> Answer {
    if app.config.auth.registration == RegistrationMode::Closed {
        return Err(ApiError::Forbidden(
            "Registration is closed on this server; ask an administrator for an account",
        ));
    }
    let body: RegisterRequest = req.json(&app).await?;
    let reg = Registration { username: body.username, email: body.email, password: body.password };
    Checks::default().all(reg.problems()).finish()?;
    let user = app.auth.register(reg, false).await?;
    Ok(json(StatusCode::OK, &UserOut::from(&user)))
}

async fn login(app: Arc<App>, mut req: Req) -> Answer {
    let creds: LoginRequest = match req.json_or_form(&app).await? {
        Encoded::Json(value) => from_value(value)?,
        Encoded::Form(pairs) => login_form(pairs)?,
    };
    // The TCP peer: forwarded headers are not trusted (any client could write them).
    Ok(tokens(app.auth.login(&creds.username, &creds.password, req.peer.ip()).await?))
}

/// OAuth2's password grant: `username`, `password`, and `grant_type=password` if present.
fn login_form(pairs: Vec<(String, String)>) -> Result<LoginRequest, ApiError> {
    let take = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut errors = Vec::new();
    let mut required = |name: &str| {
        let value = take(name);
        if value.is_none() {
            errors.push(FieldError::body(name, "missing", "Field required"));
        }
        value.unwrap_or_default()
    };
    let (username, password) = (required("username"), required("password"));
    if take("grant_type").is_some_and(|g| g != "password") {
        errors.push(FieldError::body(
            "grant_type",
            "string_pattern_mismatch",
            "String should match pattern '^password$'",
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    Ok(LoginRequest { username, password: Secret::new(password) })
}

async fn refresh(app: Arc<App>, mut req: Req) -> Answer {
    let body: RefreshRequest = req.json(&app).await?;
    Ok(tokens(app.auth.refresh(&body.refresh_token).await?))
}

async fn logout(app: Arc<App>, mut req: Req) -> Answer {
    let body: RefreshRequest = req.json(&app).await?;
    app.auth.logout(&body.refresh_token).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}

async fn me(app: Arc<App>, req: Req) -> Answer {
    let u = req.principal(&app).await?.user;
    let out = MeOut {
        id: u.id.to_string(),
        username: u.username,
        email: u.email,
        created_at: rfc3339(u.created_at),
        is_admin: u.is_admin,
    };
    Ok(json(StatusCode::OK, &out))
}

async fn create_key(app: Arc<App>, mut req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let body: ApiKeyRequest = req.json(&app).await?;
    Checks::default().field("name", check_key_name(&body.name)).finish()?;
    let name = body.name.trim().to_string();
    let issued = app.auth.create_api_key(user.id, name).await?;
    let out = ApiKeyCreated {
        id: issued.record.id.to_string(),
        key: issued.key.expose().to_string(),
        created_at: rfc3339(issued.record.created_at),
        name: issued.record.name,
    };
    Ok(no_store(json(StatusCode::CREATED, &out)))
}

async fn list_keys(app: Arc<App>, req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let keys: Vec<ApiKeyOut> =
        app.auth.api_keys(user.id).await?.iter().map(ApiKeyOut::from).collect();
    Ok(json(StatusCode::OK, &keys))
}

async fn revoke_key(app: Arc<App>, req: Req) -> Answer {
    let user = req.principal(&app).await?.user;
    let id = req.id("id", "API key not found")?;
    app.auth.revoke_api_key(user.id, id).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
