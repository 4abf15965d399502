//! The HTTP faces of edgechat: the route table, the per-request frame (request id, CORS,
//! rate limits, panic containment, the access log), and one module per resource.
//!
//! Handlers are thin: parse → authorize → call one service → render. The route table is the
//! single source of `/openapi.json`, so the document cannot drift from what is served.

pub mod access;
mod admin;
mod auth;
mod chat;
mod conversations;
pub mod error;
mod extract;
mod frame;
mod openai;
pub mod openapi;
mod ops;
mod seed;
mod shape;
mod tasks;
mod web;

pub use error::{ApiError, Face};
pub use extract::Req;
pub use openapi::Doc;

use crate::auth::Auth;
use crate::chat::Chat;
use crate::config::Config;
use crate::http::{Body, Lookup, Router, Service};
use crate::jobs::Jobs;
use crate::ratelimit::{address_key, Limiter, Quota};
use crate::store::Store;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What a route runs.
pub type Handler = Arc<
    dyn Fn(Arc<App>, Req) -> BoxFuture<'static, Result<Response<Body>, ApiError>> + Send + Sync,
>;

/// Wraps an async fn as a `Handler`.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Arc<App>, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, ApiError>> + Send + 'static,
{
    Arc::new(move |app, req| Box::pin(f(app, req)))
}

/// One route: its handler and its documentation.
pub struct Route {
    handler: Handler,
    doc: Doc,
}

/// The route table under construction.
#[derive(Default)]
pub struct Routes(Router<Route>);

impl Routes {
    /// Adds `method path`, documented by `doc`.
    pub fn add(&mut self, method: Method, path: &'static str, handler: Handler, doc: Doc) {
        self.0.add(method, path, Route { handler, doc });
    }

    /// Every (method, path template) served, in table order.
    pub fn list(&self) -> Vec<(Method, &'static str)> {
        self.0.routes().map(|(m, p, _)| (m.clone(), p)).collect()
    }
}

/// Every route edgechat serves.
pub fn routes() -> Routes {
    let mut r = Routes::default();
    ops::routes(&mut r);
    web::routes(&mut r);
    auth::routes(&mut r);
    conversations::routes(&mut r);
    chat::routes(&mut r);
    openai::routes(&mut r);
    tasks::routes(&mut r);
    admin::routes(&mut r);
    r
}

/// Shared state of the running server.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub auth: Arc<Auth>,
    pub chat: Arc<Chat>,
    pub jobs: Arc<Jobs>,
    auth_per_address: Limiter,
    chat_requests: Limiter,
    chat_tokens: Limiter,
    started: Instant,
    started_unix: i64,
    router: Router<Route>,
    openapi: Bytes,
    /// Set when the server stops accepting: a stream cut from then on ended by shutdown.
    draining: Arc<AtomicBool>,
}

impl App {
    /// The application over its services, serving `routes`.
    pub fn new(
        config: Config,
        store: Store,
        auth: Arc<Auth>,
        chat: Arc<Chat>,
        jobs: Arc<Jobs>,
        routes: Routes,
    ) -> Arc<App> {
        let limiter = |q: crate::config::QuotaConfig| {
            let period = Duration::from_secs(q.per_secs);
            Limiter::new(Quota { requests: q.requests, period, burst: q.burst })
        };
        let limits = &config.rate_limit;
        let openapi = openapi::document(routes.0.routes().map(|(m, p, r)| (m, p, &r.doc)));
        Arc::new(App {
            auth_per_address: limiter(limits.auth_per_address),
            chat_requests: limiter(limits.chat_per_user.requests),
            chat_tokens: limiter(limits.chat_per_user.tokens),
            started: Instant::now(),
            started_unix: crate::clock::now_ms() / 1000,
            chat,
            jobs,
            router: routes.0,
            openapi: Bytes::from(
                serde_json::to_vec_pretty(&openapi).expect("json values serialize"),
            ),
            config,
            store,
            auth,
            draining: Arc::default(),
        })
    }

    /// The transport's entry point into this app.
    pub fn service(self: &Arc<Self>) -> Service {
        let app = self.clone();
        Arc::new(move |req, peer| app.clone().dispatch(req, peer).boxed())
    }

    /// When the app was built, in Unix seconds (`created` of `/v1/models`).
    pub fn started_unix(&self) -> i64 {
        self.started_unix
    }

    /// Seconds since the app was built (for `/health`).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    async fn dispatch(
        self: Arc<Self>,
        mut req: hyper::Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let request_id = request_id(req.headers());
        let method = req.method().clone();
        let face = Face::of(req.uri().path());
        let origin = self.allowed_origin(req.headers());
        crate::metrics::in_flight(true);
        let access = Arc::new(access::Access::default());
        req.extensions_mut().insert(access.clone());
        // Every line logged while serving the request (its stream included) carries its id.
        let span = tracing::info_span!("request", request_id = %request_id);
        let routed = self.clone().route(req, peer, face, origin.clone());
        let (route, mut response) = routed.instrument(span.clone()).await;
        let headers = response.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            headers.insert("x-request-id", v);
        }
        headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
        let allowed = &self.config.cors.allowed_origins;
        if !allowed.is_empty() && !allowed.iter().any(|o| o == "*") {
            // The answer depends on Origin: shared caches must not mix them up.
            headers.insert(header::VARY, HeaderValue::from_static("origin"));
        }
        if let Some(origin) = origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("x-request-id, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset, x-edgechat-provider, x-edgechat-fallback, x-edgechat-fallback-reason"),
            );
        }
        let status = response.status().as_u16();
        crate::metrics::http_request(method.as_str(), route, status, access.elapsed());
        let line = access::Line { method, route, status, request_id, peer: peer.ip(), access };
        line.log(response, span, self.draining.clone())
    }

    /// Set when the server stops accepting, so that streams cut from then on are logged as
    /// ended by shutdown.
    pub fn draining(&self) -> Arc<AtomicBool> {
        self.draining.clone()
    }

    async fn route(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
        peer: SocketAddr,
        face: Face,
        origin: Option<HeaderValue>,
    ) -> (&'static str, Response<Body>) {
        let (parts, body) = req.into_parts();
        let (route, template, params) = match self.router.lookup(&parts.method, parts.uri.path()) {
            Lookup::NotFound => return ("-", ApiError::RouteNotFound.into_response(face)),
            Lookup::MethodNotAllowed { template, allow } => {
                let preflight = parts.method == Method::OPTIONS
                    && parts.headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
                let response = match preflight {
                    true => self.preflight(&allow, origin.is_some()),
                    false => ApiError::MethodNotAllowed { allow }.into_response(face),
                };
                return (template, response);
            }
            Lookup::Found { route, template, params } => (route, template, params),
        };
        let limit = match template.starts_with("/auth/") {
            true => Some(self.auth_per_address.check(&address_key(peer.ip()))),
            false => None,
        };
        if let Some(d) = limit.filter(|d| !d.allowed) {
            crate::metrics::rate_limited("auth_per_address");
            return (template, ApiError::RateLimited(d).into_response(face));
        }
        let run = (route.handler)(self.clone(), Req::new(parts, body, params, peer));
        let mut response = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => e.into_response(face),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(route = template, panic = %what, "handler panicked");
                ApiError::Panic.into_response(face)
            }
        };
        // A response refused by a narrower limit (failed logins) already describes that one.
        if let Some(d) = limit.filter(|_| !response.headers().contains_key("ratelimit-limit")) {
            error::rate_limit_headers(response.headers_mut(), &d, face);
        }
        (template, response)
    }

    /// The `Access-Control-Allow-Origin` value for this request's `Origin`, if it is allowed.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let allowed = &self.config.cors.allowed_origins;
        if allowed.iter().any(|o| o == "*") {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?;
        allowed.iter().any(|o| o.eq_ignore_ascii_case(text)).then(|| origin.clone())
    }

    fn preflight(&self, allow: &str, origin_allowed: bool) -> Response<Body> {
        let mut r = crate::http::empty(StatusCode::NO_CONTENT);
        if origin_allowed {
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(allow) {
                h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
            }
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("authorization, content-type, x-request-id"),
            );
            h.insert(header::ACCESS_CONTROL_MAX_AGE, self.config.cors.max_age_secs.into());
        }
        r
    }
}

/// The client's `X-Request-Id` when it is short and plain, a fresh one otherwise.
fn request_id(headers: &HeaderMap) -> String {
    let sane = |s: &&str| {
        (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    };
    match headers.get("x-request-id").and_then(|v| v.to_str().ok()).filter(sane) {
        Some(id) => id.to_string(),
        None => uuid::Uuid::now_v7().simple().to_string(),
    }
}
