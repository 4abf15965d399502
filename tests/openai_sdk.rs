//! The official `openai` Python SDK, unchanged, pointed at edgechat: models, a completion, the
//! same completion streamed (with usage), `finish_reason: "length"`, and `AuthenticationError`
//! for a bad key. `./scripts/test.sh` installs the pinned SDK from PyPI.

mod common;
mod common_local;

use common::{with_default_model, TestServer};
use common_local::default_model;
use serde_json::{json, Value};
use std::process::Command;

const SDK: &str = "openai==3.57.0";

#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_sdk_works_unchanged() {
    let probe = Command::new("python3").args(["-c", "import openai"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "the openai Python package is missing: pip install {SDK} (./scripts/test.sh does)"
    );
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("sdk").await;
    let key: Value =
        s.post("/auth/api-keys", &json!({"name": "sdk"}), Some(&token)).await.json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_sdk.py");
    let base = s.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").args([script, &base, &key, "smollm2"]).output().unwrap()
    })
    .await
    .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": ok"), "{text}");
}
