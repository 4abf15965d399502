//! Background chat through the real server: a job's answer equals `POST /chat`'s, retries with
//! a flaky upstream, cancellation, isolation, pagination and the admin view. The crash test
//! (SIGKILL of the real binary at several points) is in `jobs_crash.rs`.

mod common;
mod common_local;

use common::upstream::{answer, Act, Upstream};
use common::{user_cmd, with_default_model, TestServer};
use common_local::default_model;
use edgechat::clock::now_ms;
use edgechat::config::Config;
use edgechat::secret::Secret;
use edgechat::store::{Job, QueueLimits, Store};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// OpenAI at `up` with no retries of its own and no fallback: failures reach the job.
fn flaky_openai(c: &mut Config, up: &Upstream) {
    let p = &mut c.providers.openai;
    p.base_url = up.base.clone();
    p.api_key = Some(Secret::new("sk-test"));
    p.attempts = 1;
    p.breaker_failures = 100;
    c.routing.fallback = false;
    c.jobs.retry_base_ms = 10;
    c.jobs.retry_max_ms = 50;
}

async fn enqueue(s: &TestServer, token: &str, body: Value) -> String {
    let r = s.post("/chat/background", &body, Some(token)).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["status"], "queued");
    out["task_id"].as_str().unwrap().to_string()
}

/// Polls the task until it is in a finished state (bounded: 60 s).
async fn finished(s: &TestServer, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task: Value =
            s.get(&format!("/chat/tasks/{id}"), Some(token)).await.json().await.unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&task["status"].as_str().unwrap()) {
            return task;
        }
        assert!(Instant::now() < deadline, "task {id} never finished: {task}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_job_answers_what_post_chat_answers_and_stores_one_turn() {
    let model = default_model();
    let s = TestServer::start(|c| with_default_model(c, &model)).await;
    let token = s.user("alice").await;
    let body = json!({"message": "What is the capital of France?", "system": "You are a helpful assistant.", "max_tokens": 8, "temperature": 0});
    let id = enqueue(&s, &token, body.clone()).await;
    let task = finished(&s, &token, &id).await;
    assert_eq!(
        (task["status"].as_str(), task["attempts"].as_u64()),
        (Some("succeeded"), Some(1)),
        "{task}"
    );
    assert!(
        task["started_at"].is_string()
            && task["finished_at"].is_string()
            && task["error"].is_null()
    );
    let result = &task["result"];
    let direct: Value = s.post("/chat", &body, Some(&token)).await.json().await.unwrap();
    for key in ["response", "model", "provider", "fallback", "usage"] {
        assert_eq!(result[key], direct[key], "{key}: job {result} vs /chat {direct}");
    }
    let conv: Value = s
        .get(
            &format!("/conversations/{}", result["conversation_id"].as_str().unwrap()),
            Some(&token),
        )
        .await
        .json()
        .await
        .unwrap();
    let messages = conv["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "system, user, and exactly one answer");
    assert_eq!(messages[2]["id"], result["message_id"]);
}

#[tokio::test]
async fn failures_are_retried_then_succeed_or_end_failed() {
    let up = Upstream::start(vec![
        Act::Status(500, None),
        Act::Status(503, None),
        answer(vec!["third time"]),
    ])
    .await;
    let s = TestServer::start(|c| flaky_openai(c, &up)).await;
    let token = s.user("alice").await;
    let id = enqueue(&s, &token, json!({"message": "hi", "model": "gpt-4o-mini"})).await;
    let task = finished(&s, &token, &id).await;
    assert_eq!(
        (task["status"].as_str(), task["attempts"].as_u64()),
        (Some("succeeded"), Some(3)),
        "{task}"
    );
    assert_eq!(task["result"]["response"], "third time");
    let page: Value = s.get("/conversations", Some(&token)).await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "failed attempts stored nothing");

    let up = Upstream::start(vec![Act::Status(500, None)]).await;
    let s = TestServer::start(|c| flaky_openai(c, &up)).await;
    let token = s.user("alice").await;
    let id = enqueue(&s, &token, json!({"message": "hi", "model": "gpt-4o-mini"})).await;
    let task = finished(&s, &token, &id).await;
    assert_eq!(
        (task["status"].as_str(), task["attempts"].as_u64()),
        (Some("failed"), Some(3)),
        "{task}"
    );
    assert!(task["error"].as_str().unwrap().contains("openai"), "{task}");
    assert!(task["result"].is_null());
    assert_eq!(up.hits(), 3);
}

#[tokio::test]
async fn queued_and_running_jobs_cancel_and_finished_ones_answer_409() {
    // One worker; the first job stalls upstream, so the second waits in the queue.
    let up = Upstream::start(vec![Act::StallBeforeHead, answer(vec!["freed"])]).await;
    let s = TestServer::start(|c| {
        flaky_openai(c, &up);
        c.providers.openai.first_byte_timeout_ms = 60_000;
        c.jobs.workers = 1;
    })
    .await;
    let token = s.user("alice").await;
    let body = json!({"message": "hi", "model": "gpt-4o-mini"});
    let running = enqueue(&s, &token, body.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.hits() == 0 {
        assert!(Instant::now() < deadline, "the first job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = enqueue(&s, &token, body.clone()).await;
    let r = s.delete(&format!("/chat/tasks/{queued}"), &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let task: Value = r.json().await.unwrap();
    assert_eq!((task["status"].as_str(), task["attempts"].as_u64()), (Some("cancelled"), Some(0)));

    let r = s.delete(&format!("/chat/tasks/{running}"), &token).await;
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    // The worker is free again at once: a new job runs and succeeds.
    let next = enqueue(&s, &token, body).await;
    let task = finished(&s, &token, &next).await;
    assert_eq!(
        (task["status"].as_str(), task["result"]["response"].as_str()),
        (Some("succeeded"), Some("freed"))
    );
    assert_eq!(
        finished(&s, &token, &running).await["status"],
        "cancelled",
        "a late result must not revive it"
    );

    let r = s.delete(&format!("/chat/tasks/{next}"), &token).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("finished"));
}

#[tokio::test]
async fn tasks_are_private_and_paginated_newest_first() {
    let up = Upstream::start(vec![answer(vec!["ok"])]).await;
    let s = TestServer::start(|c| flaky_openai(c, &up)).await;
    let (alice, bob) = (s.user("alice").await, s.user("bob").await);
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            enqueue(&s, &alice, json!({"message": format!("m{i}"), "model": "gpt-4o-mini"})).await,
        );
    }
    for id in &ids {
        assert_eq!(
            s.get(&format!("/chat/tasks/{id}"), Some(&bob)).await.status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            s.delete(&format!("/chat/tasks/{id}"), &bob).await.status(),
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(s.get("/chat/tasks/not-a-uuid", Some(&alice)).await.status(), StatusCode::NOT_FOUND);
    let page: Value = s.get("/chat/tasks?limit=2", Some(&alice)).await.json().await.unwrap();
    let first: Vec<&str> =
        page["items"].as_array().unwrap().iter().map(|t| t["task_id"].as_str().unwrap()).collect();
    assert_eq!(first, [ids[2].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let page: Value = s
        .get(&format!("/chat/tasks?limit=2&cursor={cursor}"), Some(&alice))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"][0]["task_id"], ids[0].as_str());
    assert!(page["next_cursor"].is_null());
    let empty: Value = s.get("/chat/tasks", Some(&bob)).await.json().await.unwrap();
    assert_eq!(empty["items"], json!([]));
    assert_eq!(
        s.get("/chat/tasks?limit=0", Some(&alice)).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // A conversation that is not yours cannot be continued in the background either.
    let other = json!({"message": "x", "conversation_id": "0190f6f4-0000-7000-8000-000000000000"});
    assert_eq!(
        s.post("/chat/background", &other, Some(&alice)).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn per_user_queue_limits_refuse_clearly() {
    let up = Upstream::start(vec![Act::StallBeforeHead]).await;
    let s = TestServer::start(|c| {
        flaky_openai(c, &up);
        c.providers.openai.first_byte_timeout_ms = 60_000;
        c.jobs.workers = 1;
        c.jobs.max_queued_per_user = 2;
    })
    .await;
    let token = s.user("alice").await;
    let body = json!({"message": "hi", "model": "gpt-4o-mini"});
    enqueue(&s, &token, body.clone()).await;
    enqueue(&s, &token, body.clone()).await;
    let r = s.post("/chat/background", &body, Some(&token)).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("2 jobs"));
    let bob = s.user("bob").await;
    assert_eq!(s.post("/chat/background", &body, Some(&bob)).await.status(), StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_view_is_for_admins_and_counts_move() {
    let up = Upstream::start(vec![Act::Status(500, None)]).await;
    let s = TestServer::start(|c| {
        flaky_openai(c, &up);
        c.jobs.max_attempts = 1;
    })
    .await;
    let token = s.user("alice").await;
    assert_eq!(s.get("/admin/jobs", Some(&token)).await.status(), StatusCode::NOT_FOUND);
    let dir = s.dir.path().to_path_buf();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        user_cmd(
            &dir,
            &["create", "root", "--email", "root@example.com", "--admin"],
            "password-root\n",
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let admin = s.login("root").await["access_token"].as_str().unwrap().to_string();
    let before: Value = s.get("/admin/jobs", Some(&admin)).await.json().await.unwrap();
    assert_eq!(before["counts"]["failed"], 0);
    let id = enqueue(&s, &token, json!({"message": "hi", "model": "gpt-4o-mini"})).await;
    finished(&s, &token, &id).await;
    let after: Value = s.get("/admin/jobs", Some(&admin)).await.json().await.unwrap();
    assert_eq!(after["counts"]["failed"], 1, "{after}");
    assert_eq!(after["failure_rate"], 1.0);
    assert_eq!(after["recent_failures"][0]["task_id"], id.as_str());
    let page = s
        .client
        .get(s.url("/admin/jobs"))
        .bearer_auth(&admin)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.headers().contains_key("content-security-policy"));
    let html = page.text().await.unwrap();
    assert!(html.contains("Recent failures") && html.contains(&id), "{html}");
}

#[tokio::test]
async fn jobs_queued_by_an_older_build_are_upgraded_and_run() {
    let up = Upstream::start(vec![answer(vec!["from the old queue"])]).await;
    let s = TestServer::start(|c| flaky_openai(c, &up)).await;
    let token = s.user("alice").await;
    let me: Value = s.get("/auth/me", Some(&token)).await.json().await.unwrap();
    let user = uuid::Uuid::parse_str(me["id"].as_str().unwrap()).unwrap();
    let dir = s.stop_keeping_data().await;

    // What builds before the versioned record queued: the `/chat` body itself.
    let v0 = json!({"message": "hi", "model": "gpt-4o-mini", "max_tokens": 5, "temperature": null,
        "conversation_id": null, "system": "be brief", "stream": false});
    let store = Store::open(dir.path()).unwrap();
    let limits = QueueLimits { per_user: 10, total: 10 };
    // Not the grouped enqueue: its commit thread may hold the file a moment after answering.
    let queued = store.enqueue_jobs(vec![Job::new(user, v0, now_ms())], limits).await.unwrap();
    let job = queued.into_iter().next().unwrap().unwrap();
    drop(store);

    let s = TestServer::start_in(dir, |c| flaky_openai(c, &up), edgechat::api::routes()).await;
    let token = s.login("alice").await["access_token"].as_str().unwrap().to_string();
    let task = finished(&s, &token, &job.id.to_string()).await;
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(task["result"]["response"], "from the old queue");
    let sent = &up.requests()[0];
    assert_eq!(
        (&sent["messages"], &sent["max_tokens"]),
        (
            &json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]),
            &json!(5)
        )
    );
    let dir = s.stop_keeping_data().await;
    let stored = Store::open(dir.path()).unwrap().job(user, job.id).await.unwrap().unwrap();
    assert_eq!(stored.request["version"], 1, "upgraded in place: {}", stored.request);
}
