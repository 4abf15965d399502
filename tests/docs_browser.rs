//! `/docs` in a real headless Chromium with no network: Swagger UI must load from the binary's
//! own assets under our Content-Security-Policy and render every operation of /openapi.json.

mod common;

use common::TestServer;
use serde_json::Value;
use std::process::Command;

fn chromium() -> String {
    for candidate in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(candidate).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return candidate.to_string();
        }
    }
    panic!("no headless Chromium found: install it with `apt-get install chromium` (./scripts/test.sh does)");
}

#[tokio::test(flavor = "multi_thread")]
async fn swagger_ui_renders_every_operation_offline() {
    let browser = chromium();
    let s = TestServer::start(|_| {}).await;
    let doc: Value = s.get("/openapi.json", None).await.json().await.unwrap();
    let profile = tempfile::tempdir().unwrap();
    let url = s.url("/docs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=10000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let mut missing = Vec::new();
    for ops in doc["paths"].as_object().unwrap().values() {
        for op in ops.as_object().unwrap().values() {
            let id = op["operationId"].as_str().unwrap();
            if !dom.contains(&format!("-{id}\"")) {
                missing.push(id.to_string());
            }
        }
    }
    assert!(missing.is_empty(), "not rendered: {missing:?}\n{}", &dom[..dom.len().min(2000)]);
    s.stop().await;
}
