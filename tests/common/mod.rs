//! The one harness every integration test uses: a real server on 127.0.0.1:0 with a real redb
//! file in a temp dir — in process (`TestServer`) or as the real binary (`Binary`).
#![allow(dead_code)]

use edgechat::api::{self, Routes};
use edgechat::config::{Config, QuotaConfig};
use edgechat::server::{self, Environment, Running};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A JWT secret tests can sign with, to forge tokens the server must refuse.
pub mod postgres;
pub mod remote;
pub mod upstream;

/// A JWT secret tests can sign with, to forge tokens the server must refuse.
pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

/// A config for tests: ephemeral port, a temp data dir, limits loose enough not to interfere.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.storage.data_dir = Some(data_dir.to_path_buf());
    c.auth.jwt_secret = Some(edgechat::secret::Secret::new(JWT_SECRET));
    c.auth.max_concurrent_hashes = 4;
    c.rate_limit.auth_per_address = QuotaConfig { requests: 10_000, per_secs: 1, burst: 10_000 };
    let loose = QuotaConfig { requests: 1000, per_secs: 1, burst: 1000 };
    c.rate_limit.failed_logins_per_username = loose;
    c.rate_limit.failed_logins_per_address_and_username = loose;
    c.rate_limit.failed_logins_per_address = loose;
    c.rate_limit.chat_per_user.requests = QuotaConfig { requests: 1000, per_secs: 1, burst: 1000 };
    // Tests that chat turn the local model on (`with_default_model`); the rest need not load it.
    c.local.enabled = false;
    c
}

/// Turns on the local model from the default model file (panicking with the fetch command
/// when it is missing), answering greedily by name `smollm2`.
pub fn with_default_model(c: &mut Config, model: &Path) {
    c.local.enabled = true;
    c.local.model = model.to_path_buf();
    c.local.name = "smollm2".into();
    c.local.threads = 2;
}

/// An in-process server and a client for it.
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub running: Option<Running>,
}

impl TestServer {
    /// Starts with `test_config`, changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_routes(tweak, api::routes()).await
    }

    /// Starts serving `routes` instead of the default table.
    pub async fn start_routes(tweak: impl FnOnce(&mut Config), routes: Routes) -> TestServer {
        Self::start_in(tempfile::tempdir().unwrap(), tweak, routes).await
    }

    /// Starts on the data in `dir` (a server stopped before, or a file a test wrote).
    pub async fn start_in(
        dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
        routes: Routes,
    ) -> TestServer {
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let running = server::start(config, &Environment::default(), routes).await.unwrap();
        TestServer {
            base: format!("http://{}", running.addr),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            dir,
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap()
    }

    /// `GET path` with one extra request header.
    pub async fn get_with(&self, path: &str, header: &str, value: &str) -> reqwest::Response {
        self.client.get(self.url(path)).header(header, value).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value, token: Option<&str>) -> reqwest::Response {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap()
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).bearer_auth(token).send().await.unwrap()
    }

    /// Registers `name` (email `<name>@example.com`, password `password-<name>`).
    pub async fn register(&self, name: &str) -> Value {
        let body = json!({"username": name, "email": format!("{name}@example.com"), "password": format!("password-{name}")});
        let r = self.post("/auth/register", &body, None).await;
        assert_eq!(r.status(), StatusCode::OK, "register {name}");
        r.json().await.unwrap()
    }

    /// Logs `name` in and returns the whole token answer.
    pub async fn login(&self, name: &str) -> Value {
        let body = json!({"username": name, "password": format!("password-{name}")});
        let r = self.post("/auth/login", &body, None).await;
        assert_eq!(r.status(), StatusCode::OK, "login {name}");
        r.json().await.unwrap()
    }

    /// Registers and logs in; returns the access token.
    pub async fn user(&self, name: &str) -> String {
        self.register(name).await;
        self.login(name).await["access_token"].as_str().unwrap().to_string()
    }

    pub async fn stop(self) {
        self.stop_keeping_data().await;
    }

    /// Stops the server and hands back its data directory.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.running.take().unwrap().shutdown().await;
        self.dir
    }
}

/// The real `edgechat` binary, serving on an ephemeral port.
pub struct Binary {
    pub child: Child,
    pub base: String,
    pub lines: Vec<String>,
}

/// The binary's path (cargo builds it for integration tests).
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_edgechat")
}

/// A command for the binary with a clean environment and the data dir as working directory.
pub fn command(data_dir: &Path) -> Command {
    prepare(Command::new(exe()), data_dir)
}

/// `command`, with the binary run by `emulator` (a program and its first arguments, such as
/// QEMU posing as another CPU).
pub fn emulated(emulator: &[&str], data_dir: &Path) -> Command {
    let mut c = Command::new(emulator[0]);
    c.args(&emulator[1..]).arg(exe());
    prepare(c, data_dir)
}

fn prepare(mut c: Command, data_dir: &Path) -> Command {
    c.current_dir(data_dir)
        .env_remove("EDGECHAT_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env("NO_COLOR", "1");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("EDGECHAT_")) {
        c.env_remove(k);
    }
    c
}

/// A client for a server on loopback (no proxy from the environment).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Registers `name` (password `password-123`) at `base` and returns the login answer.
pub async fn register_and_login(base: &str, name: &str) -> Value {
    let body = json!({"username": name, "email": format!("{name}@example.com"), "password": "password-123"});
    let r = client().post(format!("{base}/auth/register")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    login(base, name).await.expect("fresh user can log in")
}

/// Logs `name` in at `base`; `None` when refused.
pub async fn login(base: &str, name: &str) -> Option<Value> {
    let body = json!({"username": name, "password": "password-123"});
    let r = client().post(format!("{base}/auth/login")).json(&body).send().await.unwrap();
    if r.status() != StatusCode::OK {
        return None;
    }
    Some(r.json().await.unwrap())
}

/// Runs `edgechat user ARGS --data-dir DIR` with `stdin`; returns (success, stdout, stderr).
pub fn user_cmd(dir: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = command(dir)
        .arg("user")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

impl Binary {
    /// Starts `edgechat serve` on `data_dir` (JWT secret `JWT_SECRET`) and waits for its
    /// "listening on" line.
    pub fn spawn(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut cmd = command(data_dir);
        cmd.env("EDGECHAT_AUTH__JWT_SECRET", JWT_SECRET).envs(env.iter().copied());
        Self::start(cmd, data_dir, args, Stdio::null())
    }

    /// Like `spawn`, but with no JWT secret configured and stderr (the logs) written to `log`.
    pub fn spawn_logged(
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Binary {
        let mut cmd = command(data_dir);
        cmd.envs(env.iter().copied());
        Self::start(cmd, data_dir, args, std::fs::File::create(log).unwrap().into())
    }

    /// Runs `cmd` (from [`command`] or [`emulated`]) as `serve` on `data_dir` with `args`.
    pub fn start(mut cmd: Command, data_dir: &Path, args: &[&str], stderr: Stdio) -> Binary {
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data_dir).args(args);
        let child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
        // Owned by `Binary` from here on, so a failed wait below still kills it.
        let mut binary = Binary { child, base: String::new(), lines: Vec::new() };
        let stdout = binary.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while binary.base.is_empty() {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("edgechat printed no listening line");
            if let Some(url) = line.split("listening on ").nth(1) {
                binary.base = url.trim().to_string();
            }
            binary.lines.push(line);
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        binary
    }

    /// Sends a signal and waits for the exit status.
    pub fn signal(mut self, signal: i32) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.child.wait().unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temp dir whose path is short enough for a Unix socket inside it.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("ec").tempdir_in("/tmp").unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Runs `tests/python/{script}` with `args` and returns what it printed, failing the test with
/// that output when it fails, or with the install command when the `openai` package is missing.
pub async fn python_sdk(script: &str, args: Vec<String>) -> String {
    let probe = Command::new("python3").args(["-c", "import openai, pydantic"]).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "the openai Python package is missing: pip install openai==3.57.0 (./scripts/test.sh does)"
    );
    let path = format!("{}/tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg(path).args(args).output().unwrap()
    })
    .await
    .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    text
}
