//! Named OpenAI-compatible providers (issue 16): `[providers.vllm]` and
//! `[providers.openrouter]`, each with its own URL and key, and a routing rule that names vllm
//! with openrouter as its fallback. vllm answers; when it fails openrouter does, marked as a
//! fallback; when both fail the request fails with the upstream's reason (local fallback off).

mod common;

use common::upstream::{answer, Act, Upstream};
use common::TestServer;
use edgechat::config::{ProviderConfig, ProviderKind, ProviderName, RouteRule};
use edgechat::secret::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn named(upstream: &Upstream, key: &str, models: &[&str]) -> ProviderConfig {
    ProviderConfig {
        kind: Some(ProviderKind::Openai),
        base_url: upstream.base.clone(),
        api_key: Some(Secret::new(key)),
        models: models.iter().map(|m| m.to_string()).collect(),
        attempts: 1,
        ..ProviderConfig::default()
    }
}

#[tokio::test]
async fn a_rule_names_a_provider_and_its_fallback_chain() {
    let vllm = Upstream::start(vec![
        answer(vec!["from vllm"]),
        Act::Status(500, None),
        Act::Status(500, None),
    ])
    .await;
    let openrouter =
        Upstream::start(vec![answer(vec!["from openrouter"]), Act::Status(503, None)]).await;
    let s = TestServer::start(|c| {
        c.providers.named.insert("vllm".into(), named(&vllm, "sk-vllm", &["llama-3"]));
        c.providers.named.insert("openrouter".into(), named(&openrouter, "sk-or", &[]));
        let (first, then) =
            (ProviderName::parse("vllm").unwrap(), ProviderName::parse("openrouter").unwrap());
        c.routing
            .rules
            .insert(0, RouteRule { fallback: vec![then], ..RouteRule::new("llama-*", first) });
        c.routing.fallback = false;
    })
    .await;
    let token = s.user("nora").await;
    let body = json!({"model": "llama-3", "messages": [{"role": "user", "content": "Hi"}]});
    let ask = || s.post("/v1/chat/completions", &body, Some(&token));

    let r = ask().await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-edgechat-provider"], "vllm");
    assert!(r.headers().get("x-edgechat-fallback").is_none());
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["choices"][0]["message"]["content"], "from vllm");

    let r = ask().await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-edgechat-provider"], "openrouter");
    assert_eq!(r.headers()["x-edgechat-fallback"], "vllm->openrouter");
    assert_eq!(r.headers()["x-edgechat-fallback-reason"], "upstream_error");
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["choices"][0]["message"]["content"], "from openrouter");
    // Each provider got its own key, and the model name as asked.
    assert!(vllm.seen().iter().all(|s| s.auth == "Bearer sk-vllm"));
    assert!(openrouter.seen().iter().all(|s| s.auth == "Bearer sk-or"));
    assert_eq!(openrouter.requests()[0]["model"], "llama-3");

    let r = ask().await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "both failed, no local fallback");

    let models: Value = s.get("/v1/models", Some(&token)).await.json().await.unwrap();
    let llama = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "llama-3");
    assert_eq!(llama.unwrap()["owned_by"], "vllm", "{models}");
    let ready: Value = s.get("/ready", None).await.json().await.unwrap();
    let state = |name: &str| {
        let p = ready["providers"].as_array().unwrap().iter().find(|p| p["provider"] == name);
        p.unwrap_or_else(|| panic!("{name} missing from {ready}"))["state"].clone()
    };
    assert_eq!((state("vllm"), state("openrouter")), (json!("up"), json!("up")));
    s.stop().await;
}
