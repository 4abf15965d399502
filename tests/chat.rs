//! Chat end to end through the real server: both faces, remote answers from a loopback
//! stand-in for OpenAI, fallback to the local model (the default model, really generating),
//! persistence of whole turns only, and the per-user limits.

mod common;
mod common_local;

use common::upstream::{answer, Act, Upstream};
use common::{with_default_model, TestServer};
use common_local::default_model;
use edgechat::config::{Config, QuotaConfig};
use edgechat::secret::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// OpenAI at `upstream`, one attempt per request, short deadlines, a breaker that stays shut.
fn openai_at(c: &mut Config, upstream: &Upstream) {
    let p = &mut c.providers.openai;
    p.base_url = upstream.base.clone();
    p.api_key = Some(Secret::new("sk-test"));
    p.attempts = 1;
    // Short enough for the stall tests, long enough for a loaded 2-core machine.
    p.first_byte_timeout_ms = 2_000;
    p.idle_timeout_ms = 2_000;
    p.breaker_failures = 100;
}

async fn chat(
    s: &TestServer,
    token: &str,
    body: Value,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let r = s.post("/chat", &body, Some(token)).await;
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_seed_client_flow_answers_from_the_local_model_when_openai_has_no_key() {
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("alice").await;
    let body = json!({"message": "Say hello.", "model": "gpt-3.5-turbo", "max_tokens": 8, "temperature": 0});
    let (status, h, out) = chat(&s, &token, body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!((out["provider"].as_str(), out["fallback"].as_bool()), (Some("local"), Some(true)));
    assert_eq!(out["model"], "smollm2");
    assert_eq!(header(&h, "x-edgechat-fallback"), Some("openai->local"));
    assert_eq!(header(&h, "x-edgechat-fallback-reason"), Some("not_configured"));
    assert!(!out["response"].as_str().unwrap().is_empty());
    let u = &out["usage"];
    assert_eq!(
        u["total_tokens"],
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(u["completion_tokens"].as_u64().unwrap() <= 8);
    let id = out["conversation_id"].as_str().unwrap();
    let conv: Value =
        s.get(&format!("/conversations/{id}"), Some(&token)).await.json().await.unwrap();
    let messages = conv["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0]["role"].as_str(), messages[0]["content"].as_str()),
        (Some("user"), Some("Say hello."))
    );
    assert_eq!(messages[1]["content"], out["response"]);
    assert_eq!(messages[1]["id"], out["message_id"]);
    assert_eq!(messages[1]["provider"], "local");
    assert_eq!(conv["title"], "Say hello.");
}

#[tokio::test]
async fn a_remote_answer_is_stored_and_the_next_turn_carries_it_as_context() {
    let up = Upstream::start(vec![answer(vec!["Hello", " there"])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let (status, h, out) =
        chat(&s, &token, json!({"message": "Hi!", "model": "gpt-4o-mini"})).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["response"], "Hello there");
    assert_eq!(
        (out["provider"].as_str(), out["fallback"].as_bool()),
        (Some("openai"), Some(false))
    );
    assert_eq!(
        out["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    assert!(h.get("x-edgechat-fallback").is_none());
    assert_eq!(header(&h, "x-edgechat-provider"), Some("openai"));
    let id = out["conversation_id"].as_str().unwrap().to_string();

    let next = json!({"message": "And again?", "model": "gpt-4o-mini", "conversation_id": id, "system": "Be brief."});
    let (status, _, out2) = chat(&s, &token, next).await;
    assert_eq!(status, StatusCode::OK, "{out2}");
    assert_eq!(out2["conversation_id"], id.as_str());
    let sent = &up.requests()[1]["messages"];
    assert_eq!(
        sent,
        &json!([
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "And again?"},
        ])
    );
    let conv: Value =
        s.get(&format!("/conversations/{id}"), Some(&token)).await.json().await.unwrap();
    assert_eq!(
        conv["message_count"].as_u64().or(Some(conv["messages"].as_array().unwrap().len() as u64)),
        Some(5)
    );

    // Another user cannot continue it, nor learn that it exists; nothing reaches the upstream.
    let mallory = s.user("mallory").await;
    for cid in [id.as_str(), "0190f6f4-0000-7000-8000-000000000000", "not-a-uuid"] {
        let (status, _, out) = chat(
            &s,
            &mallory,
            json!({"message": "x", "model": "gpt-4o-mini", "conversation_id": cid}),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{out}");
        assert_eq!(out["detail"], "Conversation not found");
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn each_upstream_failure_falls_back_to_the_local_model_with_its_reason() {
    let model = default_model();
    let script = vec![
        Act::Status(500, None),
        Act::Status(429, Some(0)),
        Act::Status(401, None),
        Act::Malformed,
        Act::DropAfterFirst,
        Act::StallAfterFirst,
        Act::StallBeforeHead,
    ];
    let up = Upstream::start(script).await;
    let s = TestServer::start(|c| {
        openai_at(c, &up);
        with_default_model(c, &model);
    })
    .await;
    let token = s.user("alice").await;
    let expected = [
        "upstream_error",
        "rate_limited",
        "rejected",
        "protocol_error",
        "protocol_error",
        "timeout",
        "timeout",
    ];
    for reason in expected {
        let started = Instant::now();
        let body =
            json!({"message": "Hi", "model": "gpt-4o-mini", "max_tokens": 4, "temperature": 0});
        let (status, h, out) = chat(&s, &token, body).await;
        assert_eq!(status, StatusCode::OK, "{reason}: {out}");
        assert_eq!(header(&h, "x-edgechat-fallback"), Some("openai->local"), "{reason}");
        assert_eq!(header(&h, "x-edgechat-fallback-reason"), Some(reason));
        assert_eq!(
            (out["provider"].as_str(), out["fallback"].as_bool()),
            (Some("local"), Some(true))
        );
        assert!(!out.to_string().contains("sk-secret"), "an upstream body leaked: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{reason} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(up.hits(), expected.len());
}

#[tokio::test]
async fn with_fallback_off_failures_are_502_and_unanswerable_models_503() {
    let up = Upstream::start(vec![Act::Status(503, None)]).await;
    let s = TestServer::start(|c| {
        openai_at(c, &up);
        c.routing.fallback = false;
    })
    .await;
    let token = s.user("alice").await;
    let (status, _, out) = chat(&s, &token, json!({"message": "Hi", "model": "gpt-4o"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{out}");
    let detail = out["detail"].as_str().unwrap();
    assert!(detail.contains("openai") && !detail.contains("sk-secret"), "{detail}");
    let (status, _, out) = chat(&s, &token, json!({"message": "Hi", "model": "claude-3"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing routes claude-3: {out}");
    // HuggingFace has no key, and no local model is loaded.
    for model in ["meta-llama/Llama-3.1-8B-Instruct", "local"] {
        let (status, _, out) = chat(&s, &token, json!({"message": "Hi", "model": model})).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{model}: {out}");
        assert!(out["detail"].is_string(), "{out}");
    }
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"model": "claude-3", "messages": [{"role": "user", "content": "x"}]}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    let ready: Value = s.get("/ready", None).await.json().await.unwrap();
    let providers = ready["providers"].as_array().unwrap();
    assert!(
        providers.contains(&json!({"provider": "huggingface", "state": "not_configured"})),
        "{ready}"
    );
}

#[tokio::test]
async fn the_breaker_opens_after_two_failures_and_later_requests_skip_the_upstream() {
    let model = default_model();
    for (act, reason) in
        [(Act::Status(500, None), "upstream_error"), (Act::Malformed, "protocol_error")]
    {
        let up = Upstream::start(vec![act]).await;
        let s = TestServer::start(|c| {
            openai_at(c, &up);
            c.providers.openai.breaker_failures = 2;
            with_default_model(c, &model);
        })
        .await;
        let token = s.user("alice").await;
        let mut reasons = Vec::new();
        for _ in 0..3 {
            let body =
                json!({"message": "Hi", "model": "gpt-4o-mini", "max_tokens": 2, "temperature": 0});
            let (status, h, _) = chat(&s, &token, body).await;
            assert_eq!(status, StatusCode::OK);
            reasons.push(header(&h, "x-edgechat-fallback-reason").unwrap().to_string());
        }
        assert_eq!(reasons, [reason, reason, "circuit_open"], "each failure counts once");
        assert_eq!(up.hits(), 2, "the open circuit skipped the upstream");
        let ready: Value = s.get("/ready", None).await.json().await.unwrap();
        let providers = ready["providers"].as_array().unwrap();
        assert!(
            providers.contains(&json!({"provider": "openai", "state": "circuit_open"})),
            "{ready}"
        );
    }
}

#[tokio::test]
async fn the_seed_stream_sends_deltas_then_the_answer_then_done() {
    let up = Upstream::start(vec![Act::Stream {
        deltas: vec!["Hel", "lo", " there"],
        gap: Duration::from_millis(20),
        finish: "stop",
    }])
    .await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let r = s
        .post(
            "/chat",
            &json!({"message": "Hi", "model": "gpt-4o-mini", "stream": true}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(r.headers(), "content-type"), Some("text/event-stream"));
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let (last, deltas) = parsed.split_last().unwrap();
    let text: String = deltas.iter().map(|d| d["delta"].as_str().unwrap()).collect();
    assert_eq!(text, "Hello there");
    assert_eq!(deltas.len(), 3);
    assert_eq!(
        (last["response"].as_str(), last["provider"].as_str()),
        (Some("Hello there"), Some("openai"))
    );
    let id = last["conversation_id"].as_str().unwrap();
    let conv: Value =
        s.get(&format!("/conversations/{id}"), Some(&token)).await.json().await.unwrap();
    assert_eq!(conv["messages"][1]["content"], "Hello there");
}

#[tokio::test]
async fn a_stream_broken_midway_ends_with_an_error_and_stores_nothing() {
    let up = Upstream::start(vec![Act::DropAfterFirst]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let r = s
        .post(
            "/chat",
            &json!({"message": "Hi", "model": "gpt-4o-mini", "stream": true}),
            Some(&token),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let events = sse_data(&r.text().await.unwrap());
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(serde_json::from_str::<Value>(&events[0]).unwrap(), json!({"delta": "first"}));
    let error: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted");
    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    assert_eq!(page["items"], json!([]), "a half answer was stored");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_the_upstream_request() {
    let deltas = vec!["x"; 500];
    let up = Upstream::start(vec![Act::Stream {
        deltas,
        gap: Duration::from_millis(10),
        finish: "stop",
    }])
    .await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let mut r = s
        .post(
            "/chat",
            &json!({"message": "Hi", "model": "gpt-4o-mini", "stream": true}),
            Some(&token),
        )
        .await;
    assert!(r.chunk().await.unwrap().is_some());
    drop(r);
    // 500 deltas 10 ms apart take 5 s; the upstream must see us leave well before.
    tokio::time::timeout(Duration::from_secs(3), up.client_gone.notified())
        .await
        .expect("the upstream request was not cancelled");
    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    assert_eq!(page["items"], json!([]));
}

#[tokio::test]
async fn models_with_a_slash_go_to_huggingface() {
    let up = Upstream::start(vec![answer(vec!["hf"])]).await;
    let s = TestServer::start(|c| {
        let p = &mut c.providers.huggingface;
        p.base_url = up.base.clone();
        p.api_key = Some(Secret::new("hf_test"));
        p.models = vec!["Qwen/Qwen2.5-7B-Instruct".into()];
    })
    .await;
    let token = s.user("alice").await;
    let (status, _, out) =
        chat(&s, &token, json!({"message": "Hi", "model": "Qwen/Qwen2.5-7B-Instruct"})).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(
        (out["provider"].as_str(), out["response"].as_str()),
        (Some("huggingface"), Some("hf"))
    );
    assert_eq!(up.requests()[0]["model"], "Qwen/Qwen2.5-7B-Instruct");
    let models: Value = s.get("/v1/models", Some(&token)).await.json().await.unwrap();
    assert_eq!(
        models["data"],
        json!([{"id": "Qwen/Qwen2.5-7B-Instruct", "object": "model", "created": models["data"][0]["created"], "owned_by": "huggingface"}])
    );
}

#[tokio::test]
async fn chat_requests_and_tokens_are_limited_per_user() {
    let up = Upstream::start(vec![answer(vec!["ok"])]).await;
    let s = TestServer::start(|c| {
        openai_at(c, &up);
        c.rate_limit.chat_per_user.requests = QuotaConfig { requests: 2, per_secs: 60, burst: 2 };
    })
    .await;
    let (alice, bob) = (s.user("alice").await, s.user("bob").await);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let r = s.post("/v1/chat/completions", &body, Some(&alice)).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    }
    let r = s.post("/v1/chat/completions", &body, Some(&alice)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = r.headers();
    assert!(header(h, "retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(header(h, "x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(header(h, "ratelimit-remaining"), Some("0"));
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(
        s.post("/chat", &json!({"message": "x", "model": "gpt-4o-mini"}), Some(&alice))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        s.post("/v1/chat/completions", &body, Some(&bob)).await.status(),
        StatusCode::OK,
        "limits are per user"
    );

    // A token budget of 15: the first answer (7 + 3 tokens) fits, the second overdraws it.
    let s = TestServer::start(|c| {
        openai_at(c, &up);
        c.rate_limit.chat_per_user.tokens = QuotaConfig { requests: 15, per_secs: 60, burst: 15 };
    })
    .await;
    let carol = s.user("carol").await;
    for _ in 0..2 {
        assert_eq!(
            s.post("/v1/chat/completions", &body, Some(&carol)).await.status(),
            StatusCode::OK
        );
    }
    let r = s.post("/v1/chat/completions", &body, Some(&carol)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(r.headers(), "x-ratelimit-limit-tokens"), Some("15"));
}

#[tokio::test]
async fn a_long_conversation_is_trimmed_to_the_context_window_oldest_first() {
    let model = default_model();
    let s = TestServer::start(|c| {
        with_default_model(c, &model);
        c.local.context = 160;
    })
    .await;
    // An API key works on the seed face as well as a JWT.
    let token = s.user("alice").await;
    let key: Value =
        s.post("/auth/api-keys", &json!({"name": "k"}), Some(&token)).await.json().await.unwrap();
    let key = key["key"].as_str().unwrap();
    let long = "word ".repeat(60);
    let mut id = Value::Null;
    for turn in 0..4 {
        let body = json!({"message": format!("{turn}: {long}"), "max_tokens": 4, "temperature": 0, "conversation_id": id});
        let (status, _, out) = chat(&s, key, body).await;
        assert_eq!(status, StatusCode::OK, "turn {turn}: {out}");
        let prompt = out["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            prompt <= 156,
            "turn {turn}: a {prompt}-token prompt does not leave room to answer"
        );
        id = out["conversation_id"].clone();
    }
    let conv: Value = s
        .get(&format!("/conversations/{}", id.as_str().unwrap()), Some(key))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        conv["messages"].as_array().unwrap().len(),
        8,
        "trimming drops context, never history"
    );

    // One message that cannot fit at all is the client's to fix.
    let body = json!({"message": "word ".repeat(400), "max_tokens": 4});
    let (status, _, out) = chat(&s, key, body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{out}");
    assert!(out["detail"].as_str().unwrap().contains("context"), "{out}");
}
