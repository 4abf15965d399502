//! Turning a raw request into typed input: the body (capped, JSON or form), path ids, query
//! parameters and the bearer credential. Every failure is a 4xx `ApiError`, never a panic.

use super::access::Access;
use super::error::{ApiError, FieldError, Loc};
use super::App;
use crate::auth::{AuthError, Principal};
use crate::http::{read_capped, Params};
use bytes::Bytes;
use http::{header, request::Parts};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// A routed request as handlers see it.
pub struct Req {
    pub parts: Parts,
    body: Option<Incoming>,
    pub params: Params,
    pub peer: SocketAddr,
}

/// How a request body was encoded.
pub enum Encoded {
    Json(serde_json::Value),
    Form(Vec<(String, String)>),
}

impl Req {
    /// Wraps the parts of a request that matched a route.
    pub fn new(parts: Parts, body: Incoming, params: Params, peer: SocketAddr) -> Req {
        Req { parts, body: Some(body), params, peer }
    }

    /// The whole body, within the configured size and time limits.
    pub async fn bytes(&mut self, app: &App) -> Result<Bytes, ApiError> {
        let Some(body) = self.body.take() else { return Ok(Bytes::new()) };
        let length = self
            .parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let server = &app.config.server;
        let timeout = Duration::from_secs(server.body_read_timeout_secs);
        Ok(read_capped(body, length, server.max_body_bytes, timeout).await?)
    }

    /// The body parsed as JSON into `T` (a missing `Content-Type` is taken as JSON).
    pub async fn json<T: DeserializeOwned>(&mut self, app: &App) -> Result<T, ApiError> {
        match self.encoded(app, false).await? {
            Encoded::Json(value) => from_value(value),
            Encoded::Form(_) => Err(ApiError::UnsupportedMediaType("application/json")),
        }
    }

    /// The body as JSON or, where OAuth2 clients send it, as a urlencoded form.
    pub async fn json_or_form(&mut self, app: &App) -> Result<Encoded, ApiError> {
        self.encoded(app, true).await
    }

    async fn encoded(&mut self, app: &App, form_ok: bool) -> Result<Encoded, ApiError> {
        let kind = media_type(&self.parts.headers);
        let is_form = kind.as_deref() == Some("application/x-www-form-urlencoded");
        let is_json = match kind.as_deref() {
            None => true,
            Some(t) => t == "application/json" || t.ends_with("+json"),
        };
        if !(is_json || form_ok && is_form) {
            let expected = if form_ok {
                "application/json or application/x-www-form-urlencoded"
            } else {
                "application/json"
            };
            return Err(ApiError::UnsupportedMediaType(expected));
        }
        let bytes = self.bytes(app).await?;
        if is_form {
            return Ok(Encoded::Form(form_urlencoded::parse(&bytes).into_owned().collect()));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            let missing = FieldError {
                loc: vec![Loc::Key("body".into())],
                msg: "Field required".into(),
                kind: "missing",
            };
            return Err(ApiError::Validation(vec![missing]));
        }
        serde_json::from_slice(&bytes).map(Encoded::Json).map_err(|e| {
            let at = byte_offset(&bytes, e.line(), e.column());
            ApiError::Validation(vec![FieldError {
                loc: vec![Loc::Key("body".into()), Loc::Index(at)],
                msg: format!("JSON decode error: {e}"),
                kind: "json_invalid",
            }])
        })
    }

    /// The `{name}` path parameter as a UUID; anything else cannot name a resource, so 404.
    pub fn id(&self, name: &str, missing: &'static str) -> Result<Uuid, ApiError> {
        self.params
            .get(name)
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or(ApiError::NotFound(missing))
    }

    /// Query parameters in order.
    pub fn query(&self) -> Vec<(String, String)> {
        let q = self.parts.uri.query().unwrap_or("");
        form_urlencoded::parse(q.as_bytes()).into_owned().collect()
    }

    /// A listing's `limit` (1 to `MAX_PAGE`, default 20) and `cursor` (parsed by `decode`);
    /// one `422` names every bad parameter.
    pub fn page<C>(
        &self,
        decode: impl Fn(&str) -> Option<C>,
    ) -> Result<(usize, Option<C>), ApiError> {
        let (mut limit, mut cursor, mut errors) = (20, None, Vec::new());
        for (k, v) in self.query() {
            match k.as_str() {
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                    _ => errors.push(FieldError::query(
                        "limit",
                        "value_error",
                        "limit must be an integer from 1 to 100",
                    )),
                },
                "cursor" if v.is_empty() => {}
                "cursor" => match decode(&v) {
                    Some(c) => cursor = Some(c),
                    None => errors.push(FieldError::query(
                        "cursor",
                        "value_error",
                        "cursor is not a next_cursor from this API",
                    )),
                },
                _ => {}
            }
        }
        match errors.is_empty() {
            true => Ok((limit, cursor)),
            false => Err(ApiError::Validation(errors)),
        }
    }

    /// The caller, from `Authorization: Bearer <JWT or API key>`.
    pub async fn principal(&self, app: &App) -> Result<Principal, ApiError> {
        let value = self.parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let token = value
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Unauthenticated("no bearer credential"))?;
        let principal = app.auth.authenticate(token).await?;
        self.access().user(principal.user.id);
        Ok(principal)
    }

    /// What the access line will say about this request; handlers add what they learn.
    pub fn access(&self) -> Arc<Access> {
        self.parts.extensions.get::<Arc<Access>>().cloned().unwrap_or_default()
    }

    /// The calling admin; anyone else learns only that the route does not exist (`404`, as
    /// for any unknown path; no credential at all is still `401`).
    pub async fn admin(&self, app: &App) -> Result<Principal, ApiError> {
        let principal = self.principal(app).await?;
        match principal.user.is_admin {
            true => Ok(principal),
            false => Err(ApiError::RouteNotFound),
        }
    }
}

/// The largest page a listing returns.
pub const MAX_PAGE: usize = 100;

/// Deserializes an already-parsed JSON body, reporting where it went wrong.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::Validation(vec![FieldError {
            loc: vec![Loc::Key("body".into())],
            msg: "Input should be a valid dictionary or object to extract fields from".into(),
            kind: "model_attributes_type",
        }]));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut loc = vec![Loc::Key("body".into())];
        loc.extend(e.path().iter().filter_map(|seg| match seg {
            serde_path_to_error::Segment::Map { key } => Some(Loc::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(Loc::Index(*index)),
            _ => None,
        }));
        let message = e.inner().to_string();
        let error = match message.strip_prefix("missing field `") {
            Some(rest) => {
                loc.push(Loc::Key(rest.trim_end_matches('`').to_string()));
                FieldError { loc, msg: "Field required".into(), kind: "missing" }
            }
            None => FieldError { loc, msg: message, kind: "type_error" },
        };
        ApiError::Validation(vec![error])
    })
}

/// Collects semantic failures so that a client learns of all of them at once.
#[derive(Default)]
pub struct Checks(Vec<FieldError>);

impl Checks {
    /// Records `result`'s error against `body.<field>`.
    pub fn field(&mut self, field: &str, result: Result<(), &'static str>) -> &mut Self {
        if let Err(msg) = result {
            self.0.push(FieldError::body(field, "value_error", msg));
        }
        self
    }

    /// Records every (field, message) of `problems`.
    pub fn all(&mut self, problems: Vec<(&'static str, &'static str)>) -> &mut Self {
        for (field, msg) in problems {
            self.field(field, Err(msg));
        }
        self
    }

    /// Records a failure of `body.<field>` whose message is made at run time.
    pub fn fail(&mut self, field: &str, kind: &'static str, msg: String) -> &mut Self {
        self.0.push(FieldError::body(field, kind, msg));
        self
    }

    /// `Ok` when nothing failed, else one 422 listing every failure.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(std::mem::take(&mut self.0)))
        }
    }
}

/// The media type without parameters, lowercased (`application/json; charset=utf-8` → …json).
fn media_type(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().unwrap_or("invalid");
    Some(v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

fn byte_offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let line_start: usize =
        bytes.split(|&b| b == b'\n').take(line.saturating_sub(1)).map(|l| l.len() + 1).sum();
    line_start + column.saturating_sub(1)
}
