//! Who may sign up, and account administration: over HTTP (`/admin/users*`) and through the
//! real binary's `edgechat user …` while the server runs.

mod common;

use common::{client, command, data_dir, login, register_and_login, user_cmd, Binary, TestServer};
use edgechat::config::RegistrationMode;
use edgechat::store::{Job, NewMessage, QueueLimits, Role, TurnTarget};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use uuid::Uuid;

/// `edgechat user ARGS` (the real binary) against the server's data directory.
async fn cli(dir: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        user_cmd(&dir, &args, &stdin)
    })
    .await
    .unwrap()
}

/// Creates admin `name` through the CLI (password `password-<name>`) and logs in.
async fn admin(s: &TestServer, name: &str) -> String {
    let email = format!("{name}@example.com");
    let password = format!("password-{name}\n");
    let (ok, _, err) =
        cli(s.dir.path(), &["create", name, "--email", &email, "--admin"], &password).await;
    assert!(ok, "{err}");
    s.login(name).await["access_token"].as_str().unwrap().to_string()
}

async fn send(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = s.client.request(method, s.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn me(s: &TestServer, token: &str) -> Value {
    let r = s.get("/auth/me", Some(token)).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

use reqwest::Method as M;

#[tokio::test]
async fn closed_registration_refuses_sign_ups_while_admins_still_create_accounts() {
    let s = TestServer::start(|c| c.auth.registration = RegistrationMode::Closed).await;
    let body = json!({"username": "eve", "email": "eve@example.com", "password": "longenough"});
    for body in [body, json!({"username": "x"})] {
        let (status, b) = send(&s, M::POST, "/auth/register", None, Some(body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{b}");
        assert!(b["detail"].as_str().unwrap().contains("Registration is closed"), "{b}");
    }
    // `edgechat user create` still works, and so does an admin.
    let root = admin(&s, "root").await;
    let new = json!({"username": "bob", "email": "bob@example.com", "password": "password-bob"});
    let (status, b) = send(&s, M::POST, "/admin/users", Some(&root), Some(new.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_eq!((b["username"].as_str(), b["is_admin"].as_bool()), (Some("bob"), Some(false)));
    let bob = s.login("bob").await["access_token"].as_str().unwrap().to_string();
    let (status, _) = send(&s, M::POST, "/admin/users", Some(&root), Some(new)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let bad = json!({"username": "b c", "email": "nope", "password": "short"});
    let (status, b) = send(&s, M::POST, "/admin/users", Some(&root), Some(bad)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["detail"].as_array().unwrap().len(), 3, "{b}");
    let ann = json!({"username": "ann", "email": "ann@example.com", "password": "password-ann",
                     "is_admin": true});
    let (status, b) = send(&s, M::POST, "/admin/users", Some(&root), Some(ann)).await;
    assert_eq!((status, b["is_admin"].as_bool()), (StatusCode::CREATED, Some(true)));
    // A user who is not an admin cannot.
    let carl = json!({"username": "carl", "email": "carl@example.com", "password": "longenough"});
    let (status, _) = send(&s, M::POST, "/admin/users", Some(&bob), Some(carl)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn admin_user_routes_do_not_exist_for_anyone_else() {
    let s = TestServer::start(|_| {}).await;
    let bob = s.user("bob").await;
    let zero = Uuid::nil().to_string();
    let admin_routes: Vec<_> = edgechat::api::routes()
        .list()
        .into_iter()
        .filter(|(_, p)| p.starts_with("/admin/users"))
        .collect();
    assert_eq!(admin_routes.len(), 8, "{admin_routes:?}");
    for (method, path) in admin_routes {
        let path = path.replace("{id}", &zero).replace("{key_id}", &zero);
        let body = Some(json!({"password": "longenough", "is_admin": true}));
        let (status, b) = send(&s, method.clone(), &path, Some(&bob), body.clone()).await;
        assert_eq!((status, &b["detail"]), (StatusCode::NOT_FOUND, &json!("Not Found")), "{path}");
        let (status, _) = send(&s, method.clone(), &path, None, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn admins_reset_passwords_change_roles_and_manage_keys_within_the_rules() {
    let s = TestServer::start(|_| {}).await;
    let root = admin(&s, "root").await;
    s.register("bob").await;
    let session = s.login("bob").await;
    let bob_jwt = session["access_token"].as_str().unwrap().to_string();
    let (bob_id, root_id) =
        (me(&s, &bob_jwt).await["id"].clone(), me(&s, &root).await["id"].clone());
    let (bob_id, root_id) = (bob_id.as_str().unwrap(), root_id.as_str().unwrap());
    let r = s.post("/auth/api-keys", &json!({"name": "laptop"}), Some(&bob_jwt)).await;
    let key: Value = r.json().await.unwrap();

    let (status, users) = send(&s, M::GET, "/admin/users", Some(&root), None).await;
    assert_eq!(status, StatusCode::OK);
    let flags: Vec<(&str, bool)> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["username"].as_str().unwrap(), u["is_admin"].as_bool().unwrap()))
        .collect();
    assert_eq!(flags, [("root", true), ("bob", false)]);
    let (status, one) =
        send(&s, M::GET, &format!("/admin/users/{bob_id}"), Some(&root), None).await;
    assert_eq!((status, one["username"].as_str()), (StatusCode::OK, Some("bob")));

    // Bob's keys, seen and revoked by an admin.
    let keys_path = format!("/admin/users/{bob_id}/api-keys");
    let (status, keys) = send(&s, M::GET, &keys_path, Some(&root), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["name"], "laptop");
    assert!(keys[0].get("key").is_none(), "the key itself is never shown again");
    let key_id = key["id"].as_str().unwrap();
    let other_owner = format!("/admin/users/{root_id}/api-keys/{key_id}");
    let (status, _) = send(&s, M::DELETE, &other_owner, Some(&root), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a key is revoked under its own user only");
    assert_eq!(s.get("/auth/me", key["key"].as_str()).await.status(), StatusCode::OK);
    let (status, _) =
        send(&s, M::DELETE, &format!("{keys_path}/{key_id}"), Some(&root), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(s.get("/auth/me", key["key"].as_str()).await.status(), StatusCode::UNAUTHORIZED);
    let (status, _) =
        send(&s, M::DELETE, &format!("{keys_path}/{key_id}"), Some(&root), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A password reset: checked like any password, the old one stops, sessions end.
    let password_path = format!("/admin/users/{bob_id}/password");
    let short = Some(json!({"password": "short"}));
    let (status, b) = send(&s, M::PUT, &password_path, Some(&root), short).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["detail"][0]["loc"], json!(["body", "password"]));
    let new = Some(json!({"password": "a-new-password"}));
    let (status, _) = send(&s, M::PUT, &password_path, Some(&root), new).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let old = json!({"username": "bob", "password": "password-bob"});
    assert_eq!(s.post("/auth/login", &old, None).await.status(), StatusCode::UNAUTHORIZED);
    let new = json!({"username": "bob", "password": "a-new-password"});
    assert_eq!(s.post("/auth/login", &new, None).await.status(), StatusCode::OK);
    let refresh = json!({"refresh_token": session["refresh_token"]});
    assert_eq!(s.post("/auth/refresh", &refresh, None).await.status(), StatusCode::UNAUTHORIZED);

    // Roles: granted, then the self rules; another admin may demote root.
    let bob_path = format!("/admin/users/{bob_id}");
    let root_path = format!("/admin/users/{root_id}");
    let grant = Some(json!({"is_admin": true}));
    let (status, b) = send(&s, M::PATCH, &bob_path, Some(&root), grant.clone()).await;
    assert_eq!((status, b["is_admin"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(send(&s, M::GET, "/admin/users", Some(&bob_jwt), None).await.0, StatusCode::OK);
    for (method, body) in [
        (M::PATCH, Some(json!({"is_admin": false}))),
        (M::PATCH, Some(json!({"disabled": true}))),
        (M::PATCH, Some(json!({"is_admin": true, "disabled": true}))),
        (M::DELETE, None),
    ] {
        let (status, b) = send(&s, method.clone(), &root_path, Some(&root), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {b}");
        assert!(b["detail"].as_str().unwrap().contains("own account"), "{b}");
    }
    assert!(me(&s, &root).await["is_admin"].as_bool().unwrap(), "nothing half-applied");
    let demote = Some(json!({"is_admin": false}));
    let (status, _) = send(&s, M::PATCH, &root_path, Some(&bob_jwt), demote).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(send(&s, M::GET, "/admin/users", Some(&root), None).await.0, StatusCode::NOT_FOUND);
    let (status, _) = send(&s, M::PATCH, &root_path, Some(&bob_jwt), grant).await;
    assert_eq!(status, StatusCode::OK);
    // Disabling takes effect at once; enabling brings the account back.
    let (status, b) =
        send(&s, M::PATCH, &bob_path, Some(&root), Some(json!({"disabled": true}))).await;
    assert_eq!((status, b["disabled"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(s.get("/auth/me", Some(&bob_jwt)).await.status(), StatusCode::UNAUTHORIZED);
    let (status, _) =
        send(&s, M::PATCH, &bob_path, Some(&root), Some(json!({"disabled": false}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(s.get("/auth/me", Some(&bob_jwt)).await.status(), StatusCode::OK);

    // Unknown ids and bad bodies.
    let nobody = format!("/admin/users/{}", Uuid::now_v7());
    let (status, b) = send(&s, M::PATCH, &nobody, Some(&root), Some(json!({}))).await;
    assert_eq!((status, b["detail"].as_str()), (StatusCode::NOT_FOUND, Some("User not found")));
    assert_eq!(send(&s, M::DELETE, &nobody, Some(&root), None).await.0, StatusCode::NOT_FOUND);
    let (status, _) = send(&s, M::GET, "/admin/users/not-a-uuid", Some(&root), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        send(&s, M::PATCH, &bob_path, Some(&root), Some(json!({"is_admin": "yes"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    s.stop().await;
}

/// Stores a two-message turn in a new conversation of `user`, as a chat would.
async fn conversation(s: &TestServer, user: Uuid, title: &str) -> Uuid {
    let msg = |role, text: &str| NewMessage {
        role,
        content: text.into(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        model: None,
        provider: None,
        usage: None,
    };
    let turn = vec![msg(Role::User, "hello"), msg(Role::Assistant, "hi")];
    let target = TurnTarget::New { title: title.into(), model: "m".into() };
    s.running().store().record_turn(user, target, turn, 1).await.unwrap().0.id
}

#[tokio::test]
async fn deleting_a_user_takes_all_their_data_and_nobody_else_s() {
    let s = TestServer::start(|_| {}).await;
    let root = admin(&s, "root").await;
    let bob_jwt = s.user("bob").await;
    let carol_jwt = s.user("carol").await;
    let id = |v: Value| v["id"].as_str().unwrap().parse::<Uuid>().unwrap();
    let (bob, carol) = (id(me(&s, &bob_jwt).await), id(me(&s, &carol_jwt).await));
    let r = s.post("/auth/api-keys", &json!({"name": "ci"}), Some(&bob_jwt)).await;
    let key = r.json::<Value>().await.unwrap()["key"].as_str().unwrap().to_string();
    let refresh = s.login("bob").await["refresh_token"].clone();
    let convs = [conversation(&s, bob, "one").await, conversation(&s, bob, "two").await];
    let kept = conversation(&s, carol, "carol's").await;
    let store = s.running().store();
    let jobs = vec![Job::new(bob, json!({"message": "x"}), 0), Job::new(bob, json!({}), 0)];
    let limits = QueueLimits { per_user: 10, total: 100 };
    assert!(store.enqueue_jobs(jobs, limits).await.unwrap().iter().all(Result::is_ok));

    let path = format!("/admin/users/{bob}");
    let (status, b) = send(&s, M::DELETE, &path, Some(&root), None).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(b["user"]["username"], "bob");
    assert_eq!(
        b["deleted"],
        json!({"conversations": 2, "messages": 4, "api_keys": 1, "refresh_tokens": 2, "jobs": 2})
    );
    // Every credential is dead, every row is gone.
    for token in [bob_jwt.as_str(), key.as_str()] {
        assert_eq!(s.get("/auth/me", Some(token)).await.status(), StatusCode::UNAUTHORIZED);
    }
    let r = s.post("/auth/refresh", &json!({"refresh_token": refresh}), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for c in convs {
        assert!(store.conversation(bob, c).await.unwrap().is_none());
    }
    assert!(store.jobs(bob, 10, None).await.unwrap().0.is_empty());
    assert!(store.api_keys(bob).await.unwrap().is_empty());
    assert_eq!(send(&s, M::GET, &path, Some(&root), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(send(&s, M::DELETE, &path, Some(&root), None).await.0, StatusCode::NOT_FOUND);
    // A turn that lands after the deletion is refused, not stored for nobody.
    let target = TurnTarget::New { title: "late".into(), model: "m".into() };
    assert!(store.record_turn(bob, target, vec![], 2).await.is_err());
    // Carol keeps hers; bob's name is free again.
    assert!(store.conversation(carol, kept).await.unwrap().is_some());
    assert_eq!(s.get("/conversations", Some(&carol_jwt)).await.status(), StatusCode::OK);
    s.register("bob").await;
    s.stop().await;
}

#[tokio::test]
async fn the_cli_manages_accounts_while_the_server_runs_and_keeps_an_admin() {
    let (_keep, dir) = data_dir();
    let server = Binary::spawn(&dir, &[], &[]);
    let base = server.base.clone();
    let run = |args: &[&str], stdin: &str| user_cmd(&dir, args, stdin);
    let (ok, _, err) =
        run(&["create", "root", "--email", "root@example.com", "--admin"], "password-123\n");
    assert!(ok, "{err}");
    let bob = register_and_login(&base, "bob").await;
    let jwt = bob["access_token"].as_str().unwrap();
    let c = client();
    let key: Value = c
        .post(format!("{base}/auth/api-keys"))
        .bearer_auth(jwt)
        .json(&json!({"name": "laptop"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = key["id"].as_str().unwrap();
    let status_of = |token: &str| {
        let c = c.clone();
        let (url, token) = (format!("{base}/auth/me"), token.to_string());
        async move { c.get(url).bearer_auth(token).send().await.unwrap().status() }
    };

    let (ok, out, err) = run(&["keys", "bob"], "");
    assert!(
        ok && out.contains(key_id) && out.contains("laptop") && out.contains("never"),
        "{out}{err}"
    );
    let (ok, out, err) = run(&["revoke-key", "bob", key_id], "");
    assert!(ok && out.contains("revoked"), "{out}{err}");
    assert_eq!(status_of(key["key"].as_str().unwrap()).await, StatusCode::UNAUTHORIZED);
    let (ok, _, err) = run(&["revoke-key", "bob", key_id], "");
    assert!(!ok && err.contains("no API key"), "{err}");

    let (ok, _, err) = run(&["reset-password", "bob"], "short\n");
    assert!(!ok && err.contains("at least 8"), "{err}");
    let (ok, out, err) = run(&["reset-password", "bob"], "a-new-password\n");
    assert!(ok && out.contains("bob"), "{out}{err}");
    assert!(login(&base, "bob").await.is_none(), "the old password stopped working");
    let body = json!({"username": "bob", "password": "a-new-password"});
    let r = c.post(format!("{base}/auth/login")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let (ok, out, err) = run(&["grant-admin", "bob"], "");
    assert!(ok && out.contains("(admin, active)"), "{out}{err}");
    let profile: Value = c
        .get(format!("{base}/auth/me"))
        .bearer_auth(jwt)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(profile["is_admin"], true);
    let (ok, out, err) = run(&["revoke-admin", "root"], "");
    assert!(ok && out.contains("(user, active)"), "{out}{err}");
    // bob is now the only admin: he can be neither demoted nor deleted.
    let (ok, _, err) = run(&["revoke-admin", "bob"], "");
    assert!(!ok && err.contains("last active admin"), "{err}");
    let (ok, _, err) = run(&["delete", "bob"], "");
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, _, err) = run(&["delete", "bob", "--yes"], "");
    assert!(!ok && err.contains("last active admin"), "{err}");
    let (ok, _, err) = run(&["grant-admin", "root"], "");
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["delete", "bob", "--yes"], "");
    assert!(ok && out.contains("deleted bob"), "{out}{err}");
    assert_eq!(status_of(jwt).await, StatusCode::UNAUTHORIZED);
    let (ok, _, err) = run(&["delete", "ghost", "--yes"], "");
    assert!(!ok && err.contains("no user named ghost"), "{err}");

    // With the server stopped the same rules hold (the CLI opens the file itself).
    assert!(server.signal(libc::SIGTERM).success());
    let (ok, _, err) = run(&["revoke-admin", "root"], "");
    assert!(!ok && err.contains("last active admin"), "{err}");
    let (ok, out, _) = run(&["list"], "");
    assert!(ok && out.contains("root") && !out.contains("bob"), "{out}");
}

/// Starts `edgechat serve --listen LISTEN` with `env`, waits for it to listen, stops it, and
/// returns what it logged.
fn start_log(listen: &str, env: &[(&str, &str)]) -> String {
    let (_keep, dir) = data_dir();
    let log = dir.join("serve.log");
    let mut child = command(&dir)
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(&dir)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = (0..100)
        .map_while(|_| rx.recv_timeout(Duration::from_secs(60)).ok())
        .any(|line| line.contains("listening on"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "the server did not start");
    std::fs::read_to_string(log).unwrap()
}

#[test]
fn open_registration_beyond_loopback_is_warned_about_at_start() {
    let warned = |log: &str| log.contains("registration is open") && log.contains("WARN");
    let log = start_log("0.0.0.0:0", &[]);
    assert!(warned(&log), "{log}");
    assert!(log.contains("auth.registration"), "the warning names the setting: {log}");
    let log = start_log("0.0.0.0:0", &[("EDGECHAT_AUTH__REGISTRATION", "closed")]);
    assert!(!warned(&log), "{log}");
    let log = start_log("127.0.0.1:0", &[]);
    assert!(!warned(&log), "{log}");
}
