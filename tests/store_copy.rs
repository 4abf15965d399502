//! `edgechat store copy`: a single box's redb file moves into an empty PostgreSQL database,
//! every table, and a replica started on the database carries on where the box stopped —
//! passwords, API keys, sessions, conversations and jobs. A second copy into the same
//! database, and a copy of a file a running server holds, are refused.

mod common;

use common::{Binary, TestServer};
use edgechat::store::{Job, NewMessage, QueueLimits, Role, TurnTarget};
use serde_json::{json, Value};
use std::path::Path;

/// Runs `edgechat store copy --from FILE` with the URL in the environment.
fn copy(from: &Path, url: &str) -> (bool, String, String) {
    let out = common::command(from.parent().unwrap())
        .args(["store", "copy", "--from"])
        .arg(from)
        .env("EDGECHAT_STORAGE__URL", url)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn said(text: &str) -> NewMessage {
    NewMessage {
        role: Role::User,
        content: text.into(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        model: Some("m".into()),
        provider: None,
        usage: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_box_moves_to_postgres_and_carries_on() {
    // The single box: two users, a key, sessions (one logged out), a conversation, a job.
    let s = TestServer::start(|_| {}).await;
    s.register("ann").await;
    let ann = s.login("ann").await;
    let token = ann["access_token"].as_str().unwrap().to_string();
    let r = s.post("/auth/api-keys", &json!({"name": "laptop"}), Some(&token)).await;
    let key: Value = r.json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    s.register("bob").await;
    let bob = s.login("bob").await;
    let gone = s.login("bob").await;
    s.post("/auth/logout", &json!({"refresh_token": gone["refresh_token"]}), None).await;
    let store = s.running().store().clone();
    let me: Value = s.get("/auth/me", Some(&token)).await.json().await.unwrap();
    let ann_id = me["id"].as_str().unwrap().parse().unwrap();
    let target = TurnTarget::New { title: "moving".into(), model: "m".into() };
    let turn = vec![said("one"), said("two")];
    let conv = store.record_turn(ann_id, target, turn, 1).await.unwrap().0.id;
    let limits = QueueLimits { per_user: 10, total: 10 };
    store.enqueue_job(Job::new(ann_id, json!({"v": 1}), 1), limits).await.unwrap().unwrap();

    // A file the running server holds is refused, saying what to do.
    let file = s.dir.path().join(edgechat::store::FILE_NAME);
    let url = common::postgres::database();
    let (ok, _, err) = copy(&file, &url);
    assert!(!ok && err.contains("stop it, or copy a backup"), "{err}");
    let dir = s.stop_keeping_data().await;
    drop(store);

    let (ok, out, err) = copy(&file, &url);
    assert!(ok, "{out}{err}");
    for (table, rows) in [
        ("users", 2),
        ("api_keys", 1),
        ("refresh_tokens", 3),
        ("conversations", 1),
        ("messages", 2),
        ("jobs", 1),
    ] {
        let line = out.lines().find(|l| l.starts_with(table)).unwrap_or_else(|| panic!("{out}"));
        assert!(line.ends_with(&format!(" {rows} rows")), "{table}: {line}");
    }
    assert!(out.contains("revoked_families") && out.contains("verified"), "{out}");
    let (ok, _, err) = copy(&file, &url);
    assert!(!ok && err.contains("already holds rows"), "a second copy is refused: {err}");

    // A replica on the database: the same password, key, session and conversation work.
    let (_guard, replica_dir) = common::data_dir();
    let replica = Binary::spawn(&replica_dir, &[], &[("EDGECHAT_STORAGE__URL", &url)]);
    let base = &replica.base;
    let body = json!({"username": "ann", "password": "password-ann"});
    let http = common::client();
    let r = http.post(format!("{base}/auth/login")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r =
        http.get(format!("{base}/conversations/{conv}")).bearer_auth(&key).send().await.unwrap();
    let history: Value = r.json().await.unwrap();
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2), "{history}");
    let r = http.get(format!("{base}/auth/me")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200, "an access token from the box still verifies (same secret)");
    let refresh = |t: &Value| json!({"refresh_token": t["refresh_token"]});
    let r = http.post(format!("{base}/auth/refresh")).json(&refresh(&bob)).send().await.unwrap();
    assert_eq!(r.status(), 200, "bob's session carries on");
    let r = http.post(format!("{base}/auth/refresh")).json(&refresh(&gone)).send().await.unwrap();
    assert_eq!(r.status(), 401, "a logged-out session stays dead");
    let r = http.get(format!("{base}/chat/tasks")).bearer_auth(&key).send().await.unwrap();
    let tasks: Value = r.json().await.unwrap();
    assert_eq!(tasks["items"].as_array().map(Vec::len), Some(1), "{tasks}");
    drop(dir);
}
