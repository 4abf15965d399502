//! `GET /`: the built-in chat page. Plain HTML, CSS and JS compiled into the binary, so a
//! fresh install has a usable chat with no CDN, no build step and no internet access.

use super::{handler, ApiError, App, Doc, Req, Routes};
use crate::http::{bytes, empty, Body};
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::sync::{Arc, LazyLock};

type Answer = Result<Response<Body>, ApiError>;

/// Only the page's own files, no inline code, and no string-to-HTML sinks: user and model
/// text can only ever become text nodes.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// One embedded file and its validator.
struct Asset {
    content_type: &'static str,
    body: &'static str,
    /// `None` only if a hex string were ever not a valid header value.
    etag: Option<HeaderValue>,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static str) -> Asset {
        let hash = Sha256::digest(body.as_bytes());
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\"")).ok();
        Asset { content_type, body, etag }
    }
}

static PAGE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new("text/html; charset=utf-8", include_str!("../../assets/chat.html"))
});
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new("text/javascript; charset=utf-8", include_str!("../../assets/chat.js"))
});
static STYLE: LazyLock<Asset> =
    LazyLock::new(|| Asset::new("text/css; charset=utf-8", include_str!("../../assets/chat.css")));

/// Adds the page and its two files; documented like every route, as plain media types.
pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("web", summary);
    r.add(Method::GET, "/", handler(page), doc("The chat page (works offline)").media("text/html"));
    r.add(
        Method::GET,
        "/ui/chat.js",
        handler(script),
        doc("The chat page's script").media("text/javascript"),
    );
    r.add(
        Method::GET,
        "/ui/chat.css",
        handler(style),
        doc("The chat page's styles").media("text/css"),
    );
}

async fn page(_app: Arc<App>, req: Req) -> Answer {
    let mut r = serve(&PAGE, &req.parts.headers);
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    r.headers_mut().insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Ok(r)
}

async fn script(_app: Arc<App>, req: Req) -> Answer {
    Ok(serve(&SCRIPT, &req.parts.headers))
}

async fn style(_app: Arc<App>, req: Req) -> Answer {
    Ok(serve(&STYLE, &req.parts.headers))
}

/// The file, or `304` when the browser's copy is current. `no-cache` (revalidate every time)
/// rather than a lifetime: the URLs carry no version, and a page and script from two
/// different builds must never meet after an upgrade.
fn serve(asset: &Asset, request: &HeaderMap) -> Response<Body> {
    let mut r = match &asset.etag {
        Some(etag) if fresh(request, etag) => empty(StatusCode::NOT_MODIFIED),
        _ => bytes(StatusCode::OK, asset.content_type, asset.body),
    };
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(etag) = &asset.etag {
        h.insert(header::ETAG, etag.clone());
    }
    r
}

/// Whether `If-None-Match` names `etag` (weak comparison, as RFC 9110 asks for GET).
fn fresh(request: &HeaderMap, etag: &HeaderValue) -> bool {
    let ours = etag.to_str().unwrap_or_default();
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn if_none_match_compares_weakly_and_in_lists() {
        let etag = HeaderValue::from_static("\"abc\"");
        assert!(fresh(&with("\"abc\""), &etag));
        assert!(fresh(&with("W/\"abc\""), &etag));
        assert!(fresh(&with("\"x\", \"abc\""), &etag));
        assert!(fresh(&with("*"), &etag));
        assert!(!fresh(&with("\"abcd\""), &etag));
        assert!(!fresh(&HeaderMap::new(), &etag));
    }

    #[test]
    fn the_page_names_only_its_own_files() {
        let html = PAGE.body;
        assert!(html.contains("src=\"/ui/chat.js\"") && html.contains("href=\"/ui/chat.css\""));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<script>") && !html.contains(" style="), "no inline code");
    }
}
