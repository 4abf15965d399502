//! Backups, restores and schema migrations through the real binary on real redb files:
//! `edgechat backup` while the server runs, `edgechat restore` once it is stopped, a file
//! written by schema version 1 (a committed fixture) migrated at start, a newer file refused.

mod common;

use common::{command, login, register_and_login, Binary};
use edgechat::store::{Store, FILE_NAME, SCHEMA_VERSION};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Output;

fn run(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).arg("--data-dir").arg(dir).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_while_serving_then_restore_once_stopped() {
    let (_guard, dir) = common::data_dir();
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("before.redb");
    let server = Binary::spawn(&dir, &[], &[]);
    register_and_login(&server.base, "kept").await;

    let out = run(&dir, &["backup", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("backed up to"), "{}", text(&out));
    let again = run(&dir, &["backup", copy.to_str().unwrap()]);
    assert!(!again.status.success() && text(&again).contains("already exists"), "{}", text(&again));

    register_and_login(&server.base, "later").await;
    let refused = run(&dir, &["restore", copy.to_str().unwrap()]);
    assert!(!refused.status.success(), "restore must refuse a running server");
    assert!(text(&refused).contains("in use"), "{}", text(&refused));
    assert!(server.signal(libc::SIGTERM).success());

    let out = run(&dir, &["restore", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("previous database is kept at"), "{}", text(&out));
    let server = Binary::spawn(&dir, &[], &[]);
    assert!(login(&server.base, "kept").await.is_some(), "the backed-up account is back");
    assert!(login(&server.base, "later").await.is_none(), "what came after the backup is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_1_file_is_migrated_at_start() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let facts: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("schema-v1.json")).unwrap())
            .unwrap();
    let (_guard, dir) = common::data_dir();
    let unzip = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(fixtures.join("schema-v1.redb.gz"))
        .output()
        .expect("gzip is missing");
    assert!(unzip.status.success());
    std::fs::write(dir.join(FILE_NAME), unzip.stdout).unwrap();

    {
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        // Schema 2 indexes refresh tokens by expiry: the fixture's one token must be in it.
        let far_future = i64::MAX / 2;
        assert_eq!(store.purge_expired_refresh_tokens(far_future, 100).await.unwrap(), 1);
    }

    let secret = facts["jwt_secret"].as_str().unwrap();
    let server = Binary::spawn(&dir, &[], &[("EDGECHAT_AUTH__JWT_SECRET", secret)]);
    let client = common::client();
    let body = json!({"username": facts["username"], "password": facts["password"]});
    let r = client.post(format!("{}/auth/login", server.base)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "the fixture's password still works");
    let key = facts["api_key"].as_str().unwrap();
    let get = |path: String| client.get(format!("{}{path}", server.base)).bearer_auth(key).send();
    let conv: Value = get(format!("/conversations/{}", facts["conversation_id"].as_str().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conv["messages"].as_array().map(Vec::len), Some(2), "{conv}");
    let task: Value = get(format!("/chat/tasks/{}", facts["task_id"].as_str().unwrap()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(task["status"], "succeeded", "{task}");
}

#[test]
fn a_file_from_a_newer_edgechat_is_refused_with_the_versions() {
    let (_guard, dir) = common::data_dir();
    drop(Store::open(&dir).unwrap());
    {
        let db = redb::Database::create(dir.join(FILE_NAME)).unwrap();
        let tx = db.begin_write().unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        tx.open_table(meta).unwrap().insert("schema_version", SCHEMA_VERSION + 1).unwrap();
        tx.commit().unwrap();
    }
    let out = command(&dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("EDGECHAT_AUTH__JWT_SECRET", common::JWT_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = text(&out);
    let want = format!(
        "schema version {}, newer than this edgechat supports ({SCHEMA_VERSION})",
        SCHEMA_VERSION + 1
    );
    assert!(said.contains(&want), "{said}");
}
