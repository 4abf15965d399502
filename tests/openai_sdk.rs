//! The official `openai` Python SDK, unchanged, pointed at edgechat: models, a completion, the
//! same completion streamed (with usage), `finish_reason: "length"`, and `AuthenticationError`
//! for a bad key. `./scripts/test.sh` installs the pinned SDK from PyPI.

mod common;
mod common_local;

use common::{python_sdk, with_default_model, TestServer};
use common_local::default_model;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_sdk_works_unchanged() {
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("sdk").await;
    let key: Value =
        s.post("/auth/api-keys", &json!({"name": "sdk"}), Some(&token)).await.json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    let text = python_sdk("openai_sdk.py", vec![s.url("/v1"), key, "smollm2".into()]).await;
    assert!(text.contains(": ok"), "{text}");
}
