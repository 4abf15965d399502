//! Structured output from the local model: JSON schemas and `json_object` enforced by
//! constrained decoding, through the official OpenAI SDK and the seed face; a schema the
//! grammar compiler cannot use is refused.

mod common;
mod common_local;

use common::{with_default_model, TestServer};
use common_local::default_model;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_parses_local_answers_and_every_seeded_answer_validates() {
    let probe = Command::new("python3").args(["-c", "import openai, pydantic"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "the openai Python package is missing: pip install openai==3.57.0 (./scripts/test.sh does)"
    );
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("sdk").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_structured.py");
    let base = s.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").args([script, &base, &token, "smollm2"]).output().unwrap()
    })
    .await
    .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("20 seeded answers: ok"), "{text}");
}

#[tokio::test]
async fn json_object_on_the_seed_face_and_a_schema_that_cannot_be_used() {
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("alice").await;
    let body = json!({"message": "List three colours.", "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"}});
    let r = s.post("/chat", &body, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let out: Value = r.json().await.unwrap();
    let answer: Value = serde_json::from_str(out["response"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(answer.is_object(), "{answer}");

    let format = json!({"type": "json_schema", "json_schema": {"name": "bad",
        "schema": {"type": "objekt"}}});
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
        "response_format": format});
    let r = s.post("/v1/chat/completions", &body, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let error: Value = r.json().await.unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("JSON schema cannot be used"), "{message}");
}
