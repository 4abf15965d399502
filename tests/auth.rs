//! Accounts over HTTP: the seed's flows, every validation rule, login by JSON and form,
//! tokens that must be refused, refresh rotation, API keys, and failed-login limits.

mod common;

use common::{TestServer, JWT_SECRET};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn seed_flows_health_register_login_conversations() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/health", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let health: Value = r.json().await.unwrap();
    assert_eq!(health["status"], "healthy");
    assert!(health["version"].is_string() && health["uptime_s"].is_u64());

    let user = s.register("testuser").await;
    assert_eq!(user["username"], "testuser");
    assert_eq!(user["email"], "testuser@example.com");
    assert!(user["id"].is_string() && user["created_at"].as_str().unwrap().ends_with('Z'));

    let tokens = s.login("testuser").await;
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 900);
    let access = tokens["access_token"].as_str().unwrap();
    let r = s.get("/conversations", Some(access)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"items": [], "next_cursor": null}));

    let me: Value = s.get("/auth/me", Some(access)).await.json().await.unwrap();
    assert_eq!(
        (me["username"].as_str(), me["is_admin"].as_bool()),
        (Some("testuser"), Some(false))
    );
    s.stop().await;
}

async fn detail(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn every_registration_rule_answers_422_with_fastapi_shape() {
    let s = TestServer::start(|_| {}).await;
    let good = json!({"username": "alice", "email": "alice@example.com", "password": "longenough"});
    let cases = [
        ("username", json!("ab")),
        ("username", json!("x".repeat(33))),
        ("username", json!("bad name")),
        ("username", json!("émile")),
        ("email", json!("not-an-email")),
        ("email", json!("a@b")),
        ("email", json!("a b@example.com")),
        ("password", json!("short")),
        ("password", json!("p".repeat(1025))),
        ("password", json!(12345678)),
        ("username", Value::Null),
    ];
    for (field, value) in cases {
        let mut body = good.clone();
        body[field] = value.clone();
        let (status, b) = detail(s.post("/auth/register", &body, None).await).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{field} = {value}");
        let item = &b["detail"][0];
        assert_eq!(item["loc"], json!(["body", field]), "{field} = {value}: {b}");
        assert!(item["msg"].is_string() && item["type"].is_string(), "{b}");
    }
    // A missing field, and all rule failures reported together.
    let (status, b) = detail(
        s.post("/auth/register", &json!({"username": "alice", "password": "longenough"}), None)
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["detail"][0]["loc"], json!(["body", "email"]));
    assert_eq!(b["detail"][0]["type"], "missing");
    let (_, b) = detail(
        s.post("/auth/register", &json!({"username": "a", "email": "x", "password": "y"}), None)
            .await,
    )
    .await;
    assert_eq!(b["detail"].as_array().unwrap().len(), 3, "{b}");
    // Nothing was created by any refused request.
    assert_eq!(s.post("/auth/register", &good, None).await.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn duplicates_in_any_case_are_409() {
    let s = TestServer::start(|_| {}).await;
    s.register("Carol").await;
    for (name, email) in
        [("carol", "other@example.com"), ("CAROL", "x@example.com"), ("dave", "CAROL@EXAMPLE.COM")]
    {
        let body = json!({"username": name, "email": email, "password": "longenough"});
        let (status, b) = detail(s.post("/auth/register", &body, None).await).await;
        assert_eq!(status, StatusCode::CONFLICT, "{name} {email}");
        assert!(b["detail"].as_str().unwrap().contains("already registered"), "{b}");
    }
    // Login is case-insensitive on the username too.
    let r = s
        .post("/auth/login", &json!({"username": "CAROL", "password": "password-Carol"}), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_401() {
    let s = TestServer::start(|_| {}).await;
    s.register("erin").await;
    let mut bodies = Vec::new();
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..7 {
        for (i, name) in ["erin", "nobody-here"].into_iter().enumerate() {
            let t = std::time::Instant::now();
            let r = s
                .post("/auth/login", &json!({"username": name, "password": "wrong-password"}), None)
                .await;
            times[i].push(t.elapsed());
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
            if round == 0 {
                bodies.push(r.text().await.unwrap());
            }
        }
    }
    assert_eq!(bodies[0], bodies[1]);
    // Both paths run one argon2 verification. Skipping it would answer ~100× sooner; a shared
    // machine moves single samples by 2× or more, so compare medians with room to spare.
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (known, unknown) = (median(&mut times[0]), median(&mut times[1]));
    assert!(
        unknown > known / 4.0 && unknown < known * 4.0,
        "known {known:.4}s unknown {unknown:.4}s"
    );
    s.stop().await;
}

#[tokio::test]
async fn login_accepts_the_oauth2_password_form() {
    let s = TestServer::start(|_| {}).await;
    s.register("frank").await;
    let form = [("grant_type", "password"), ("username", "frank"), ("password", "password-frank")];
    let r = s.client.post(s.url("/auth/login")).form(&form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store", "tokens must not be cached");
    let token: Value = r.json().await.unwrap();
    assert!(s.get("/auth/me", token["access_token"].as_str()).await.status().is_success());

    let r =
        s.client.post(s.url("/auth/login")).form(&[("username", "frank")]).send().await.unwrap();
    let (status, b) = detail(r).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(b["detail"][0]["loc"], json!(["body", "password"]));
    let bad_grant =
        [("grant_type", "client_credentials"), ("username", "frank"), ("password", "x")];
    let r = s.client.post(s.url("/auth/login")).form(&bad_grant).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    s.stop().await;
}

fn forge(claims: Value, secret: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn bad_tokens_are_401_with_www_authenticate() {
    let s = TestServer::start(|_| {}).await;
    let user = s.register("gina").await;
    let good = s.login("gina").await["access_token"].as_str().unwrap().to_string();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |iat: u64, exp: u64, iss: &str, aud: &str| json!({"sub": user["id"], "iat": iat, "exp": exp, "iss": iss, "aud": aud});
    let (header, payload, sig) = {
        let mut p = good.split('.');
        (
            p.next().unwrap().to_string(),
            p.next().unwrap().to_string(),
            p.next().unwrap().to_string(),
        )
    };
    let mut tampered_payload = claims(now, now + 600, "edgechat", "edgechat");
    tampered_payload["sub"] = json!(uuid::Uuid::now_v7().to_string());
    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), payload);
    let cases = [
        ("malformed", "not-a-jwt".to_string()),
        ("expired", forge(claims(now - 7200, now - 3600, "edgechat", "edgechat"), JWT_SECRET)),
        ("tampered", format!("{header}.{}.{sig}", b64(&tampered_payload))),
        (
            "wrong key",
            forge(
                claims(now, now + 600, "edgechat", "edgechat"),
                "another-secret-another-secret-0000",
            ),
        ),
        ("alg none", alg_none),
        ("wrong issuer", forge(claims(now, now + 600, "someone-else", "edgechat"), JWT_SECRET)),
        ("wrong audience", forge(claims(now, now + 600, "edgechat", "someone-else"), JWT_SECRET)),
        ("unknown api key", "ec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_string()),
        (
            "refresh token as bearer",
            s.login("gina").await["refresh_token"].as_str().unwrap().to_string(),
        ),
    ];
    for (what, token) in cases {
        let r = s.get("/auth/me", Some(&token)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
        let (_, b) = detail(r).await;
        assert_eq!(b["detail"], "Could not validate credentials", "{what}");
    }
    let r = s.client.get(s.url("/auth/me")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no header");
    let r = s
        .client
        .get(s.url("/auth/me"))
        .header("authorization", format!("Basic {good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "wrong scheme");
    // A correctly signed token of ours still works.
    assert_eq!(s.get("/auth/me", Some(&good)).await.status(), StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let s = TestServer::start(|_| {}).await;
    s.register("hank").await;
    let first = s.login("hank").await;
    let r1 = first["refresh_token"].as_str().unwrap();
    let second: Value =
        s.post("/auth/refresh", &json!({"refresh_token": r1}), None).await.json().await.unwrap();
    let r2 = second["refresh_token"].as_str().unwrap();
    assert_ne!(r1, r2);
    assert_eq!(s.get("/auth/me", second["access_token"].as_str()).await.status(), StatusCode::OK);

    // Reusing the rotated token fails and kills its live descendant too.
    let r = s.post("/auth/refresh", &json!({"refresh_token": r1}), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s.post("/auth/refresh", &json!({"refresh_token": r2}), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "family revoked after reuse");

    // Logout kills that session's refresh token, and only that session's.
    let a = s.login("hank").await;
    let b = s.login("hank").await;
    let r = s.post("/auth/logout", &json!({"refresh_token": a["refresh_token"]}), None).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.post("/auth/refresh", &json!({"refresh_token": a["refresh_token"]}), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s.post("/auth/refresh", &json!({"refresh_token": b["refresh_token"]}), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.post("/auth/refresh", &json!({"refresh_token": "ecr_unknown"}), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = s.post("/auth/refresh", &json!({}), None).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    s.stop().await;
}

#[tokio::test]
async fn api_keys_are_shown_once_work_and_die_when_revoked() {
    let s = TestServer::start(|_| {}).await;
    let jwt = s.user("ivy").await;
    let other = s.user("jack").await;
    let r = s.post("/auth/api-keys", &json!({"name": "laptop"}), Some(&jwt)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("ec_") && key.len() >= 3 + 43, "{key}");

    let list: Value = s.get("/auth/api-keys", Some(&jwt)).await.json().await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(list[0].get("key").is_none(), "the key is shown only once");
    assert!(list[0]["last_used_at"].is_null());

    // The key authenticates both as its user, and records its use.
    let me: Value = s.get("/auth/me", Some(&key)).await.json().await.unwrap();
    assert_eq!(me["username"], "ivy");
    assert_eq!(s.get("/conversations", Some(&key)).await.status(), StatusCode::OK);
    let list: Value = s.get("/auth/api-keys", Some(&key)).await.json().await.unwrap();
    assert!(list[0]["last_used_at"].is_string(), "{list}");

    // Another user cannot see or revoke it.
    let id = created["id"].as_str().unwrap();
    assert_eq!(
        s.get("/auth/api-keys", Some(&other)).await.json::<Value>().await.unwrap(),
        json!([])
    );
    assert_eq!(
        s.delete(&format!("/auth/api-keys/{id}"), &other).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(s.get("/auth/me", Some(&key)).await.status(), StatusCode::OK);

    assert_eq!(
        s.delete(&format!("/auth/api-keys/{id}"), &jwt).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.get("/auth/me", Some(&key)).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.delete(&format!("/auth/api-keys/{id}"), &jwt).await.status(),
        StatusCode::NOT_FOUND
    );

    let r = s.post("/auth/api-keys", &json!({"name": "  "}), Some(&jwt)).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    s.stop().await;
}

#[tokio::test]
async fn api_key_names_are_printable_text_of_at_most_100_characters() {
    let s = TestServer::start(|_| {}).await;
    let jwt = s.user("nina").await;
    let bad = [
        "nul\u{0}byte",
        "<img src=x onerror=alert(1)>",
        "a<b",
        "line\nbreak",
        "tab\there",
        "escape\u{1b}[31m",
        "zero\u{200b}width",
        "right\u{202e}left",
        "\u{a0}",
        &"k".repeat(101),
        "",
    ];
    for name in bad {
        let r = s.post("/auth/api-keys", &json!({"name": name}), Some(&jwt)).await;
        let (status, b) = detail(r).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{name:?}");
        assert_eq!(b["detail"][0]["loc"], json!(["body", "name"]), "{name:?}: {b}");
    }
    let keys: Value = s.get("/auth/api-keys", Some(&jwt)).await.json().await.unwrap();
    assert_eq!(keys, json!([]), "nothing was stored");
    let hundred = "k".repeat(100);
    for (sent, kept) in [
        ("  CI: deploy (prod) & more ", "CI: deploy (prod) & more"),
        ("clé 日本 🔑", "clé 日本 🔑"),
        (&hundred, &hundred),
    ] {
        let r = s.post("/auth/api-keys", &json!({"name": sent}), Some(&jwt)).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{sent}");
        assert_eq!(r.json::<Value>().await.unwrap()["name"], *kept, "trimmed");
    }
    s.stop().await;
}

/// A client whose connections come from `ip` (any 127.x address is loopback on Linux), so the
/// server sees it as a different address.
fn client_from(ip: &str) -> reqwest::Client {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    reqwest::Client::builder().no_proxy().local_address(ip).build().unwrap()
}

async fn login_from(
    c: &reqwest::Client,
    s: &TestServer,
    name: &str,
    password: &str,
) -> reqwest::Response {
    let body = json!({"username": name, "password": password});
    c.post(s.url("/auth/login")).json(&body).send().await.unwrap()
}

fn login_limits(c: &mut edgechat::config::Config) {
    let q = |burst| edgechat::config::QuotaConfig { requests: 1, per_secs: 3600, burst };
    c.rate_limit.failed_logins_per_address_and_username = q(3);
    c.rate_limit.failed_logins_per_address = q(5);
    c.rate_limit.failed_logins_per_username = q(2);
    c.rate_limit.login_slowdown_ms = 300;
}

#[tokio::test]
async fn a_guesser_is_throttled_while_the_real_user_gets_in_from_another_address() {
    let s = TestServer::start(login_limits).await;
    s.register("kate").await;
    let (attacker, owner) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    // The attack: 25 wrong passwords in a row from 127.0.0.2, while kate signs in from
    // 127.0.0.3 five times.
    let attack = {
        let (url, attacker) = (s.url("/auth/login"), attacker.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..25 {
                let body = json!({"username": "kate", "password": format!("guess-{i}")});
                let r = attacker.post(&url).json(&body).send().await.unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                answers.push((r.status(), retry));
            }
            answers
        })
    };
    for _ in 0..5 {
        let r = login_from(&owner, &s, "kate", "password-kate").await;
        assert_eq!(r.status(), StatusCode::OK, "the right password from a clean address gets in");
    }
    let answers = attack.await.unwrap();
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| s.as_u16()).collect();
    assert_eq!(statuses[..3], [401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "the guesser is throttled: {statuses:?}");
    for (_, retry) in &answers[3..] {
        let secs: u64 = retry.as_deref().expect("429 says when").parse().unwrap();
        assert!((1..=3600).contains(&secs), "{secs}");
    }
    // Kate has failures from elsewhere: her logins are slowed, never refused. The attacker's
    // address is refused even with the right password, so a refusal never confirms a guess.
    let t = std::time::Instant::now();
    assert_eq!(login_from(&owner, &s, "kate", "password-kate").await.status(), StatusCode::OK);
    assert!(t.elapsed() >= std::time::Duration::from_millis(300));
    let r = login_from(&attacker, &s, "kate", "password-kate").await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    s.stop().await;
}

#[tokio::test]
async fn failures_count_per_address_for_every_name_and_refusals_look_the_same() {
    let s = TestServer::start(login_limits).await;
    s.register("kate").await;
    s.register("liam").await;
    let guesser = client_from("127.0.0.4");
    // Five failures from one address over names that exist, do not, or cannot exist.
    for name in ["kate", "liam", "ghost", "x", "phantom"] {
        let r = login_from(&guesser, &s, name, "wrong-password").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
    // Now the address is refused for any name, known or not, with the same answer.
    let mut bodies = Vec::new();
    for name in ["kate", "ghost", "newname"] {
        let r = login_from(&guesser, &s, name, "password-kate").await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{name}");
        assert!(
            r.headers().contains_key("retry-after") && r.headers().contains_key("ratelimit-limit")
        );
        bodies.push(r.text().await.unwrap());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    assert!(bodies[0].contains("Too many failed logins"), "{}", bodies[0]);
    // Another address is not affected, and neither are the users.
    let other = client_from("127.0.0.5");
    assert_eq!(login_from(&other, &s, "liam", "password-liam").await.status(), StatusCode::OK);
    // An unknown name from a fresh address answers like a wrong password: 401, same body.
    let (a, b) = (client_from("127.0.0.6"), client_from("127.0.0.7"));
    let unknown = login_from(&a, &s, "ghost", "wrong-password").await;
    let wrong = login_from(&b, &s, "kate", "wrong-password").await;
    assert_eq!(
        (unknown.status(), wrong.status()),
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED)
    );
    assert_eq!(unknown.text().await.unwrap(), wrong.text().await.unwrap());
    s.stop().await;
}

#[tokio::test]
async fn auth_routes_are_rate_limited_per_address_with_headers() {
    let s = TestServer::start(|c| {
        c.rate_limit.auth_per_address =
            edgechat::config::QuotaConfig { requests: 1, per_secs: 60, burst: 3 };
    })
    .await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = s.post("/auth/refresh", &json!({"refresh_token": "ecr_x"}), None).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        remaining.push(r.headers()["ratelimit-remaining"].to_str().unwrap().to_string());
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = s
        .post(
            "/auth/register",
            &json!({"username": "mona", "email": "m@example.com", "password": "longenough"}),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = r.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "one request per 60 s: {retry}");
    assert_eq!(
        (h["ratelimit-limit"].to_str().unwrap(), h["ratelimit-remaining"].to_str().unwrap()),
        ("3", "0")
    );
    assert!(h.contains_key("ratelimit-reset"));
    let (_, b) = detail(r).await;
    assert!(b["detail"].as_str().unwrap().contains("retry"), "{b}");
    // Routes outside /auth are not limited.
    assert_eq!(s.get("/health", None).await.status(), StatusCode::OK);
    s.stop().await;
}
