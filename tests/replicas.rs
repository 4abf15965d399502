//! Three replicas of the real binary on one PostgreSQL database (`storage.url`), each with its
//! own data directory and the same JWT secret, as behind a load balancer: an account made on
//! one works on the others, a conversation continues anywhere, an account disabled on one is
//! refused by the next, failed logins spread over the three meet one limit, and background
//! jobs survive a replica's SIGKILL: every accepted job ends succeeded with one stored answer.

mod common;
mod common_local;

use common::{client, data_dir, Binary};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const JOBS: usize = 60;

struct Replica {
    binary: Binary,
    _dir: tempfile::TempDir,
}

/// Starts a replica on `url` with the default model and short job leases (a killed replica's
/// jobs come back within seconds).
fn replica(url: &str, model: &str) -> Replica {
    let (guard, dir) = data_dir();
    let env = [
        ("EDGECHAT_STORAGE__URL", url),
        ("EDGECHAT_LOCAL__MODEL", model),
        ("EDGECHAT_LOCAL__NAME", "smollm2"),
        ("EDGECHAT_JOBS__WORKERS", "2"),
        ("EDGECHAT_JOBS__LEASE_SECS", "3"),
        (
            "EDGECHAT_RATE_LIMIT__CHAT_PER_USER__REQUESTS",
            "{ requests = 1000, per_secs = 1, burst = 1000 }",
        ),
        (
            "EDGECHAT_RATE_LIMIT__FAILED_LOGINS_PER_ADDRESS_AND_USERNAME",
            "{ requests = 1, per_secs = 3600, burst = 3 }",
        ),
    ];
    Replica { binary: Binary::spawn(&dir, &[], &env), _dir: guard }
}

async fn call(
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = client().request(method, url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(base: &str, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    call(reqwest::Method::POST, format!("{base}{path}"), token, Some(body)).await
}

async fn get(base: &str, path: &str, token: &str) -> (u16, Value) {
    call(reqwest::Method::GET, format!("{base}{path}"), Some(token), None).await
}

fn login_body(name: &str, password: &str) -> Value {
    json!({"username": name, "password": password})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_accounts_conversations_limits_and_jobs() {
    let url = common::postgres::database();
    let model: PathBuf = common_local::default_model();
    let model = model.to_str().unwrap();
    let mut replicas: Vec<Replica> = (0..3).map(|_| replica(&url, model)).collect();
    let base: Vec<String> = replicas.iter().map(|r| r.binary.base.clone()).collect();
    let (a, b, c) = (&base[0], &base[1], &base[2]);

    // Register on A, log in on B, start a conversation on B and continue it on C.
    let reg = json!({"username": "ann", "email": "ann@example.com", "password": "password-123"});
    assert_eq!(post(a, "/auth/register", None, reg).await.0, 200);
    let (status, tokens) = post(b, "/auth/login", None, login_body("ann", "password-123")).await;
    assert_eq!(status, 200, "{tokens}");
    let ann = tokens["access_token"].as_str().unwrap().to_string();
    let ask = |conv: Option<&str>| json!({"message": "Say hi.", "max_tokens": 4, "temperature": 0, "conversation_id": conv});
    let (status, first) = post(b, "/chat", Some(&ann), ask(None)).await;
    assert_eq!(status, 200, "{first}");
    let conv = first["conversation_id"].as_str().unwrap().to_string();
    let (status, second) = post(c, "/chat", Some(&ann), ask(Some(&conv))).await;
    assert_eq!(
        (status, second["conversation_id"].as_str()),
        (200, Some(conv.as_str())),
        "{second}"
    );
    let (_, history) = get(a, &format!("/conversations/{conv}"), &ann).await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(4), "{history}");
    // A refresh token issued by B rotates on C; presenting it again on A is reuse.
    let refresh = json!({"refresh_token": tokens["refresh_token"]});
    assert_eq!(post(c, "/auth/refresh", None, refresh.clone()).await.0, 200);
    assert_eq!(post(a, "/auth/refresh", None, refresh).await.0, 401);

    // Failed logins spread over the replicas meet one limit (3 per address and name).
    for (i, base) in [a, b, c].iter().enumerate() {
        let (status, _) = post(base, "/auth/login", None, login_body("ann", "wrong-guess")).await;
        assert_eq!(status, 401, "guess {i} is checked");
    }
    for base in [a, b, c] {
        let (status, body) =
            post(base, "/auth/login", None, login_body("ann", "wrong-guess")).await;
        assert_eq!(status, 429, "the fourth guess, on any replica, is refused: {body}");
    }

    background_jobs_survive_a_replica_killed_mid_run(&mut replicas, &ann).await;

    // An account disabled through one replica is refused by another at its next request.
    let (ok, out, err) = admin_create(&url, "root");
    assert!(ok, "{out}{err}");
    let base: Vec<String> = replicas.iter().map(|r| r.binary.base.clone()).collect();
    let (_, root) = post(&base[0], "/auth/login", None, login_body("root", "password-root")).await;
    let root = root["access_token"].as_str().unwrap().to_string();
    let (_, me) = get(&base[1], "/auth/me", &ann).await;
    let id = me["id"].as_str().unwrap().to_string();
    let patch = Some(json!({"disabled": true}));
    let url0 = format!("{}/admin/users/{id}", base[0]);
    let (status, body) = call(reqwest::Method::PATCH, url0, Some(&root), patch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&base[1], "/auth/me", &ann).await.0, 401);

    // The database restarts under the replicas: meanwhile requests fail cleanly (503, the
    // replicas stay up); afterwards they answer again, without a restart of edgechat.
    let server = common::postgres::server();
    server.stop();
    for base in &base {
        let (status, body) = get(base, "/auth/me", &root).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["detail"].as_str().unwrap().contains("reconnects by itself"), "{body}");
    }
    server.start_again();
    for base in &base {
        assert_eq!(answered_again(base, &root).await, 200, "{base} recovered");
    }
    let (_, me) = get(&base[0], "/auth/me", &root).await;
    assert_eq!(me["username"], "root", "nothing acknowledged was lost: {me}");
}

/// `GET /auth/me` until it answers other than 503 (a pooled connection the restart closed is
/// replaced on its next use); bounded to 20 s.
async fn answered_again(base: &str, token: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = get(base, "/auth/me", token).await;
        if status != 503 || Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Enqueues `JOBS` jobs round-robin, SIGKILLs one replica once some have finished (it holds
/// claimed jobs then), and waits (bounded) for all of them: the other two rescue its jobs when
/// their leases expire; each job succeeded, each with one stored conversation.
async fn background_jobs_survive_a_replica_killed_mid_run(
    replicas: &mut Vec<Replica>,
    token: &str,
) {
    let bases: Vec<String> = replicas.iter().map(|r| r.binary.base.clone()).collect();
    let before = count_conversations(&bases[0], token).await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let body = json!({"message": format!("Say hi to {i}."), "max_tokens": 4, "temperature": 0});
        let (status, job) = post(&bases[i % 3], "/chat/background", Some(token), body).await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["task_id"].as_str().unwrap().to_string());
    }
    // Kill the third replica once some jobs have finished somewhere: the rest of its claimed
    // jobs are rescued by the others when their leases expire.
    wait_for(&bases[0], token, &ids, 5).await;
    replicas.pop().expect("three replicas").binary.signal(libc::SIGKILL);
    let done = wait_for(&bases[0], token, &ids, JOBS).await;
    assert_eq!(done, JOBS, "every accepted job succeeded");
    for id in &ids {
        let (_, task) = get(&bases[1], &format!("/chat/tasks/{id}"), token).await;
        assert_eq!(task["status"], "succeeded", "{task}");
    }
    let after = count_conversations(&bases[0], token).await;
    assert_eq!(after - before, JOBS, "one stored answer per job, none twice");
}

/// Waits until `n` of `ids` have succeeded (bounded: 5 minutes); returns how many did.
async fn wait_for(base: &str, token: &str, ids: &[String], n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut done = 0;
        for id in ids {
            let (_, task) = get(base, &format!("/chat/tasks/{id}"), token).await;
            done += (task["status"] == "succeeded") as usize;
        }
        if done >= n || Instant::now() > deadline {
            return done;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The user's conversations, counted through every page.
async fn count_conversations(base: &str, token: &str) -> usize {
    let (mut n, mut cursor) = (0, None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/conversations?limit=100&cursor={c}"),
            None => "/conversations?limit=100".to_string(),
        };
        let (_, page) = get(base, &path, token).await;
        n += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return n,
        }
    }
}

/// `edgechat user create NAME --admin` against the database, from no replica at all.
fn admin_create(url: &str, name: &str) -> (bool, String, String) {
    use std::io::Write;
    let (_guard, dir) = data_dir();
    let mut child = common::command(&dir)
        .args(["user", "create", name, "--admin", "--email", &format!("{name}@example.com")])
        .env("EDGECHAT_STORAGE__URL", url)
        .env("EDGECHAT_AUTH__JWT_SECRET", common::JWT_SECRET)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("password-{name}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
