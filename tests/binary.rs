//! The real `edgechat` binary: persistence across SIGTERM and SIGKILL, one process per data
//! directory, HTTPS with a self-signed certificate over HTTP/1.1 and HTTP/2, the `user` and
//! `config` commands, and refusal of bad configuration.

mod common;

use common::{client, command, data_dir, login, register_and_login, user_cmd, Binary};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Creates an API key with `access` and returns the key.
async fn api_key(base: &str, access: &str) -> String {
    let r = client()
        .post(format!("{base}/auth/api-keys"))
        .bearer_auth(access)
        .json(&json!({"name": "k"}));
    let created: Value = r.send().await.unwrap().json().await.unwrap();
    created["key"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_survive_sigterm_and_sigkill() {
    let (_keep, dir) = data_dir();
    let server = Binary::spawn(&dir, &[], &[]);
    register_and_login(&server.base, "persist").await;
    let status = server.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean exit");

    let server = Binary::spawn(&dir, &[], &[]);
    assert!(login(&server.base, "persist").await.is_some(), "after SIGTERM");
    register_and_login(&server.base, "crashy").await;
    server.signal(libc::SIGKILL);

    let server = Binary::spawn(&dir, &[], &[]);
    assert!(login(&server.base, "persist").await.is_some(), "after SIGKILL");
    assert!(login(&server.base, "crashy").await.is_some(), "acknowledged before SIGKILL");
    assert_eq!(server.signal(libc::SIGINT).code(), Some(0), "SIGINT is a clean exit too");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_same_data_dir_is_refused_clearly() {
    let (_keep, dir) = data_dir();
    let _server = Binary::spawn(&dir, &[], &[]);
    let out = command(&dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn self_signed_tls_speaks_http1_and_http2() {
    let (_keep, dir) = data_dir();
    let server = Binary::spawn(&dir, &["--tls-self-signed"], &[]);
    assert!(server.base.starts_with("https://127.0.0.1:"), "{}", server.base);
    let cert_path = dir.join("tls/cert.pem");
    let pem = std::fs::read(&cert_path).unwrap();
    // The start-up message names the certificate and its SHA-256 fingerprint.
    let line =
        server.lines.iter().find(|l| l.starts_with("tls certificate:")).expect("certificate line");
    let der =
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            &pem,
        )
        .unwrap();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(der.as_ref());
    let fingerprint: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    assert!(line.contains(&fingerprint.join(":")) && line.contains("cert.pem"), "{line}");
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    let base = server.base.replace("127.0.0.1", "localhost");
    for (http2, version) in [(false, reqwest::Version::HTTP_11), (true, reqwest::Version::HTTP_2)] {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(ca.clone())
            .tls_built_in_root_certs(false);
        b = if http2 { b.http2_prior_knowledge() } else { b.http1_only() };
        let r = b.build().unwrap().get(format!("{base}/health")).send().await.unwrap();
        assert_eq!((r.status(), r.version()), (StatusCode::OK, version));
    }
    // A client that does not trust the certificate is refused.
    let untrusting =
        reqwest::Client::builder().no_proxy().tls_built_in_root_certs(false).build().unwrap();
    assert!(untrusting.get(format!("{base}/health")).send().await.is_err());
    let key_mode = std::fs::metadata(dir.join("tls/key.pem")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777, 0o600);
    drop(server);

    // The certificate is made once and kept.
    let server = Binary::spawn(&dir, &["--tls-self-signed"], &[]);
    assert_eq!(std::fs::read(&cert_path).unwrap(), pem);
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn user_commands_work_offline_and_against_a_running_server() {
    let (_keep, dir) = data_dir();
    // Server stopped: the CLI opens the file itself.
    let (ok, out, err) = user_cmd(
        &dir,
        &["create", "root", "--email", "root@example.com", "--admin"],
        "password-123\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("root") && out.contains("admin"), "{out}");
    let (ok, _, err) =
        user_cmd(&dir, &["create", "x", "--email", "x@example.com"], "password-123\n");
    assert!(!ok && err.contains("username"), "{err}");
    let (ok, _, err) = user_cmd(&dir, &["create", "shorty", "--email", "s@example.com"], "short\n");
    assert!(!ok && err.contains("password"), "{err}");

    // Server running: the CLI goes through the control socket, and disabling bites at once.
    let server = Binary::spawn(&dir, &[], &[]);
    let tokens = register_and_login(&server.base, "mallory").await;
    let access = tokens["access_token"].as_str().unwrap();
    let c = client();
    let key = &api_key(&server.base, access).await;
    let me = |token: &str| {
        c.get(format!("{}/auth/me", server.base)).bearer_auth(token.to_string()).send()
    };
    assert_eq!(me(access).await.unwrap().status(), StatusCode::OK);
    let admin: Value = c
        .post(format!("{}/auth/login", server.base))
        .json(&json!({"username": "root", "password": "password-123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let admin_me: Value =
        me(admin["access_token"].as_str().unwrap()).await.unwrap().json().await.unwrap();
    assert_eq!(admin_me["is_admin"], true);

    let (ok, out, err) = user_cmd(&dir, &["list"], "");
    assert!(ok, "{err}");
    assert!(out.contains("root") && out.contains("mallory"), "{out}");
    let (ok, out, err) = user_cmd(&dir, &["disable", "mallory"], "");
    assert!(ok && out.contains("disabled"), "{out} {err}");
    assert_eq!(me(access).await.unwrap().status(), StatusCode::UNAUTHORIZED, "JWT dies at once");
    assert_eq!(me(key).await.unwrap().status(), StatusCode::UNAUTHORIZED, "API key dies at once");
    let r = c
        .post(format!("{}/auth/refresh", server.base))
        .json(&json!({"refresh_token": tokens["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "refresh dies too");
    let r = c
        .post(format!("{}/auth/login", server.base))
        .json(&json!({"username": "mallory", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let (ok, _, err) = user_cmd(&dir, &["enable", "mallory"], "");
    assert!(ok, "{err}");
    assert_eq!(me(key).await.unwrap().status(), StatusCode::OK);
    let (ok, _, err) = user_cmd(&dir, &["disable", "nobody"], "");
    assert!(!ok && err.contains("no user named nobody"), "{err}");
    drop(server);
}

#[test]
fn config_check_redacts_secrets_and_bad_config_names_the_key() {
    let (_keep, dir) = data_dir();
    let out = command(&dir)
        .args(["config", "check"])
        .env("EDGECHAT_AUTH__JWT_SECRET", "a-very-secret-value-that-is-long-enough")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[redacted]") && !text.contains("a-very-secret-value"), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:8000\""), "{text}");

    std::fs::write(dir.join("bad.toml"), "[server]\nmax_body_byte = 5\n").unwrap();
    let out = command(&dir).args(["--config", "bad.toml", "config", "check"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_byte"), "{err}");

    let out = command(&dir)
        .args(["serve"])
        .env("EDGECHAT_SERVER__LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen"), "{err}");
}

/// `config check` refuses what `serve` would refuse at start, naming the file and what to do,
/// warns of what `serve` only warns of, resolves a host name in `listen`, and says where each
/// value came from (the unit's `Environment=` silently overriding the file was the trap).
#[test]
fn config_check_refuses_what_serve_would_and_says_where_values_came_from() {
    let (_keep, dir) = data_dir();
    let check = |toml: &str, env: &[(&str, &str)]| {
        std::fs::write(dir.join("c.toml"), toml).unwrap();
        let out = command(&dir)
            .args(["--config", "c.toml", "config", "check"])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = check(
        "[server]\nlisten = \"localhost:8080\"\n[log]\nlevel = \"info\"\n",
        &[("EDGECHAT_LOG__LEVEL", "debug")],
    );
    assert!(ok, "{text}");
    for line in [
        "server.listen = \"127.0.0.1:8080\"  # file",
        "log.level = \"debug\"  # EDGECHAT_LOG__LEVEL (overrides the file)",
        "server.max_connections = 1024  # default",
        "# warning: local model SmolLM2-135M-Instruct.Q4_1: no file at",
    ] {
        assert!(text.contains(line), "`{line}` missing:\n{text}");
    }

    let pair = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), pair.cert.pem()).unwrap();
    std::fs::write(dir.join("other.pem"), other.key_pair.serialize_pem()).unwrap();
    let encrypted = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/encrypted_key.pem");
    std::fs::write(dir.join("garbage.gguf"), b"not a model").unwrap();
    let tls = |key: &str| format!("[tls]\ncert_file = \"cert.pem\"\nkey_file = \"{key}\"\n");
    for (toml, words) in [
        (tls("other.pem"), "do not make a valid TLS config"),
        (tls(encrypted), "encrypted with a passphrase"),
        (tls("missing.pem"), "missing.pem"),
        ("[auth]\njwt_secret_file = \"nowhere\"\n".to_string(), "nowhere"),
        ("[local]\nmodel = \"garbage.gguf\"\n".to_string(), "garbage.gguf"),
        ("[local]\nchat_template = \"none.jinja\"\n".to_string(), "none.jinja"),
        ("[server]\nlisten = \"localhost\"\n".to_string(), "is not HOST:PORT"),
    ] {
        let (ok, text) = check(&toml, &[]);
        assert!(!ok && text.contains(words), "{toml}: `{words}` missing:\n{text}");
    }
}

#[test]
fn jwt_secret_is_generated_once_with_mode_0600() {
    let (_keep, dir) = data_dir();
    let run = || {
        let mut c = command(&dir);
        c.args(["user", "list", "--data-dir"]).arg(&dir);
        assert!(c.output().unwrap().status.success());
        std::fs::read(dir.join("jwt_secret")).unwrap()
    };
    let first = run();
    assert!(first.len() >= 32);
    assert_eq!(run(), first, "kept across runs");
    let mode = |path: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&dir.join("jwt_secret")), 0o600);
    assert_eq!(mode(&dir.join("edgechat.redb")), 0o600, "hashes and emails are private");
    let fresh = dir.join("fresh/nested");
    command(&dir).args(["user", "list", "--data-dir"]).arg(&fresh).output().unwrap();
    assert_eq!(mode(&fresh), 0o700, "a data directory we create is private");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_have_one_json_line_per_request_and_no_secrets() {
    let (_keep, dir) = data_dir();
    let log = dir.join("stderr.log");
    let server = Binary::spawn_logged(&dir, &["--log-json"], &[], &log);
    let tokens = register_and_login(&server.base, "quiet").await;
    let access = tokens["access_token"].as_str().unwrap();
    let c = client();
    let key = &api_key(&server.base, access).await;
    c.get(format!("{}/auth/me", server.base))
        .bearer_auth(key)
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    c.get(format!("{}/auth/me", server.base)).bearer_auth("forged.jwt.value").send().await.unwrap();
    assert_eq!(server.signal(libc::SIGTERM).code(), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    let secret = std::fs::read_to_string(dir.join("jwt_secret")).unwrap();
    for needle in [
        "password-123",
        access,
        tokens["refresh_token"].as_str().unwrap(),
        key,
        secret.trim(),
        "forged.jwt",
    ] {
        assert!(!text.contains(needle), "the log leaks {needle}");
    }
    let lines: Vec<Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let access_lines: Vec<&Value> =
        lines.iter().filter(|l| l["target"] == "edgechat::access").collect();
    assert_eq!(access_lines.len(), 5, "{text}");
    let traced =
        access_lines.iter().find(|l| l["request_id"] == "trace-me-1").expect("request id logged");
    assert_eq!(
        (traced["method"].as_str(), traced["route"].as_str()),
        (Some("GET"), Some("/auth/me"))
    );
    assert_eq!(traced["status"], 200);
    assert!(traced["duration_ms"].is_number());
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_secret_from_systemd_credentials() {
    let (_keep, dir) = data_dir();
    let creds = dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    let secret = "from-systemd-credentials-0123456789abcdef";
    std::fs::write(creds.join("jwt_secret"), format!("{secret}\n")).unwrap();
    let log = dir.join("stderr.log");
    let server = Binary::spawn_logged(
        &dir,
        &[],
        &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())],
        &log,
    );
    let tokens = register_and_login(&server.base, "cred").await;
    assert!(!dir.join("jwt_secret").exists(), "no secret generated when a credential is given");
    // The token verifies with the credential's secret.
    let token = tokens["access_token"].as_str().unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["edgechat"]);
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
    assert!(jsonwebtoken::decode::<Value>(token, &key, &v).is_ok());
}

#[test]
fn health_command_probes_the_configured_server() {
    let (_keep, dir) = data_dir();
    let probe = |listen: &str, env: &[(&str, &str)], args: &[&str]| {
        let out = command(&dir)
            .env("EDGECHAT_SERVER__LISTEN", listen)
            .envs(env.iter().copied())
            .arg("health")
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let server = Binary::spawn(&dir, &[], &[]);
    let addr = server.base.trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap();
    assert_eq!(probe(&addr, &[], &[]), (true, String::new()));
    // A wildcard listen address is probed over loopback.
    assert!(probe(&format!("0.0.0.0:{port}"), &[], &[]).0);
    let url = format!("{}/health", server.base);
    assert!(probe("127.0.0.1:1", &[], &["--url", &url]).0, "--url wins over the config");
    let (ok, err) = probe(&addr, &[], &["--url", &format!("{}/nowhere", server.base)]);
    assert!(!ok && err.contains("404"), "{err}");
    drop(server);
    let (ok, err) = probe(&addr, &[], &[]);
    assert!(!ok && err.contains(&format!("http://{addr}/ready")), "{err}");

    // With TLS on (the config's switch, which both commands read), the probe speaks HTTPS to
    // the self-signed certificate without trusting it.
    let tls = [("EDGECHAT_TLS__SELF_SIGNED", "true")];
    let server = Binary::spawn(&dir, &[], &tls);
    let addr = server.base.trim_start_matches("https://").to_string();
    assert!(probe(&addr, &tls, &[]).0);
    assert!(!probe(&addr, &[], &[]).0, "plain HTTP to an HTTPS server is not healthy");
    let (ok, err) = probe(&addr, &[], &["--url", &format!("{}/health", server.base)]);
    assert!(
        !ok && err.to_lowercase().contains("certificate"),
        "an explicit URL is verified: {err}"
    );
}
