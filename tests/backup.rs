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

    // Into a new data directory, the sessions' signing secret does not follow by itself.
    let (_fresh_guard, fresh) = common::data_dir();
    let out = run(&fresh, &["restore", copy.to_str().unwrap()]);
    assert!(out.status.success() && text(&out).contains("has no jwt_secret"), "{}", text(&out));
    std::fs::write(fresh.join("jwt_secret"), "a copied secret of at least thirty-two bytes")
        .unwrap();
    let again = run(&fresh, &["restore", copy.to_str().unwrap()]);
    assert!(again.status.success() && !text(&again).contains("jwt_secret"), "{}", text(&again));
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
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
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

/// The systemd layout on one box: the server runs as its own user (here `nobody`, as
/// `DynamicUser=` would), the operator as root. A backup goes where only root may write (the
/// server streams it to the CLI); a restore leaves the file owned by the service's user; a
/// database the service's user cannot open is refused naming the file, its owner and the
/// user edgechat runs as.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_operator_backs_up_and_restores_for_the_service_user() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test plays root and another user: run it as root (CI does)"
    );
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let (_guard, dir) = common::data_dir();
    chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let as_nobody = || {
        let mut cmd = common::emulated(
            &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
            &dir,
        );
        cmd.env("EDGECHAT_LOCAL__ENABLED", "false");
        cmd
    };
    let server = Binary::start(as_nobody(), &dir, &[], std::process::Stdio::null());
    register_and_login(&server.base, "kept").await;
    let vault = tempfile::tempdir().unwrap(); // root's, mode 0700: nobody cannot write here
    std::fs::set_permissions(vault.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let copy = vault.path().join("edgechat.redb");
    let out = run(&dir, &["backup", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::metadata(&copy).unwrap().uid(), 0, "written by the caller");
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("backup")),
        "no copy left behind"
    );
    assert!(server.signal(libc::SIGTERM).success());

    let live = dir.join(FILE_NAME);
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(&dir, &["restore", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let restored = std::fs::metadata(&live).unwrap();
    assert_eq!((restored.uid(), restored.gid(), restored.mode() & 0o777), (NOBODY, NOBODY, 0o640));
    let server = Binary::start(as_nobody(), &dir, &[], std::process::Stdio::null());
    assert!(
        login(&server.base, "kept").await.is_some(),
        "the service's user opens the restored file"
    );
    assert!(server.signal(libc::SIGTERM).success());

    chown(&live, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = text(&out);
    for words in [live.to_str().unwrap(), "permission denied", "uid 0 (root)", "runs as uid 65534"]
    {
        assert!(said.contains(words), "`{words}` missing from: {said}");
    }
}

const NOBODY: u32 = 65534;
