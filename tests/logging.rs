//! What the real binary writes to its log (issue 12, §4 and §6): no configured secret, however
//! short and wherever it came from, even when a provider echoes it back; and a log filter that
//! would silence the log is refused at start, naming where it came from.

mod common;

use common::upstream::{Act, Upstream};
use common::{client, command, data_dir, register_and_login, Binary};
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

/// Short secrets, with no run of 20 token characters: the old masking of long tokens in
/// upstream bodies let every one of them through.
const KEY: &str = "sk-test-SECRET123";
/// With quotes, so that it is escaped once in the upstream's JSON and again in a JSON log.
const QUOTED_KEY: &str = "sk-\"q\"-SECRET9";
const JWT: &str = "jwt.secret.for.masking.test.0123.4567";
const METRICS: &str = "mt.tok.9876";

/// The ways a log line can spell `secret`: as is, JSON-escaped, and escaped twice.
fn spellings(secret: &str) -> Vec<String> {
    let once = serde_json::to_string(secret).unwrap();
    let once = once[1..once.len() - 1].to_string();
    let twice = serde_json::to_string(&once).unwrap();
    vec![secret.to_string(), once, twice[1..twice.len() - 1].to_string()]
}

/// Serves with OpenAI at the echoing stand-in, asks for a model whose name carries the JWT
/// secret and the metrics token (the stand-in echoes it too), and returns the whole log.
async fn log_of_an_echoed_refusal(
    upstream: &Upstream,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> String {
    let mut env = env.to_vec();
    env.extend([
        ("EDGECHAT_PROVIDERS__OPENAI__BASE_URL", upstream.base.as_str()),
        ("EDGECHAT_PROVIDERS__OPENAI__ATTEMPTS", "1"),
        ("EDGECHAT_LOCAL__ENABLED", "false"),
        ("EDGECHAT_METRICS__TOKEN", METRICS),
    ]);
    let log = dir.join("stderr.log");
    let server = Binary::spawn_logged(dir, args, &env, &log);
    let tokens = register_and_login(&server.base, "echo").await;
    let access = tokens["access_token"].as_str().unwrap();
    let body = json!({"message": "Hi", "model": format!("gpt-4o-mini {JWT} {METRICS}")});
    let r =
        client().post(format!("{}/chat", server.base)).bearer_auth(access).json(&body).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "no fallback: the refusal is the answer");
    assert_eq!(server.signal(libc::SIGTERM).code(), Some(0));
    std::fs::read_to_string(&log).unwrap()
}

fn assert_masked(log: &str, secrets: &[&str]) {
    for secret in secrets {
        for spelling in spellings(secret) {
            assert!(!log.contains(&spelling), "the log leaks {spelling}:\n{log}");
        }
    }
    let refused = log.lines().find(|l| l.contains("upstream refused")).expect("refusal logged");
    assert!(refused.contains("Incorrect API key provided: [redacted]"), "{refused}");
    assert!(refused.matches("[redacted]").count() >= 3, "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_a_provider_echoes_never_reach_the_log() {
    let upstream = Upstream::start(vec![Act::Echo(401)]).await;

    // Text lines; the key from OPENAI_API_KEY, the JWT secret from the environment.
    let (_keep, dir) = data_dir();
    let env = [("OPENAI_API_KEY", KEY), ("EDGECHAT_AUTH__JWT_SECRET", JWT)];
    let log = log_of_an_echoed_refusal(&upstream, &dir, &[], &env).await;
    assert_masked(&log, &[KEY, JWT, METRICS]);
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log}");
    assert_eq!(upstream.seen()[0].auth, format!("Bearer {KEY}"), "the key was used");

    // JSON lines; the key from its file, the JWT secret from a systemd credential.
    let (_keep, dir) = data_dir();
    std::fs::write(dir.join("openai_key"), format!("{QUOTED_KEY}\n")).unwrap();
    let creds = dir.join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("jwt_secret"), JWT).unwrap();
    let key_file = dir.join("openai_key");
    let env = [
        ("EDGECHAT_PROVIDERS__OPENAI__API_KEY_FILE", key_file.to_str().unwrap()),
        ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
    ];
    let log = log_of_an_echoed_refusal(&upstream, &dir, &["--log-json"], &env).await;
    assert_masked(&log, &[QUOTED_KEY, JWT, METRICS]);
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("masking keeps every line JSON");
    }
    assert_eq!(upstream.seen()[1].auth, format!("Bearer {QUOTED_KEY}"));
}

/// Runs the binary with `args` and one variable set; returns (exited in time with success,
/// stderr). A `serve` that is not refused would run on: it is killed after a minute.
fn run(args: &[&str], var: (&str, &str)) -> (bool, String) {
    let (_keep, dir) = data_dir();
    let child = command(&dir)
        .env_remove("RUST_LOG")
        .env(var.0, var.1)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("`edgechat {}` with {}={} was not refused", args.join(" "), var.0, var.1);
        }
    }
}

#[test]
fn a_log_filter_without_a_level_is_refused_naming_its_source() {
    let serve = ["serve", "--listen", "127.0.0.1:0", "--data-dir", "."];
    for args in [&["config", "check"][..], &serve[..]] {
        for value in ["inf0", "warn,hyper"] {
            let (ok, err) = run(args, ("EDGECHAT_LOG__LEVEL", value));
            assert!(!ok && err.contains("log.level") && err.contains(value), "{args:?}: {err}");
            let (ok, err) = run(args, ("RUST_LOG", value));
            assert!(!ok && err.contains("RUST_LOG") && err.contains(value), "{args:?}: {err}");
        }
    }
    let (ok, err) = run(&["config", "check"], ("RUST_LOG", "warn,edgechat=debug"));
    assert!(ok, "a filter of levels passes: {err}");
}
