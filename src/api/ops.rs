//! Operations: liveness, readiness, the OpenAPI document and the offline API explorer.

use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::http::{bytes, json, Body};
use http::{header, HeaderValue, Method, Response, StatusCode};
use serde::Serialize;
use std::sync::Arc;
use utoipa::ToSchema;

type Answer = Result<Response<Body>, ApiError>;

/// Only our own assets: the explorer works offline and cannot be made to load anything else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

const DOCS_HTML: &str = include_str!("../../assets/docs.html");
const DOCS_INIT: &str = include_str!("../../assets/docs-init.js");
const SWAGGER_JS: &[u8] = include_bytes!("../../assets/swagger/swagger-ui-bundle.js");
const SWAGGER_CSS: &[u8] = include_bytes!("../../assets/swagger/swagger-ui.css");

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("operations", summary);
    r.add(
        Method::GET,
        "/health",
        handler(health),
        doc("Liveness: the process serves").json::<Health>(200),
    );
    r.add(
        Method::GET,
        "/ready",
        handler(ready),
        doc("Readiness: storage open and something can answer")
            .json::<Readiness>(200)
            .error_json::<Readiness>(503),
    );
    r.add(
        Method::GET,
        "/openapi.json",
        handler(openapi),
        doc("This document").media("application/json"),
    );
    r.add(
        Method::GET,
        "/metrics",
        handler(metrics),
        doc("Prometheus metrics (loopback clients, or a bearer token when metrics.token is set)")
            .media(crate::metrics::CONTENT_TYPE)
            .errors(&[401, 403, 404]),
    );
    r.add(Method::GET, "/docs", handler(docs), doc("Interactive API explorer").media("text/html"));
    r.add(
        Method::GET,
        "/docs/{asset}",
        handler(docs_asset),
        doc("The explorer's scripts and styles").media("application/octet-stream").errors(&[404]),
    );
}

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `healthy`.
    status: &'static str,
    version: &'static str,
    uptime_s: u64,
}

/// `GET /ready`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// `ok`; `disk_full` (readable, writes refused until there is room); `unavailable`.
    storage: String,
    /// Each provider's state: `up`, `circuit_open`, `not_configured` or `not_loaded`.
    providers: Vec<ProviderOut>,
    /// Why the server is not ready; empty when it is.
    reasons: Vec<String>,
}

/// One provider in `/ready`.
#[derive(Serialize, ToSchema)]
pub struct ProviderOut {
    /// `openai`, `huggingface` or `local`.
    provider: &'static str,
    state: &'static str,
}

async fn health(app: Arc<App>, _req: Req) -> Answer {
    let out = Health {
        status: "healthy",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: app.uptime().as_secs(),
    };
    Ok(json(StatusCode::OK, &out))
}

async fn ready(app: Arc<App>, _req: Req) -> Answer {
    let (storage, mut reasons) = storage_readiness(&app.store).await;
    let providers: Vec<ProviderOut> = app
        .chat
        .status()
        .into_iter()
        .map(|p| ProviderOut { provider: p.provider.as_str(), state: p.state })
        .collect();
    if !providers.iter().any(|p| p.state == "up") {
        reasons.push("no provider can answer: no local model loaded and no API key".into());
    }
    let (status, code) = match reasons.is_empty() {
        true => ("ready", StatusCode::OK),
        false => ("not_ready", StatusCode::SERVICE_UNAVAILABLE),
    };
    Ok(json(code, &Readiness { status, storage, providers, reasons }))
}

/// `/ready`'s word on the store: `ok`, `disk_full` (readable, writes refused until an operator
/// frees space) or `unavailable` (not readable, or reopening after an I/O error), with the
/// reason in words that name no path.
async fn storage_readiness(store: &crate::store::Store) -> (String, Vec<String>) {
    use crate::store::StoreError;
    let (storage, reason) = match store.check().await.and_then(|()| store.writable()) {
        Ok(()) => return ("ok".into(), Vec::new()),
        Err(StoreError::DiskFull { .. }) => (
            "disk_full",
            "storage cannot be written: the disk holding the data directory is full; free space there (writes resume by themselves)",
        ),
        Err(StoreError::Unavailable { .. }) => {
            ("unavailable", "storage cannot be written: reopening the database after an I/O error")
        }
        Err(StoreError::Unreachable { .. }) => {
            ("unavailable", "the database cannot be reached (edgechat reconnects by itself)")
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: storage check failed");
            ("unavailable", "storage is not readable")
        }
    };
    (storage.into(), vec![reason.into()])
}

async fn metrics(app: Arc<App>, req: Req) -> Answer {
    let c = &app.config.metrics;
    if !c.enabled {
        return Err(ApiError::RouteNotFound);
    }
    match &c.token {
        Some(token) => {
            let sent = req.parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            let sent = sent.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
            if !token.matches(sent) {
                return Err(crate::auth::AuthError::Unauthenticated("metrics token").into());
            }
        }
        None if !req.peer.ip().to_canonical().is_loopback() => {
            return Err(ApiError::Forbidden(
                "metrics are served to loopback clients only; set metrics.token to scrape from elsewhere",
            ));
        }
        None => {}
    }
    read_states(&app).await;
    Ok(bytes(StatusCode::OK, crate::metrics::CONTENT_TYPE, crate::metrics::encode()))
}

/// Sets the metrics that are states, not events, to their values now.
async fn read_states(app: &App) {
    use crate::metrics::{set, Reading};
    use std::sync::atomic::Ordering::Relaxed;
    // A provider with no key is not a provider that is down: no series to page anyone.
    for p in app.chat.status().into_iter().filter(|p| p.state != "not_configured") {
        let name = p.provider.as_str();
        set(Reading::ProviderUp(name, p.state == "up"));
        set(Reading::CircuitOpen(name, p.state == "circuit_open"));
        set(Reading::ProviderRejected(name, p.state == "rejected"));
    }
    read_local_states(app.chat.local_models());
    match app.store.job_counts().await {
        Ok(counts) => counts.into_iter().for_each(|(s, n)| set(Reading::Jobs(s.as_str(), n))),
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read job counts"),
    }
    if let Some(Ok(meta)) = app.store.file().map(std::fs::metadata) {
        set(Reading::StoreBytes(meta.len()));
    }
    let c = crate::http::connection_stats();
    set(Reading::Connections("open", c.open.load(Relaxed)));
    set(Reading::Connections("held", c.held.load(Relaxed)));
    for (reason, total) in [
        ("refused", &c.refused),
        ("idle", &c.idle),
        ("header_timeout", &c.header_timeout),
        ("evicted", &c.evicted),
    ] {
        set(Reading::ConnectionsEnded(reason, total.load(Relaxed)));
    }
}

/// Each local model's queue and whether it is loaded, and the memory of those loaded.
fn read_local_states(local: &crate::local::Registry) {
    use crate::metrics::{set, Reading};
    let loaded = local.loaded();
    for name in local.names() {
        let model = loaded.iter().find(|l| l.name == name);
        let (waiting, active) = model.map_or((0, 0), |l| l.queue);
        set(Reading::LocalQueue(name, "waiting", waiting));
        set(Reading::LocalQueue(name, "active", active));
        set(Reading::LocalModelLoaded(name, model.is_some()));
    }
    if local.names().next().is_some() {
        let total = loaded.iter().map(|l| l.memory_bytes).sum();
        let prompt_cache = loaded.iter().map(|l| l.prompt_cache_bytes).sum();
        set(Reading::LocalMemory { total, prompt_cache });
    }
}

async fn openapi(app: Arc<App>, _req: Req) -> Answer {
    Ok(bytes(StatusCode::OK, "application/json", app.openapi.clone()))
}

async fn docs(_app: Arc<App>, _req: Req) -> Answer {
    let mut r = bytes(StatusCode::OK, "text/html; charset=utf-8", DOCS_HTML);
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    Ok(r)
}

async fn docs_asset(_app: Arc<App>, req: Req) -> Answer {
    let (content_type, body): (&'static str, &'static [u8]) = match req.params.get("asset") {
        Some("swagger-ui-bundle.js") => ("text/javascript; charset=utf-8", SWAGGER_JS),
        Some("swagger-ui.css") => ("text/css; charset=utf-8", SWAGGER_CSS),
        Some("init.js") => ("text/javascript; charset=utf-8", DOCS_INIT.as_bytes()),
        _ => return Err(ApiError::NotFound("Not Found")),
    };
    let mut r = bytes(StatusCode::OK, content_type, body);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    Ok(r)
}
