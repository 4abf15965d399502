//! Requests refused before any provider is asked, the same way on every face (issue 12, §5):
//! background chat refuses at enqueue what `/chat` refuses at once, model names are capped,
//! one input limit holds for every provider, and `/v1` checks `stop` and the roles.

mod common;

use common::upstream::{answer, Upstream};
use common::TestServer;
use edgechat::config::Config;
use edgechat::secret::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// OpenAI at `upstream` with a key, one attempt per request.
fn openai_at(c: &mut Config, upstream: &Upstream) {
    c.providers.openai.base_url = upstream.base.clone();
    c.providers.openai.api_key = Some(Secret::new("sk-test"));
    c.providers.openai.attempts = 1;
}

async fn post(s: &TestServer, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
    let r = s.post(path, body, Some(token)).await;
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// The seed face's validation error names `body.<field>`.
fn seed_field(out: &Value) -> Option<&str> {
    out["detail"][0]["loc"][1].as_str().filter(|_| out["detail"][0]["loc"][0] == "body")
}

fn one_user_message(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[tokio::test]
async fn background_chat_refuses_at_enqueue_what_chat_refuses_at_once() {
    let up = Upstream::start(vec![answer(vec!["Hello"])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let alice = s.user("alice").await;
    let bob = s.user("bob").await;
    let (status, out) = post(&s, "/chat", &bob, &json!({"message": "Hi", "model": "gpt-4o"})).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let bobs = out["conversation_id"].as_str().unwrap().to_string();

    let unknown_model = json!({"message": "Hi", "model": "claude-3-opus"});
    let not_hers = json!({"message": "Hi", "model": "gpt-4o", "conversation_id": bobs});
    for body in [unknown_model, not_hers] {
        let now = post(&s, "/chat", &alice, &body).await;
        let queued = post(&s, "/chat/background", &alice, &body).await;
        assert_eq!(now.0, StatusCode::NOT_FOUND, "{}", now.1);
        assert_eq!(queued, now, "the same status and body as /chat, at once");
    }
    let tasks = s.get("/chat/tasks", Some(&alice)).await.json::<Value>().await.unwrap();
    assert_eq!(tasks["items"], json!([]), "nothing was queued: {tasks}");
    assert_eq!(up.hits(), 1, "only bob's chat reached the provider");
}

#[tokio::test]
async fn model_names_are_capped_on_every_face() {
    let up = Upstream::start(vec![answer(vec!["Hello"])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    // 100 KB, and routed to OpenAI by the `gpt-*` rule if it got that far.
    let huge = format!("gpt-{}", "x".repeat(100 * 1024));
    for path in ["/chat", "/chat/background"] {
        let (status, out) = post(&s, path, &token, &json!({"message": "Hi", "model": huge})).await;
        // (The answer is not printed on failure: it may echo the 100 KB name.)
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        assert_eq!(seed_field(&out), Some("model"), "{path}: {}", out["detail"]);
        assert!(out["detail"][0]["msg"].as_str().unwrap().contains("256"), "{out}");
    }
    let body = json!({"model": huge, "messages": one_user_message("Hi")});
    let (status, out) = post(&s, "/v1/chat/completions", &token, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(out["error"]["param"], "model", "{}", out["error"]);
    assert_eq!(out["error"]["type"], "invalid_request_error");
    assert_eq!(up.hits(), 0, "refused before routing");

    // 256 characters is still a name.
    let longest = format!("gpt-{}", "x".repeat(252));
    let body = json!({"model": longest, "messages": one_user_message("Hi")});
    let (status, out) = post(&s, "/v1/chat/completions", &token, &body).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(up.requests()[0]["model"], longest.as_str());
}

#[tokio::test]
async fn one_input_limit_holds_for_every_provider_and_face() {
    let up = Upstream::start(vec![answer(vec!["Hello"])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    // 900 KB: under the 1 MiB body limit, far over the default input limit of 100,000.
    let long = "a".repeat(900 * 1024);
    // A remote model, and the local one (not loaded here: refused before that matters).
    for model in ["gpt-4o-mini", "local"] {
        let body = json!({"message": long, "model": model});
        for path in ["/chat", "/chat/background"] {
            let (status, out) = post(&s, path, &token, &body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{model} {path}: {out}");
            assert_eq!(seed_field(&out), Some("message"), "{out}");
            assert_eq!(out["detail"][0]["type"], "string_too_long");
            assert!(out["detail"][0]["msg"].as_str().unwrap().contains("100000"), "{out}");
        }
        let body = json!({"model": model, "messages": one_user_message(&long)});
        let (status, out) = post(&s, "/v1/chat/completions", &token, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{model}: {out}");
        assert_eq!(out["error"]["param"], "messages", "{out}");
    }
    assert_eq!(up.hits(), 0, "nothing reached the provider");
    s.stop().await;

    // Configurable, and counted over every message of the request (in characters).
    let s = TestServer::start(|c| {
        openai_at(c, &up);
        c.routing.max_input_chars = 10;
    })
    .await;
    let token = s.user("bob").await;
    let over = json!({"message": "ééééé", "system": "ssssss", "model": "gpt-4o-mini"});
    let (status, out) = post(&s, "/chat", &token, &over).await;
    assert_eq!((status, seed_field(&out)), (StatusCode::UNPROCESSABLE_ENTITY, Some("message")));
    let messages =
        json!([{"role": "system", "content": "ssssss"}, {"role": "user", "content": "ééééé"}]);
    let body = json!({"model": "gpt-4o-mini", "messages": messages});
    let (status, out) = post(&s, "/v1/chat/completions", &token, &body).await;
    assert_eq!(
        (status, out["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("messages"))
    );
    let within = json!({"message": "ééééé", "system": "sssss", "model": "gpt-4o-mini"});
    let (status, out) = post(&s, "/chat", &token, &within).await;
    assert_eq!(status, StatusCode::OK, "ten characters (fifteen bytes) pass: {out}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn v1_refuses_more_than_four_stop_sequences_and_no_user_message() {
    let up = Upstream::start(vec![answer(vec!["Hello"])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let completions = |body: Value| {
        let (s, token) = (&s, &token);
        async move { post(s, "/v1/chat/completions", token, &body).await }
    };

    let stops: Vec<String> = (0..10_000).map(|i| format!("stop{i}")).collect();
    let (status, out) = completions(
        json!({"model": "gpt-4o-mini", "messages": one_user_message("Hi"), "stop": stops}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
    assert_eq!(out["error"]["param"], "stop", "{out}");
    assert_eq!(out["error"]["type"], "invalid_request_error");

    for messages in [
        json!([{"role": "system", "content": "Be brief."}]),
        json!([{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi"}]),
    ] {
        let (status, out) =
            completions(json!({"model": "gpt-4o-mini", "messages": messages})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{out}");
        assert_eq!(out["error"]["param"], "messages", "{out}");
        assert!(out["error"]["message"].as_str().unwrap().contains("user"), "{out}");
    }
    assert_eq!(up.hits(), 0);

    let stop = ["a", "b", "c", "d"];
    let body = json!({"model": "gpt-4o-mini", "messages": one_user_message("Hi"), "stop": stop});
    let (status, out) = completions(body).await;
    assert_eq!(status, StatusCode::OK, "four are allowed: {out}");
    assert_eq!(up.requests()[0]["stop"], json!(stop));
}
