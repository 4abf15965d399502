//! `/openapi.json` describes exactly the routes the router serves, and `/docs` works offline.

mod common;

use common::TestServer;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeSet;

fn refs(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.insert(r.trim_start_matches("#/components/schemas/").to_string());
            }
            m.values().for_each(|v| refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_and_the_router_are_the_same_set_of_routes() {
    let s = TestServer::start(|_| {}).await;
    let doc: Value = s.get("/openapi.json", None).await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = edgechat::api::routes()
        .list()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);

    // And the live server agrees: every documented operation is routed (never 404-unknown or
    // 405), and each documented path refuses the methods it does not list.
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "00000000-0000-0000-0000-000000000000")
            .replace("{asset}", "init.js");
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = s.client.request(m, s.url(&concrete)).send().await.unwrap();
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("\"Not Found\"") && !body.contains("Method Not Allowed"),
            "{method} {path}: {body}"
        );
        let listed: Vec<&String> =
            documented.iter().filter(|(_, p)| p == path).map(|(m, _)| m).collect();
        if !listed.iter().any(|m| *m == "PATCH") {
            let r = s.client.patch(s.url(&concrete)).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "PATCH {path}");
        }
    }

    // Every schema referenced is defined.
    let mut used = BTreeSet::new();
    refs(&doc, &mut used);
    let defined: BTreeSet<String> =
        doc["components"]["schemas"].as_object().unwrap().keys().cloned().collect();
    let missing: Vec<_> = used.difference(&defined).collect();
    assert!(missing.is_empty(), "undefined schemas: {missing:?}");
    assert!(defined.contains("RegisterRequest") && defined.contains("ConversationPageOut"));

    // Secured operations say so.
    assert_eq!(
        doc["paths"]["/conversations"]["get"]["security"][0]["bearer"],
        Value::Array(vec![])
    );
    assert!(doc["paths"]["/health"]["get"].get("security").is_none());
    s.stop().await;
}

#[tokio::test]
async fn docs_page_uses_only_its_own_assets() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/docs", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"), "{csp}");
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "no outside URLs: {html}");

    let mut assets = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            assets.push(part.split('"').next().unwrap().to_string());
        }
    }
    assert_eq!(assets.len(), 3, "{assets:?}");
    for asset in assets {
        assert!(asset.starts_with("/docs/"), "{asset}");
        let r = s.get(&asset, None).await;
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
        let body = r.bytes().await.unwrap();
        assert!(body.len() > 100, "{asset}");
    }
    let init = s.get("/docs/init.js", None).await.text().await.unwrap();
    assert!(init.contains("\"/openapi.json\"") && init.contains("validatorUrl: null"));
    assert_eq!(s.get("/docs/other.js", None).await.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}
