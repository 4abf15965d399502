//! Nothing acknowledged is lost: 50 background jobs against the real binary and the default
//! model, with SIGKILL while jobs are being accepted, while they run, and while they complete
//! in numbers; after each kill the binary restarts on the same data directory. In the end every
//! job that got a `202` has succeeded, each with exactly one stored answer.

mod common;
mod common_local;

use common::{data_dir, register_and_login, Binary};
use common_local::default_model;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JOBS: usize = 50;

fn start(dir: &Path, model: &str) -> Binary {
    let env = [
        ("EDGECHAT_LOCAL__MODEL", model),
        ("EDGECHAT_LOCAL__NAME", "smollm2"),
        ("EDGECHAT_JOBS__WORKERS", "2"),
        (
            "EDGECHAT_RATE_LIMIT__CHAT_PER_USER__REQUESTS",
            "{ requests = 100000, per_secs = 1, burst = 100000 }",
        ),
    ];
    Binary::spawn(dir, &[], &env)
}

struct Client {
    http: reqwest::Client,
    token: String,
}

impl Client {
    async fn enqueue(&self, base: &str, i: usize) -> Option<String> {
        let body =
            json!({"message": format!("Say hi to number {i}."), "max_tokens": 4, "temperature": 0});
        let r = self
            .http
            .post(format!("{base}/chat/background"))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .ok()?;
        if r.status() != 202 {
            return None;
        }
        Some(r.json::<Value>().await.ok()?["task_id"].as_str()?.to_string())
    }

    async fn tasks(&self, base: &str) -> Vec<Value> {
        let r = self
            .http
            .get(format!("{base}/chat/tasks?limit=100"))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        r.json::<Value>().await.unwrap()["items"].as_array().unwrap().clone()
    }

    /// Waits (bounded) until at least `n` tasks have succeeded, all of `ids` among them.
    async fn until_succeeded(
        &self,
        base: &str,
        n: usize,
        ids: &[String],
        limit: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let tasks = self.tasks(base).await;
            let done: Vec<&str> = tasks
                .iter()
                .filter(|t| t["status"] == "succeeded")
                .filter_map(|t| t["task_id"].as_str())
                .collect();
            if done.len() >= n && ids.iter().all(|id| done.contains(&id.as_str())) {
                return tasks;
            }
            assert!(Instant::now() < deadline, "fewer than {n} tasks succeeded in {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_accepted_job_survives_sigkill_and_is_answered_once() {
    let model = default_model().to_string_lossy().into_owned();
    let (_keep, dir) = data_dir();
    let server = start(&dir, &model);
    let login = register_and_login(&server.base, "crash").await;
    let token = login["access_token"].as_str().unwrap().to_string();
    let client = Arc::new(Client { http: common::client(), token });

    // 1. Killed while jobs are being accepted: only what got a 202 counts as accepted.
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let sends = (0..JOBS).map(|i| {
        let (client, accepted, base) = (client.clone(), accepted.clone(), server.base.clone());
        tokio::spawn(async move {
            if let Some(id) = client.enqueue(&base, i).await {
                accepted.lock().unwrap().push(id);
            }
        })
    });
    let sends: Vec<_> = sends.collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < 10 {
        assert!(Instant::now() < deadline, "no enqueue was accepted");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.signal(libc::SIGKILL);
    join_all(sends).await;
    let mut accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 10);

    // The rest, on a restarted server.
    let server = start(&dir, &model);
    let mut i = JOBS;
    while accepted.len() < JOBS {
        accepted.extend(client.enqueue(&server.base, i).await);
        i += 1;
    }

    // 2. Killed while jobs run, then 3. while many complete.
    client.until_succeeded(&server.base, 3, &[], Duration::from_secs(60)).await;
    server.signal(libc::SIGKILL);
    let server = start(&dir, &model);
    client.until_succeeded(&server.base, JOBS / 2, &[], Duration::from_secs(120)).await;
    server.signal(libc::SIGKILL);

    let server = start(&dir, &model);
    let tasks = client.until_succeeded(&server.base, 0, &accepted, Duration::from_secs(180)).await;
    // A job committed just before the kill may never have had its 202 delivered: it runs too.
    // Wait for those as well, then check every job, acknowledged or not.
    let all: Vec<String> =
        tasks.iter().map(|t| t["task_id"].as_str().unwrap().to_string()).collect();
    let tasks = client.until_succeeded(&server.base, 0, &all, Duration::from_secs(60)).await;
    assert!(
        tasks.len() >= accepted.len() && tasks.len() < accepted.len() + JOBS,
        "{} tasks",
        tasks.len()
    );
    let mut conversations = Vec::new();
    for task in &tasks {
        assert_eq!(task["status"], "succeeded", "{task}");
        let conv = task["result"]["conversation_id"].as_str().unwrap().to_string();
        let url = format!("{}/conversations/{conv}", server.base);
        let detail: Value = client
            .http
            .get(url)
            .bearer_auth(&client.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(detail["messages"].as_array().unwrap().len(), 2, "exactly one answer: {detail}");
        assert_eq!(detail["messages"][1]["id"], task["result"]["message_id"]);
        conversations.push(conv);
    }
    conversations.sort();
    conversations.dedup();
    assert_eq!(conversations.len(), tasks.len());
    let url = format!("{}/conversations?limit=100", server.base);
    let page: Value =
        client.http.get(url).bearer_auth(&client.token).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        tasks.len(),
        "no job stored a second answer"
    );
}
