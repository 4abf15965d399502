//! The one place where errors become HTTP responses, in the shape of the face that was called:
//! FastAPI's `{"detail": …}` on the seed face, OpenAI's `{"error": {…}}` on `/v1`.
//!
//! Server-side failures are logged here with their cause and answered with a generic message:
//! no storage path, hash error or upstream body ever reaches a client.

use crate::auth::{AuthError, HashError};
use crate::chat::ChatError;
use crate::http::{json, Body, BodyError};
use crate::jobs::JobError;
use crate::ratelimit::{header_secs, Decision};
use crate::store::StoreError;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

/// Which error shape a client expects, decided by the path it called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Face {
    Seed,
    OpenAi,
}

impl Face {
    /// `/v1/*` is the OpenAI face; everything else speaks the seed's FastAPI dialect.
    pub fn of(path: &str) -> Face {
        if path == "/v1" || path.starts_with("/v1/") {
            Face::OpenAi
        } else {
            Face::Seed
        }
    }
}

/// One element of a path to the offending input, as FastAPI writes it (`["body", "email"]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Loc {
    Key(String),
    Index(usize),
}

/// One validation failure, serialized exactly as FastAPI's `detail` items.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    pub loc: Vec<Loc>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

impl FieldError {
    /// A failure at `body.<field>`.
    pub fn body(field: &str, kind: &'static str, msg: impl Into<String>) -> Self {
        FieldError {
            loc: vec![Loc::Key("body".into()), Loc::Key(field.into())],
            msg: msg.into(),
            kind,
        }
    }

    /// A failure at `query.<name>`.
    pub fn query(name: &str, kind: &'static str, msg: impl Into<String>) -> Self {
        FieldError {
            loc: vec![Loc::Key("query".into()), Loc::Key(name.into())],
            msg: msg.into(),
            kind,
        }
    }
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("unsupported content type")]
    UnsupportedMediaType(&'static str),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    NotFound(&'static str),
    /// Refused whoever the caller is (the message says what would be allowed).
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: String },
    #[error("rate limited")]
    RateLimited(Decision),
    #[error("token budget exhausted")]
    TokensLimited(Decision),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("handler panicked")]
    Panic,
}

struct Shape {
    status: StatusCode,
    message: String,
    /// OpenAI's `type` and `code`.
    kind: &'static str,
    code: Option<&'static str>,
}

impl ApiError {
    fn shape(&self) -> Shape {
        use ApiError as E;
        let s = |status, message: &str, kind, code| Shape {
            status,
            message: message.into(),
            kind,
            code,
        };
        if let Some(shape) = self.store_error().and_then(storage_shape) {
            return shape;
        }
        match self {
            E::Validation(_) => s(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Validation error",
                "invalid_request_error",
                None,
            ),
            E::UnsupportedMediaType(expected) => s(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &format!("Content-Type must be {expected}"),
                "invalid_request_error",
                None,
            ),
            E::Body(BodyError::TooLarge { limit }) => s(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("Request body is larger than {limit} bytes"),
                "invalid_request_error",
                None,
            ),
            E::Body(BodyError::Timeout(_)) => s(
                StatusCode::REQUEST_TIMEOUT,
                "Request body not received in time",
                "invalid_request_error",
                None,
            ),
            E::Body(BodyError::Read(_)) => s(
                StatusCode::BAD_REQUEST,
                "Request body could not be read",
                "invalid_request_error",
                None,
            ),
            E::Auth(e) => auth_shape(e),
            E::NotFound(what) => {
                s(StatusCode::NOT_FOUND, what, "invalid_request_error", Some("not_found"))
            }
            E::Forbidden(why) => {
                s(StatusCode::FORBIDDEN, why, "permission_error", Some("forbidden"))
            }
            E::RouteNotFound => {
                s(StatusCode::NOT_FOUND, "Not Found", "invalid_request_error", Some("unknown_url"))
            }
            E::MethodNotAllowed { .. } => s(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
                "invalid_request_error",
                None,
            ),
            E::RateLimited(d) => s(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too many requests; retry in {} s", header_secs(d.retry_after)),
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            E::TokensLimited(d) => s(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Token budget used up; retry in {} s", header_secs(d.retry_after)),
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            E::Chat(e) => chat_shape(e),
            E::Job(e) => job_shape(e),
            E::Store(_) | E::Panic => {
                s(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", "server_error", None)
            }
        }
    }

    /// The store error inside, whichever service passed it up.
    fn store_error(&self) -> Option<&StoreError> {
        match self {
            ApiError::Store(e)
            | ApiError::Chat(ChatError::Store(e))
            | ApiError::Job(JobError::Store(e))
            | ApiError::Auth(AuthError::Store(e)) => Some(e),
            _ => None,
        }
    }

    /// The response for `face`; server-side failures are logged with their cause first
    /// (except a store refusing writes: it logged that once, not once per request).
    pub fn into_response(self, face: Face) -> Response<Body> {
        let shape = self.shape();
        let refused = self.store_error().is_some_and(StoreError::is_unavailable);
        if shape.status.is_server_error() && !refused {
            tracing::error!(error = %self, cause = ?self, "request failed");
        }
        let body = match (&self, face) {
            (ApiError::Validation(errors), Face::Seed) => json!({ "detail": errors }),
            (ApiError::Validation(errors), Face::OpenAi) => openai_validation(errors),
            (_, Face::Seed) => json!({ "detail": shape.message }),
            (_, Face::OpenAi) => json!({ "error": {
                "message": shape.message, "type": shape.kind, "param": self.param(), "code": shape.code,
            }}),
        };
        let status = match (&self, face) {
            (ApiError::Validation(_), Face::OpenAi) => StatusCode::BAD_REQUEST,
            (
                ApiError::Chat(ChatError::Invalid(_) | ChatError::PromptTooLong { .. }),
                Face::OpenAi,
            ) => StatusCode::BAD_REQUEST,
            _ => shape.status,
        };
        let mut response = json(status, &body);
        self.add_headers(response.headers_mut(), face);
        response
    }

    /// The request field the error is about, when there is one.
    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Chat(ChatError::Unsupported(u)) => Some(&u.field),
            _ => None,
        }
    }

    fn add_headers(&self, headers: &mut HeaderMap, face: Face) {
        if self.store_error().and_then(storage_shape).is_some() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static(STORAGE_RETRY_SECS));
            return;
        }
        match self {
            ApiError::Auth(AuthError::TooManyFailures(d)) | ApiError::RateLimited(d) => {
                headers.insert(header::RETRY_AFTER, header_secs(d.retry_after).into());
                rate_limit_headers(headers, d, face);
            }
            ApiError::TokensLimited(d) => {
                headers.insert(header::RETRY_AFTER, header_secs(d.retry_after).into());
                limit_headers(headers, d, face, Metered::Tokens);
            }
            ApiError::Job(JobError::UserLimit(_) | JobError::QueueFull(_)) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiError::Auth(AuthError::Hash(HashError::Busy)) | ApiError::Chat(ChatError::Busy) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Auth(e) if auth_shape(e).status == StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    headers.insert(header::ALLOW, v);
                }
            }
            _ => {}
        }
    }
}

/// When to retry a write the store refused: about its reopen backoff (once there is room).
const STORAGE_RETRY_SECS: &str = "5";

/// A store that cannot write now: `507` when the disk is full (only an operator can fix
/// that), `503` otherwise (the store is reopening the file, or PostgreSQL is unreachable);
/// all with `Retry-After`. The
/// client learns what happened, never where the data lives.
fn storage_shape(e: &StoreError) -> Option<Shape> {
    let (status, message, code) = match e {
        StoreError::DiskFull { .. } | StoreError::Io(crate::store::IoFailure::DiskFull) => (
            StatusCode::INSUFFICIENT_STORAGE,
            "Insufficient storage: the disk holding the server's data directory is full, so \
             nothing can be saved. The operator must free space on that disk; writes then \
             resume by themselves, without a restart. Reading still works.",
            "insufficient_storage",
        ),
        StoreError::Unavailable { .. } | StoreError::Io(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Storage is temporarily unavailable after an I/O error and is being reopened; \
             retry shortly",
            "storage_unavailable",
        ),
        StoreError::Unreachable { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is temporarily unreachable; the server reconnects by itself. Retry \
             shortly",
            "storage_unavailable",
        ),
        _ => return None,
    };
    Some(Shape { status, message: message.into(), kind: "server_error", code: Some(code) })
}

fn chat_shape(e: &ChatError) -> Shape {
    use ChatError as C;
    let (status, kind, code) = match e {
        C::Invalid(_) | C::PromptTooLong { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", None)
        }
        C::UnknownModel(_) => {
            (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"))
        }
        C::ConversationNotFound => {
            (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"))
        }
        C::Unavailable { .. } | C::Busy => {
            (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("provider_unavailable"))
        }
        C::Upstream { .. } => (StatusCode::BAD_GATEWAY, "server_error", Some("upstream_error")),
        C::Unsupported(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request_error", Some("unsupported_parameter"))
        }
        C::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    };
    let message = match e {
        C::Store(_) => "Internal Server Error".to_string(),
        C::ConversationNotFound => "Conversation not found".to_string(),
        // It starts with the field's name, as the client wrote it.
        C::Unsupported(u) => u.why.clone(),
        C::Upstream { provider, reason } => format!(
            "The {} provider failed ({reason}) and no fallback could answer",
            provider.as_str()
        ),
        other => capitalized(&other.to_string()),
    };
    Shape { status, message, kind, code }
}

fn job_shape(e: &JobError) -> Shape {
    use JobError as J;
    let (status, kind, code) = match e {
        J::UserLimit(_) => {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("too_many_jobs"))
        }
        J::QueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("queue_full")),
        J::UserGone => (StatusCode::UNAUTHORIZED, "authentication_error", Some("user_gone")),
        J::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
        J::Finished(_) => (StatusCode::CONFLICT, "invalid_request_error", Some("finished")),
        J::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
    };
    let message = match e {
        J::Store(_) => "Internal Server Error".to_string(),
        J::NotFound => "Task not found".to_string(),
        J::Finished(_) => {
            "Task already finished; only queued or running tasks can be cancelled".into()
        }
        other => capitalized(&other.to_string()),
    };
    Shape { status, message, kind, code }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

fn auth_shape(e: &AuthError) -> Shape {
    use AuthError as A;
    let (status, message, kind, code) = match e {
        A::BadCredentials => (
            StatusCode::UNAUTHORIZED,
            "Incorrect username or password",
            "authentication_error",
            None,
        ),
        // Same answer as a wrong password: telling them apart would confirm the password.
        A::Disabled => (
            StatusCode::UNAUTHORIZED,
            "Incorrect username or password",
            "authentication_error",
            None,
        ),
        A::Unauthenticated(_) => (
            StatusCode::UNAUTHORIZED,
            "Could not validate credentials",
            "authentication_error",
            Some("invalid_api_key"),
        ),
        A::BadRefreshToken(_) => {
            (StatusCode::UNAUTHORIZED, "Invalid refresh token", "authentication_error", None)
        }
        A::TooManyFailures(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins; try again later",
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ),
        A::UsernameTaken => {
            (StatusCode::CONFLICT, "Username already registered", "invalid_request_error", None)
        }
        A::EmailTaken => {
            (StatusCode::CONFLICT, "Email already registered", "invalid_request_error", None)
        }
        A::KeyNotFound => {
            (StatusCode::NOT_FOUND, "API key not found", "invalid_request_error", Some("not_found"))
        }
        A::UserNotFound => {
            (StatusCode::NOT_FOUND, "User not found", "invalid_request_error", Some("not_found"))
        }
        A::LastAdmin => (
            StatusCode::CONFLICT,
            "This is the last active admin; grant admin to another account first",
            "invalid_request_error",
            Some("last_admin"),
        ),
        A::OwnAccount => (
            StatusCode::FORBIDDEN,
            "Admins cannot delete, demote or disable their own account; another admin or `edgechat user` can",
            "permission_error",
            Some("own_account"),
        ),
        A::Hash(HashError::Busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sign-ins at once; retry shortly",
            "server_error",
            Some("overloaded"),
        ),
        A::Hash(_) | A::Store(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error", "server_error", None)
        }
    };
    Shape { status, message: message.into(), kind, code }
}

/// OpenAI reports one problem at a time, naming the parameter.
fn openai_validation(errors: &[FieldError]) -> serde_json::Value {
    let first = errors.first();
    let param = first.and_then(|e| match e.loc.last() {
        Some(Loc::Key(k)) if e.loc.len() > 1 => Some(k.clone()),
        _ => None,
    });
    let message = first.map(|e| e.msg.clone()).unwrap_or_else(|| "Invalid request".into());
    json!({ "error": { "message": message, "type": "invalid_request_error", "param": param, "code": null } })
}

/// `RateLimit-*` (IETF draft) on every limited response, plus OpenAI's
/// `x-ratelimit-*-requests` on `/v1`.
pub fn rate_limit_headers(headers: &mut HeaderMap, d: &Decision, face: Face) {
    limit_headers(headers, d, face, Metered::Requests);
}

/// What a limit counts, as OpenAI's header names say it.
#[derive(Clone, Copy)]
enum Metered {
    Requests,
    Tokens,
}

fn limit_headers(headers: &mut HeaderMap, d: &Decision, face: Face, metered: Metered) {
    let reset = header_secs(d.reset);
    headers.insert("ratelimit-limit", d.limit.into());
    headers.insert("ratelimit-remaining", d.remaining.into());
    headers.insert("ratelimit-reset", reset.into());
    if face == Face::OpenAi {
        let [limit, remaining, reset_name] = match metered {
            Metered::Requests => [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            Metered::Tokens => [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        };
        headers.insert(limit, d.limit.into());
        headers.insert(remaining, d.remaining.into());
        if let Ok(v) = HeaderValue::from_str(&format!("{reset}s")) {
            headers.insert(reset_name, v);
        }
    }
}
