//! `GET /metrics` parsed by the reference OpenMetrics parser (Python's `prometheus_client`,
//! installed by ./scripts/test.sh): counters for HTTP, chat, tokens, fallbacks, the local model
//! and jobs move after real traffic; the states and the local kernels' instruction set are
//! there; the token guards it when set.

mod common;
mod common_local;

use common::upstream::{answer, Act, Upstream};
use common::{with_default_model, TestServer};
use common_local::default_model;
use edgechat::config::QuotaConfig;
use edgechat::secret::Secret;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PARSER: &str = "prometheus-client==0.21.1";

/// Every sample of the exposition, keyed `name{label=value,...}` (labels sorted).
fn parse(text: &str) -> HashMap<String, f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/parse_metrics.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is missing");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("No module named"),
        "the OpenMetrics parser is missing: pip install {PARSER} (./scripts/test.sh does)"
    );
    assert!(out.status.success(), "the parser refused the exposition: {err}\n{text}");
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn scrape(s: &TestServer) -> HashMap<String, f64> {
    let r = s.get("/metrics", None).await;
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    parse(&r.text().await.unwrap())
}

fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// How much `key` grew from `before` to `after`.
fn grew(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    let keys: Vec<_> =
        after.keys().filter(|k| k.starts_with(key.split('{').next().unwrap())).collect();
    assert!(after.contains_key(key), "no {key} among {keys:?}");
    value(after, key) - value(before, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_move_after_traffic_and_the_parser_accepts_the_output() {
    let model = default_model();
    let upstream = Upstream::start(vec![answer(vec!["Hel", "lo"]), answer(vec!["Hi"])]).await;
    let s = TestServer::start(|c| {
        with_default_model(c, &model);
        let p = &mut c.providers.openai;
        p.base_url = upstream.base.clone();
        p.api_key = Some(Secret::new("sk-test"));
    })
    .await;
    let token = s.user("metrics").await;
    let before = scrape(&s).await;

    let remote = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]});
    let r = s.post("/v1/chat/completions", &remote, Some(&token)).await;
    assert_eq!(r.status(), 200);
    let mut streamed = remote.clone();
    streamed["stream"] = true.into();
    let r = s.post("/v1/chat/completions", &streamed, Some(&token)).await;
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // No HuggingFace key: the local model answers instead (a fallback).
    let hf = json!({"message": "Hi", "model": "org/model", "max_tokens": 6, "temperature": 0});
    let r: Value = s.post("/chat", &hf, Some(&token)).await.json().await.unwrap();
    assert_eq!(r["fallback"], true, "{r}");
    let job = json!({"message": "Hi", "model": "smollm2", "max_tokens": 6, "temperature": 0});
    let job: Value = s.post("/chat/background", &job, Some(&token)).await.json().await.unwrap();
    let id = job["task_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j: Value =
            s.get(&format!("/chat/tasks/{id}"), Some(&token)).await.json().await.unwrap();
        if j["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "job did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The job's state is committed before its counter moves: wait for the counter too.
    let finished = "edgechat_jobs_finished_total{state=succeeded}";
    let after = loop {
        let m = scrape(&s).await;
        if value(&m, finished) > value(&before, finished) {
            break m;
        }
        assert!(Instant::now() < deadline, "the finished job was never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let route = "edgechat_http_requests_total{method=POST,route=/v1/chat/completions,status=200}";
    assert_eq!(grew(&before, &after, route), 2.0);
    let count = "edgechat_http_request_duration_seconds_count{method=POST,route=/chat}";
    assert_eq!(grew(&before, &after, count), 1.0);
    let ok = |p: &str, m: &str| {
        format!("edgechat_chat_requests_total{{model={m},outcome=ok,provider={p}}}")
    };
    assert_eq!(grew(&before, &after, &ok("openai", "gpt-4o-mini")), 2.0);
    assert_eq!(grew(&before, &after, &ok("local", "smollm2")), 2.0);
    let tokens = "edgechat_chat_tokens_total{kind=completion,model=smollm2,provider=local}";
    assert!(grew(&before, &after, tokens) >= 2.0);
    let fell = "edgechat_chat_fallbacks_total{from=huggingface,reason=not_configured,to=local}";
    assert_eq!(grew(&before, &after, fell), 1.0);
    assert!(grew(&before, &after, "edgechat_local_tokens_total{phase=decode}") >= 2.0);
    let lookups = "edgechat_local_prompt_cache_lookups_total{result=miss}";
    assert!(grew(&before, &after, lookups) >= 1.0);
    // Time to first token of the streamed answer; the upstream's latency of both.
    let ttft = "edgechat_chat_time_to_first_token_seconds_count{provider=openai}";
    assert_eq!(grew(&before, &after, ttft), 1.0);
    let upstream = "edgechat_upstream_latency_seconds_count{provider=openai}";
    assert_eq!(grew(&before, &after, upstream), 2.0);
    assert!(value(&after, "edgechat_local_decode_tokens_per_second{}") > 0.0);
    // The local answers' caches went to the prompt cache.
    assert!(value(&after, "edgechat_local_prompt_cache_bytes{}") > 0.0);
    assert_eq!(grew(&before, &after, finished), 1.0);
    assert!(value(&after, "edgechat_jobs{state=succeeded}") >= 1.0);
    assert_eq!(value(&after, "edgechat_provider_up{provider=openai}"), 1.0);
    // No key, no provider: nothing that would page someone.
    assert!(!after
        .keys()
        .any(|k| k.contains("provider=huggingface}") && k.starts_with("edgechat_provider")));
    assert_eq!(value(&after, "edgechat_provider_rejected{provider=openai}"), 0.0);
    assert!(value(&after, "edgechat_http_requests_in_flight{}") >= 1.0, "the scrape itself");
    let version = format!("edgechat_build_info{{version={}}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&after, &version), 1.0);
    assert!(value(&after, "process_cpu_seconds_total{}") > 0.0);
    assert!(value(&after, "process_resident_memory_bytes{}") > 1e6);
    assert!(value(&after, "process_open_fds{}") > 3.0);
    assert!(value(&after, "process_max_fds{}") >= value(&after, "process_open_fds{}"));
    assert!(value(&after, "process_start_time_seconds{}") > 1.7e9);
    assert_eq!(value(&after, "edgechat_circuit_breaker_open{provider=openai}"), 0.0);
    assert!(after.contains_key("edgechat_local_queue{model=smollm2,state=waiting}"));
    assert!(value(&after, "edgechat_store_size_bytes{}") > 0.0);
    // The instruction set of the loaded model's kernels, as the CPU (and EDGECHAT_ISA) allow.
    let isa = edgechat_llama::Isa::get().name();
    let kernels: Vec<_> =
        after.keys().filter(|k| k.starts_with("edgechat_local_kernels")).collect();
    assert_eq!(kernels, [&format!("edgechat_local_kernels_info{{isa={isa}}}")]);
    assert_eq!(value(&after, kernels[0]), 1.0);
    s.stop().await;
}

/// A provider that refuses our key is `rejected`, not up, on `/ready` and `/metrics`; refusals
/// by a rate limit are counted by limit; histogram bounds are numbers a person can read.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_key_rate_limits_and_readable_buckets() {
    let upstream = Upstream::start(vec![Act::Status(401, None)]).await;
    let s = TestServer::start(|c| {
        let p = &mut c.providers.openai;
        p.base_url = upstream.base.clone();
        p.api_key = Some(Secret::new("sk-revoked"));
        c.rate_limit.auth_per_address = QuotaConfig { requests: 1, per_secs: 3600, burst: 2 };
    })
    .await;
    let token = s.user("refused").await;
    let before = scrape(&s).await;
    let remote = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]});
    let r = s.post("/v1/chat/completions", &remote, Some(&token)).await;
    assert!(r.status().is_client_error() || r.status().is_server_error());
    let ready: Value = s.get("/ready", None).await.json().await.unwrap();
    let openai = ready["providers"].as_array().unwrap().iter().find(|p| p["provider"] == "openai");
    assert_eq!(openai.unwrap()["state"], "rejected", "{ready}");
    // Two /auth requests were the user's; this one is past the burst.
    let r = s.post("/auth/login", &json!({"username": "x", "password": "y"}), None).await;
    assert_eq!(r.status(), 429);

    let text = s.get("/metrics", None).await.text().await.unwrap();
    let after = parse(&text);
    assert_eq!(value(&after, "edgechat_provider_rejected{provider=openai}"), 1.0);
    assert_eq!(value(&after, "edgechat_provider_up{provider=openai}"), 0.0);
    assert_eq!(grew(&before, &after, "edgechat_rate_limited_total{limit=auth_per_address}"), 1.0);
    for bound in text.split("le=\"").skip(1).map(|t| t.split('"').next().unwrap()) {
        assert!(bound == "+Inf" || bound.len() <= 6, "an unreadable bucket bound: {bound}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_configured_token_is_required() {
    let s = TestServer::start(|c| c.metrics.token = Some(Secret::new("scrape-me"))).await;
    let r = s.get("/metrics", None).await;
    assert_eq!(r.status(), 401);
    let r = s.get_with("/metrics", "authorization", "Bearer wrong").await;
    assert_eq!(r.status(), 401);
    let r = s.get_with("/metrics", "authorization", "Bearer scrape-me").await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().ends_with("# EOF\n"));
    s.stop().await;
}

#[tokio::test]
async fn disabled_metrics_are_not_served() {
    let s = TestServer::start(|c| c.metrics.enabled = false).await;
    assert_eq!(s.get("/metrics", None).await.status(), 404);
    s.stop().await;
}
