//! The log an operator reads (issue 16), from the real binary: one access line per request,
//! written when a stream ends, with its whole duration, time to first token and outcome
//! (completed, client left, shutdown); who asked, which model and provider answered, why the
//! local model stood in, and the tokens. Every line logged while serving a request carries
//! its id (retries, the fallback, the breaker opening); control commands say what they did
//! and whether it worked; the listening line is in the log.

mod common;
mod common_local;

use common::upstream::{answer, Act, Upstream};
use common::{client, data_dir, register_and_login, user_cmd, Binary};
use common_local::default_model;
use serde_json::{json, Value};
use std::time::Duration;

fn slow(deltas: usize) -> Act {
    Act::Stream { deltas: vec!["word "; deltas], gap: Duration::from_millis(100), finish: "stop" }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_says_what_happened_to_each_request() {
    let model = default_model();
    let script = vec![
        slow(3),
        slow(100),
        Act::Status(503, None),
        Act::Status(503, None),
        answer(vec!["probe"]),
        Act::Status(401, None),
        Act::Status(401, None),
        slow(100),
    ];
    let upstream = Upstream::start(script).await;
    let (_keep, dir) = data_dir();
    let log = dir.join("stderr.log");
    let env = [
        ("OPENAI_API_KEY", "sk-test"),
        ("EDGECHAT_PROVIDERS__OPENAI__BASE_URL", upstream.base.as_str()),
        ("EDGECHAT_PROVIDERS__OPENAI__ATTEMPTS", "2"),
        ("EDGECHAT_PROVIDERS__OPENAI__RETRY_BASE_MS", "1"),
        ("EDGECHAT_PROVIDERS__OPENAI__BREAKER_FAILURES", "1"),
        ("EDGECHAT_PROVIDERS__OPENAI__BREAKER_COOLDOWN_MS", "1"),
        ("EDGECHAT_LOCAL__MODEL", model.to_str().unwrap()),
        ("EDGECHAT_LOCAL__NAME", "smollm2"),
        ("EDGECHAT_SERVER__SHUTDOWN_GRACE_SECS", "1"),
        ("EDGECHAT_LOG__FORMAT", "json"),
    ];
    let server = Binary::spawn_logged(&dir, &[], &env, &log);
    let tokens = register_and_login(&server.base, "olga").await;
    let token = tokens["access_token"].as_str().unwrap().to_owned();
    let ask = |id: &str, stream: bool| {
        let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}]});
        let url = format!("{}/v1/chat/completions", server.base);
        client().post(url).bearer_auth(&token).header("x-request-id", id).json(&body).send()
    };

    // A whole stream; one its client leaves; a failure answered by the local model.
    let done = ask("req-done", true).await.unwrap().text().await.unwrap();
    assert!(done.ends_with("data: [DONE]\n\n"), "{done}");
    let mut left = ask("req-left", true).await.unwrap();
    left.chunk().await.unwrap().expect("a first chunk");
    drop(left);
    tokio::time::timeout(Duration::from_secs(30), upstream.client_gone.notified())
        .await
        .expect("edgechat let go of the upstream when its client left");
    let fallback = ask("req-fallback", false).await.unwrap();
    assert_eq!(fallback.headers()["x-edgechat-provider"], "local");
    // The breaker's probe closes it again; then a stream the shutdown cuts.
    assert_eq!(ask("req-probe", false).await.unwrap().headers()["x-edgechat-provider"], "openai");
    register_and_login(&server.base, "bob").await;
    let (ok, _, err) = user_cmd(&dir, &["disable", "bob"], "");
    assert!(ok, "{err}");
    let (ok, _, _) = user_cmd(&dir, &["disable", "nobody"], "");
    assert!(!ok);
    // A revoked key: said once, however many requests it refuses.
    for id in ["req-401a", "req-401b"] {
        assert_eq!(ask(id, false).await.unwrap().headers()["x-edgechat-provider"], "local");
    }
    let mut cut = ask("req-cut", true).await.unwrap();
    cut.chunk().await.unwrap().expect("a first chunk");
    server.signal(libc::SIGTERM);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let access = |id: &str| {
        let mut found =
            lines.iter().filter(|l| l["target"] == "edgechat::access" && l["request_id"] == id);
        let line = found.next().unwrap_or_else(|| panic!("no access line for {id}:\n{text}"));
        assert!(found.next().is_none(), "one access line for {id}");
        line.clone()
    };
    let during = |id: &str, message: &str| {
        lines.iter().any(|l| {
            l["span"]["request_id"] == id
                && l["message"].as_str().unwrap_or("").starts_with(message)
        })
    };

    let line = access("req-done");
    assert_eq!(line["outcome"], "completed", "{line}");
    let (duration, ttft) =
        (line["duration_ms"].as_f64().unwrap(), line["ttft_ms"].as_f64().unwrap());
    assert!(duration >= 200.0 && ttft < duration - 150.0, "three deltas 100 ms apart: {line}");
    assert_eq!(
        (line["model"].as_str(), line["provider"].as_str()),
        (Some("gpt-4o-mini"), Some("openai"))
    );
    assert_eq!(line["user"].as_str().map(str::len), Some(32), "{line}");
    assert!(line["prompt_tokens"].is_u64() && line["completion_tokens"].is_u64(), "{line}");
    assert_eq!(access("req-left")["outcome"], "client_left");
    assert_eq!(access("req-cut")["outcome"], "shutdown", "{text}");

    let line = access("req-fallback");
    assert_eq!(
        (line["provider"].as_str(), line["status"].as_u64()),
        (Some("local"), Some(200)),
        "{line}"
    );
    assert!(line["fallback"].is_string() && line.get("outcome").is_none(), "{line}");
    for message in ["retrying", "circuit breaker opened", "falling back"] {
        assert!(during("req-fallback", message), "`{message}` without the request id:\n{text}");
    }
    assert!(during("req-probe", "circuit breaker closed"), "{text}");
    let refused = lines
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").contains("refuses our API key"));
    assert_eq!(refused.count(), 1, "{text}");
    assert!(during("req-cut", "the provider accepts our API key again"), "{text}");

    let control = |op: &str, outcome: &str| {
        lines
            .iter()
            .any(|l| l["message"] == "control command" && l["op"] == op && l["outcome"] == outcome)
    };
    assert!(control("disable_user", "ok") && control("disable_user", "failed"), "{text}");
    assert!(lines.iter().any(|l| l["message"] == "listening" && l["url"] == server_url(&text)));
}

/// The URL the listening line gives.
fn server_url(log: &str) -> String {
    let line = log.lines().find(|l| l.contains("\"listening\"")).expect("a listening line");
    serde_json::from_str::<Value>(line).unwrap()["url"].as_str().unwrap().to_owned()
}
