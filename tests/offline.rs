//! The offline proof: the real binary in a network namespace of its own (`unshare -n`, only a
//! loopback), configured for OpenAI with a key. Chat still answers — from the local model,
//! with the fallback header — and once the breaker opens, requests stop trying OpenAI.
//!
//! The outer test re-runs this test binary inside the namespace (the client must be in there
//! too: the namespace's loopback is its own), where the inner test does the work.

mod common;
mod common_local;

use common::Binary;
use common_local::default_model;
use serde_json::{json, Value};
use std::process::Command;

const INNER: &str = "OFFLINE_NETNS_INNER";

#[test]
fn chat_answers_from_the_local_model_with_no_network() {
    let model = default_model();
    let root = unsafe { libc::geteuid() } == 0;
    let exe = std::env::current_exe().unwrap();
    // A new network namespace needs root, or a user namespace mapping us to root in it.
    let mut unshare = Command::new("unshare");
    unshare.arg("--net");
    if !root {
        unshare.arg("--map-root-user");
    }
    let script = r#"ip link set lo up && exec "$0" inside_a_namespace_with_no_network --exact --ignored --nocapture"#;
    let out = unshare
        .args(["--", "sh", "-c", script])
        .arg(&exe)
        .env(INNER, model)
        .output()
        .expect("unshare (util-linux) is needed for the offline test");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the test inside the namespace failed:\n{text}");
    assert!(text.contains("1 passed"), "the inner test did not run:\n{text}");
}

#[tokio::test]
#[ignore = "run by chat_answers_from_the_local_model_with_no_network inside `unshare -n`"]
async fn inside_a_namespace_with_no_network() {
    let model = std::env::var(INNER).expect("only runs inside the namespace");
    // Nothing outside: resolving OpenAI's host name must fail here.
    assert!(
        std::net::ToSocketAddrs::to_socket_addrs("api.openai.com:443").is_err(),
        "this namespace has a network"
    );
    let (_dir, data) = common::data_dir();
    let env = [
        ("EDGECHAT_LOCAL__MODEL", model.as_str()),
        ("EDGECHAT_LOCAL__NAME", "smollm2"),
        ("EDGECHAT_PROVIDERS__OPENAI__API_KEY", "sk-offline-test-key"),
        ("EDGECHAT_PROVIDERS__OPENAI__BREAKER_FAILURES", "2"),
    ];
    let server = Binary::spawn(&data, &[], &env);
    let client = common::client();
    let url = |p: &str| format!("{}{p}", server.base);
    let login = common::register_and_login(&server.base, "offline").await;
    let token = login["access_token"].as_str().unwrap();
    let mut reasons = Vec::new();
    for _ in 0..3 {
        let body = json!({"message": "What is the capital of France?", "system": "You are a helpful assistant. Answer in English.", "model": "gpt-4o-mini", "max_tokens": 8, "temperature": 0});
        let r = client.post(url("/chat")).bearer_auth(token).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-edgechat-fallback"], "openai->local");
        reasons.push(r.headers()["x-edgechat-fallback-reason"].to_str().unwrap().to_string());
        let out: Value = r.json().await.unwrap();
        assert_eq!(
            (out["provider"].as_str(), out["fallback"].as_bool()),
            (Some("local"), Some(true))
        );
        assert!(out["response"].as_str().unwrap().contains("Paris"), "{out}");
    }
    // Two failed attempts open the circuit: the third request does not try OpenAI at all.
    assert_eq!(reasons, ["unreachable", "unreachable", "circuit_open"]);
    let ready: Value = client.get(url("/ready")).send().await.unwrap().json().await.unwrap();
    assert!(
        ready["providers"]
            .as_array()
            .unwrap()
            .contains(&json!({"provider": "openai", "state": "circuit_open"})),
        "{ready}"
    );
    assert_eq!(ready["status"], "ready", "the local model can answer: {ready}");
}
