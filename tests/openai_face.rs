//! The OpenAI face against the real server and the default model: models, completions in JSON
//! and as `chat.completion.chunk` SSE, finish reasons, usage, storage, and OpenAI-shaped errors.

mod common;
mod common_local;

use common::{with_default_model, TestServer};
use common_local::default_model;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn server() -> (TestServer, String) {
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("alice").await;
    (s, token)
}

fn request(max_tokens: u32) -> Value {
    json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in English."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
        ],
        "max_tokens": max_tokens, "temperature": 0, "some_future_field": {"ignored": true},
    })
}

#[tokio::test]
async fn json_and_stream_give_the_same_greedy_answer_with_usage() {
    let (s, token) = server().await;
    let r = s.post("/v1/chat/completions", &request(12), Some(&token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["model"], "smollm2");
    let text = out["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "{text}");
    let usage = &out["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage["prompt_tokens_details"], json!({"cached_tokens": 0}), "a fresh server");

    let mut body = request(12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", &body, Some(&token)).await;
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let raw = r.text().await.unwrap();
    let events: Vec<&str> = raw.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text, "stream and JSON differ at temperature 0");
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    // The same prompt again: all of it but the last token came from the prompt cache.
    let mut cached = out["usage"].clone();
    cached["prompt_tokens_details"]["cached_tokens"] =
        json!(usage["prompt_tokens"].as_u64().unwrap() - 1);
    assert_eq!(usage_chunk["usage"], cached);
    assert!(rest.last().unwrap()["choices"][0]["finish_reason"].is_string());
}

#[tokio::test]
async fn max_tokens_ends_with_length_and_store_false_keeps_nothing() {
    let (s, token) = server().await;
    let mut body = request(3);
    body["max_completion_tokens"] = json!(2);
    body["store"] = json!(false);
    let out: Value =
        s.post("/v1/chat/completions", &body, Some(&token)).await.json().await.unwrap();
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 2);
    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    assert_eq!(page["items"], json!([]));

    let out: Value =
        s.post("/v1/chat/completions", &request(2), Some(&token)).await.json().await.unwrap();
    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    let id = page["items"][0]["id"].as_str().unwrap();
    let conv: Value =
        s.get(&format!("/conversations/{id}"), Some(&token)).await.json().await.unwrap();
    let roles: Vec<&str> =
        conv["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["system", "user", "assistant"]);
    assert_eq!(conv["messages"][2]["content"], out["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn models_and_errors_speak_openai() {
    let (s, token) = server().await;
    let models: Value = s.get("/v1/models", Some(&token)).await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["owned_by"], "local");

    let r = s.get("/v1/models", Some("ec_not-a-key")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "authentication_error");

    let bad = [
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 2}),
        json!({"model": "smollm2", "messages": []}),
        json!({"model": "smollm2", "messages": [{"role": "tool", "content": "x"}]}),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stop": 5}),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": 9}),
        json!({"messages": [{"role": "user", "content": "x"}]}),
        json!("not an object"),
    ];
    for body in bad {
        let r = s.post("/v1/chat/completions", &body, Some(&token)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{body}: {e}");
    }
}
