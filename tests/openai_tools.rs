//! The OpenAI face's tools and other fields against a loopback stand-in for OpenAI: a tool loop
//! through the official Python SDK (the call streamed in fragments), every field relayed as
//! sent, what the upstream streams (refusal, log probabilities, fingerprint) passed back, tool
//! messages stored and continued, and fields a provider cannot honour refused by name.

mod common;
mod common_local;

use common::upstream::{answer, Act, Upstream};
use common::{python_sdk, with_default_model, TestServer};
use common_local::default_model;
use edgechat::config::{Config, ProviderName, RouteRule};
use edgechat::secret::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Every model goes to OpenAI at `up`, with no fallback.
fn openai_at(c: &mut Config, up: &Upstream) {
    c.providers.openai.base_url = up.base.clone();
    c.providers.openai.api_key = Some(Secret::new("sk-test"));
    c.providers.openai.attempts = 1;
    c.routing.fallback = false;
    c.routing.rules = vec![RouteRule::new("*", ProviderName::OPENAI)];
}

/// An OpenAI chunk with `delta` and `finish`.
fn chunk(delta: Value, finish: Value) -> Value {
    json!({"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-4o-mini", "system_fingerprint": "fp_up",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
}

/// `get_weather({"city": "Paris"})`, its arguments in three fragments, as OpenAI streams it.
fn tool_call() -> Act {
    let args = |a: &str| json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]});
    Act::Chunks(vec![
        chunk(
            json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1",
                "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
            Value::Null,
        ),
        chunk(args("{\"ci"), Value::Null),
        chunk(args("ty\": \"Par"), Value::Null),
        chunk(args("is\"}"), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}),
    ])
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"], "additionalProperties": false}, "strict": true}})
}

async fn completion(s: &TestServer, token: &str, body: Value) -> (StatusCode, Value) {
    let r = s.post("/v1/chat/completions", &body, Some(token)).await;
    (r.status(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tool_loop_works_through_the_official_python_sdk() {
    let up = Upstream::start(vec![
        tool_call(),
        tool_call(),
        answer(vec!["It is 21 degrees", " in Paris."]),
    ])
    .await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("sdk").await;
    let args = vec![s.url("/v1"), token, "gpt-4o-mini".into()];
    let text = python_sdk("openai_tools.py", args).await;
    assert!(text.contains("tool loop: ok"), "{text}");

    let sent = up.requests();
    assert_eq!(sent[0]["tools"], json!([weather_tool()]), "relayed as sent");
    assert_eq!(sent[0]["tool_choice"], "auto");
    let history = &sent[2]["messages"];
    assert_eq!(
        history[1],
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]})
    );
    assert_eq!(
        history[2],
        json!({"role": "tool", "content": "{\"celsius\": 21}", "tool_call_id": "call_1"})
    );
}

#[tokio::test]
async fn every_field_is_relayed_and_what_the_upstream_streams_comes_back() {
    let logprob =
        |t: &str| json!({"token": t, "logprob": -0.25, "bytes": [123], "top_logprobs": []});
    let mut with_logprobs = chunk(json!({"content": "{}"}), Value::Null);
    with_logprobs["choices"][0]["logprobs"] = json!({"content": [logprob("{"), logprob("}")]});
    let up = Upstream::start(vec![Act::Chunks(vec![
        with_logprobs,
        chunk(json!({}), json!("stop")),
        json!({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
    ])])
    .await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let schema = json!({"type": "object", "properties": {}, "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "empty", "schema": schema, "strict": true}});
    let body = json!({
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "{}?"}],
        "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": false, "response_format": format,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"50256": -100},
        "logprobs": true, "top_logprobs": 2, "seed": 7, "user": "u-1", "metadata": {"k": "v"},
        "service_tier": "flex", "not_an_openai_field": 1,
    });
    let (status, out) = completion(&s, &token, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let sent = &up.requests()[0];
    for key in [
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "seed",
        "user",
        "metadata",
        "service_tier",
    ] {
        assert_eq!(sent[key], body[key], "{key} relayed as sent");
    }
    assert!(sent.get("not_an_openai_field").is_none(), "fields OpenAI does not define stay here");
    assert_eq!(out["system_fingerprint"], "fp_up");
    assert_eq!(out["choices"][0]["logprobs"]["content"], json!([logprob("{"), logprob("}")]));
    assert_eq!(out["choices"][0]["message"]["content"], "{}");

    let mut streamed = body;
    streamed["stream"] = true.into();
    let events = sse(&s, &token, &streamed).await;
    assert!(events.iter().all(|e| e["system_fingerprint"] == "fp_up"), "{events:?}");
    let items: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(items, [&logprob("{"), &logprob("}")]);
}

/// The JSON events of a streamed completion, `[DONE]` left out.
async fn sse(s: &TestServer, token: &str, body: &Value) -> Vec<Value> {
    let r = s.post("/v1/chat/completions", body, Some(token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    let data = text.lines().filter_map(|l| l.strip_prefix("data: "));
    data.filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
}

#[tokio::test]
async fn a_refusal_comes_back_as_the_upstream_sent_it() {
    let refuse = |r: &str| chunk(json!({"refusal": r}), Value::Null);
    let up = Upstream::start(vec![Act::Chunks(vec![
        refuse("I can't"),
        refuse(" help with that."),
        chunk(json!({}), json!("stop")),
    ])])
    .await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "?"}]});
    let (status, out) = completion(&s, &token, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let message = &out["choices"][0]["message"];
    assert_eq!(
        (&message["content"], &message["refusal"]),
        (&Value::Null, &json!("I can't help with that."))
    );
    let mut streamed = body;
    streamed["stream"] = true.into();
    let events = sse(&s, &token, &streamed).await;
    let refusal: String =
        events.iter().filter_map(|e| e["choices"][0]["delta"]["refusal"].as_str()).collect();
    assert_eq!(refusal, "I can't help with that.");
}

#[tokio::test]
async fn a_stored_tool_conversation_can_be_continued() {
    let up = Upstream::start(vec![answer(vec!["21 degrees."]), answer(vec!["Still 21."])]).await;
    let s = TestServer::start(|c| openai_at(c, &up)).await;
    let token = s.user("alice").await;
    let call = json!({"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}});
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 21}"},
    ]);
    let body = json!({"model": "gpt-4o-mini", "messages": messages, "tools": [weather_tool()]});
    let (status, out) = completion(&s, &token, body).await;
    assert_eq!(status, StatusCode::OK, "{out}");

    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    let id = page["items"][0]["id"].as_str().unwrap().to_string();
    let conv: Value =
        s.get(&format!("/conversations/{id}"), Some(&token)).await.json().await.unwrap();
    let stored = &conv["messages"];
    assert_eq!((&stored[1]["tool_calls"], &stored[2]["role"]), (&json!([call]), &json!("tool")));
    assert_eq!(stored[2]["tool_call_id"], "call_1");

    let next = json!({"message": "And now?", "conversation_id": id, "model": "gpt-4o-mini"});
    let r = s.post("/chat", &next, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let history = &up.requests()[1]["messages"];
    assert_eq!(history[1]["tool_calls"], json!([call]), "{history}");
    assert_eq!(
        (&history[2]["role"], &history[2]["tool_call_id"]),
        (&json!("tool"), &json!("call_1"))
    );
    assert_eq!(history[4]["content"], "And now?");
}

#[tokio::test]
async fn fields_a_provider_cannot_honour_are_refused_by_name() {
    let up = Upstream::start(vec![answer(vec!["hf"])]).await;
    let model = default_model();
    let s = TestServer::start(|c| {
        with_default_model(c, &model);
        let p = &mut c.providers.huggingface;
        p.base_url = up.base.clone();
        p.api_key = Some(Secret::new("hf_test"));
        p.models = vec!["org/tgi-model".into()];
        p.text_generation_models = vec!["org/tgi-model".into()];
        p.text_generation_url = up.base.clone();
        p.attempts = 1;
        c.routing.fallback = false;
    })
    .await;
    let token = s.user("alice").await;
    let ask = |model: &str, extra: Value| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let cases = [
        ("org/tgi-model", json!({"tools": [weather_tool()]}), "tools", "text-generation"),
        ("org/tgi-model", json!({"logprobs": true}), "logprobs", "text-generation"),
        ("org/tgi-model", json!({"service_tier": "flex"}), "service_tier", "text-generation"),
        ("smollm2", json!({"reasoning_effort": "low"}), "reasoning_effort", "local model"),
        ("smollm2", json!({"service_tier": "flex"}), "service_tier", "local model"),
    ];
    for (model, extra, field, who) in cases {
        let (status, out) = completion(&s, &token, ask(model, extra)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {out}");
        let error = &out["error"];
        assert_eq!(error["param"], field, "{out}");
        let message = error["message"].as_str().unwrap();
        assert!(message.starts_with(field) && message.contains(who), "{message}");
    }
    assert!(up.requests().is_empty(), "nothing refused reaches the upstream");
    // Informational fields change nothing and are accepted everywhere.
    let (status, out) =
        completion(&s, &token, ask("smollm2", json!({"user": "u-1", "max_tokens": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    // HuggingFace's text-generation API takes a JSON response format as its grammar (what
    // this stand-in, which speaks OpenAI's stream, answers does not matter here).
    let format = json!({"response_format": {"type": "json_object"}});
    completion(&s, &token, ask("org/tgi-model", format)).await;
    let grammar = &up.requests()[0]["parameters"]["grammar"];
    assert_eq!(grammar, &json!({"type": "json", "value": {"type": "object"}}));
}

#[tokio::test]
async fn a_fallback_never_answers_without_the_tools_it_was_asked_for() {
    let up = Upstream::start(vec![Act::Status(500, None)]).await;
    let model = default_model();
    let s = TestServer::start(|c| {
        with_default_model(c, &model);
        openai_at(c, &up);
        c.routing.fallback = true;
    })
    .await;
    let token = s.user("alice").await;
    let messages = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let body = json!({"model": "gpt-4o-mini", "messages": messages, "tools": [weather_tool()], "logprobs": true});
    let (status, out) = completion(&s, &token, body).await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "the upstream's failure, not a local answer: {out}"
    );
    // Without what the local model cannot honour, the same failure falls back.
    let body = json!({"model": "gpt-4o-mini", "messages": messages, "max_tokens": 2});
    let r = s.post("/v1/chat/completions", &body, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-edgechat-fallback"], "openai->local");
}
