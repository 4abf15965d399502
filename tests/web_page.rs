//! The built-in chat page at `/`: served from the binary with a strict CSP.

mod common;

use common::TestServer;
use reqwest::StatusCode;

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary_under_a_strict_csp() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "no outside URLs");

    // Everything the page loads is ours, under /ui/, with the right type.
    let mut assets = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            assets.push(part.split('"').next().unwrap().to_string());
        }
    }
    assets.retain(|a| a != "/docs"); // the <noscript> pointer to the API explorer
    assets.sort();
    assert_eq!(assets, ["/ui/chat.css", "/ui/chat.js"]);
    for (path, content_type) in [
        ("/ui/chat.js", "text/javascript; charset=utf-8"),
        ("/ui/chat.css", "text/css; charset=utf-8"),
    ] {
        let r = s.get(path, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(r.headers()["content-type"], content_type, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-cache", "{path}");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        assert!(r.text().await.unwrap().len() > 500, "{path}");
        // Revalidation is cheap: the same build answers 304 with no body.
        let again = s.get_with(path, "if-none-match", &etag).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
        assert!(again.bytes().await.unwrap().is_empty());
    }
    assert_eq!(s.get("/ui/other.js", None).await.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}
