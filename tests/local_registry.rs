//! Several local models: each loaded on its first request, at most `max_loaded_models` and
//! within `max_memory_mb` at once, the least recently used idle one unloaded to make room; a
//! busy model is never unloaded; and, over HTTP, one busy model does not hold up another.

mod common;
mod common_local;

use common::TestServer;
use common_local::{default_model, write_tiny_model, Tiny};
use edgechat::config::{LocalModelConfig, ProviderName, RouteRule};
use edgechat::local::{
    EngineOptions, GenerateRequest, LoadLimits, LocalError, Message, ModelSpec, Registry, Role,
};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Tiny models `a`, `b`, `c` (different weights) in `dir`.
fn tiny_models(dir: &Path) -> Vec<PathBuf> {
    (0..3)
        .map(|seed| {
            let path = dir.join(format!("tiny-{seed}.gguf"));
            write_tiny_model(&path, &Tiny { seed, ..Tiny::default() });
            path
        })
        .collect()
}

fn registry(paths: &[PathBuf], max_loaded: usize, max_bytes: Option<u64>) -> Registry {
    let specs = paths.iter().zip(["a", "b", "c"]).map(|(path, name)| ModelSpec {
        name: name.into(),
        path: path.clone(),
        options: EngineOptions { threads: Some(2), ..EngineOptions::default() },
    });
    Registry::new(specs.collect(), Some(0), LoadLimits { max_loaded, max_bytes })
}

fn loaded(r: &Registry) -> Vec<String> {
    r.loaded().into_iter().map(|l| l.name).collect()
}

fn ask(text: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message::new(Role::User, text)],
        max_tokens,
        ..GenerateRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_on_first_use_once_and_unloads_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(&tiny_models(dir.path()), 2, None);
    assert_eq!(r.names().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert!(loaded(&r).is_empty(), "nothing loads before it is asked for");
    let (first, second) = tokio::join!(r.engine("A"), r.engine("a"));
    assert!(first.unwrap() == second.unwrap(), "two first requests share one load");
    assert_eq!(r.engine("local").await.unwrap(), r.engine("a").await.unwrap());
    r.engine("b").await.unwrap();
    r.engine("a").await.unwrap(); // now b is the least recently used
    r.engine("c").await.unwrap();
    assert_eq!(loaded(&r), ["a", "c"]);
    let err = r.engine("d").await.unwrap_err();
    assert!(matches!(err, LocalError::UnknownModel(ref m) if m == "d"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_unloads_idle_models_and_refuses_one_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let paths = tiny_models(dir.path());
    let file = std::fs::metadata(&paths[0]).unwrap().len();
    let r = registry(&paths, 3, Some(file * 3 / 2));
    let a = r.engine("a").await.unwrap();
    a.generate(ask("hello", 4)).unwrap().collect_text().await.unwrap();
    let held = r.loaded()[0].memory_bytes;
    assert!(held > file, "the prompt cache counts: {held} bytes for a {file}-byte file");
    // A handle held (as a request holds one until its answer ends) keeps `a` in use.
    assert!(matches!(r.engine("b").await, Err(LocalError::NoRoom(_))));
    drop(a);
    r.engine("b").await.unwrap();
    assert_eq!(loaded(&r), ["b"], "a went to make room for b");

    let small = registry(&paths, 3, Some(file / 2));
    let err = small.engine("a").await.unwrap_err().to_string();
    assert!(err.contains("more than local.max_memory_mb"), "{err}");
    assert!(loaded(&small).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_use_is_not_unloaded_and_the_request_that_finds_no_room_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(&tiny_models(dir.path()), 1, None);
    // The stream holds the model until it is consumed, as an HTTP answer does until its end.
    let answer = r.engine("a").await.unwrap().generate(ask("hello", 8)).unwrap();
    let err = r.engine("b").await.unwrap_err();
    assert!(matches!(err, LocalError::NoRoom(_)), "{err}");
    assert!(err.to_string().contains("local.max_loaded_models"), "{err}");
    assert_eq!(loaded(&r), ["a"]);
    answer.collect_text().await.unwrap();
    r.engine("b").await.unwrap();
    assert_eq!(loaded(&r), ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_while_its_model_loads_gives_the_room_back() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(&tiny_models(dir.path()), 1, None);
    // Polled once: the load starts on a blocking thread, then the request goes away.
    let mut load = Box::pin(r.engine("a"));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(std::future::Future::poll(load.as_mut(), &mut cx).is_pending());
    drop(load);
    r.engine("b").await.expect("a's reserved room was given back");
    assert_eq!(loaded(&r), ["b"]);
}

/// A server with the default model as `smollm2` (the fallback) and two tiny models.
async fn server(dir: &Path, tweak: impl FnOnce(&mut edgechat::config::Config)) -> TestServer {
    let paths = tiny_models(dir);
    TestServer::start(|c| {
        common::with_default_model(c, &default_model());
        c.local.models = vec![entry("tiny-b", &paths[1]), entry("tiny-c", &paths[2])];
        tweak(c);
    })
    .await
}

fn entry(name: &str, file: &Path) -> LocalModelConfig {
    LocalModelConfig::new(file, name)
}

async fn chat(s: &TestServer, token: &str, body: Value) -> reqwest::Response {
    s.post("/v1/chat/completions", &body, Some(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_local_model_is_listed_routed_by_name_or_rule_and_loaded_on_first_use() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| {
        c.local.max_loaded_models = 2;
        let rule = RouteRule {
            local_model: "tiny-c".into(),
            ..RouteRule::new("fast-*", ProviderName::LOCAL)
        };
        c.routing.rules.insert(0, rule);
        c.local.models.push(entry("gone", Path::new("models/not-fetched-yet.gguf")));
    })
    .await;
    let token = s.user("ann").await;
    let models: Value = s.get("/v1/models", Some(&token)).await.json().await.unwrap();
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smollm2", "tiny-b", "tiny-c"], "gone has no file yet");
    let metric =
        |m: &str, name: &str| format!("edgechat_local_model_loaded{{model=\"{name}\"}} {m}");
    let text = s.get("/metrics", None).await.text().await.unwrap();
    assert!(
        text.contains(&metric("1", "smollm2")) && text.contains(&metric("0", "tiny-b")),
        "{text}"
    );

    let hi = json!([{ "role": "user", "content": "hi" }]);
    for (asked, answered) in [("TINY-B", "tiny-b"), ("fast-chat", "tiny-c")] {
        let answer =
            chat(&s, &token, json!({ "model": asked, "messages": hi, "max_tokens": 3 })).await;
        assert_eq!(answer.status(), 200, "{asked}");
        let answer: Value = answer.json().await.unwrap();
        assert_eq!(answer["model"], answered, "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    }
    let text = s.get("/metrics", None).await.text().await.unwrap();
    // Two at most: smollm2, least recently used, went to make room for tiny-c.
    for (flag, name) in [("0", "smollm2"), ("1", "tiny-b"), ("1", "tiny-c")] {
        assert!(text.contains(&metric(flag, name)), "{name}: {text}");
    }
    let answer = chat(&s, &token, json!({ "model": "gone", "messages": hi })).await;
    assert_eq!(answer.status(), 503);
    let error = answer.json::<Value>().await.unwrap()["error"]["message"].to_string();
    assert!(error.contains("models/not-fetched-yet.gguf"), "{error}");
    // The fallback model comes back on its next request.
    let answer =
        chat(&s, &token, json!({ "model": "local", "messages": hi, "max_tokens": 2 })).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["model"], "smollm2");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_model_answers_while_the_first_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| c.local.max_batch = 1).await;
    let token = s.user("ann").await;
    let long = json!({
        "model": "smollm2", "stream": true, "max_tokens": 300, "temperature": 0,
        "messages": [{ "role": "user", "content": "Count from 1 to 200, separated by commas." }],
    });
    let mut busy = chat(&s, &token, long).await.bytes_stream();
    busy.next().await.expect("the first model starts streaming").unwrap();
    let quick = json!({ "model": "tiny-b", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 8 });
    let answer = chat(&s, &token, quick).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<Value>().await.unwrap()["usage"]["completion_tokens"], 8);
    // The first model was still generating when the second had answered in full.
    let text = s.get("/metrics", None).await.text().await.unwrap();
    let busy_metric = "edgechat_local_queue{model=\"smollm2\",state=\"active\"} 1";
    assert!(text.contains(busy_metric), "{text}");
    let mut rest = String::new();
    while let Some(chunk) = busy.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(rest.contains("[DONE]"), "{rest}");
    s.stop().await;
}
