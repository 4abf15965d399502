//! A full disk, end to end: the real binary with its data directory on a 16 MiB tmpfs. Writes
//! are acknowledged (users, chat turns through a loopback stand-in for OpenAI, a background
//! job), then a filler file takes every free byte. From the first refused write on, every
//! write answers `507` with a message that says the disk is full, none is acknowledged, reads
//! still answer, `/ready` and `edgechat health` report the store, and `edgechat backup` fails
//! with the same message. Once the filler is deleted, writes succeed again within seconds with
//! no restart; everything acknowledged before and after is there, also after a restart.
//!
//! Mounting needs root (CI runs as root); elsewhere the test says so and skips.

mod common;

use common::upstream::{answer, Upstream};
use common::{command, Binary, JWT_SECRET};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A tmpfs of a fixed size on a fresh directory, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it, or says why it cannot (not root, no mount namespace rights).
    fn mount(size: &str) -> Result<Tmpfs, String> {
        // Short: the control socket lives inside and a Unix socket path has ~108 bytes.
        let parent = tempfile::Builder::new().prefix("ecfull").tempdir_in("/tmp").unwrap();
        let path = parent.path().join("data");
        std::fs::create_dir(&path).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={size},mode=0700")).unwrap();
        // SAFETY: plain C strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs { path, _parent: parent })
    }

    /// Beside the tmpfs, on the ordinary disk.
    fn outside(&self, name: &str) -> PathBuf {
        self.path.parent().unwrap().join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: as above. Lazy, so a process still inside cannot keep it mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Takes every free byte of the file system holding `dir` with one file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [64 << 10, 4 << 10, 512] {
        let bytes = vec![0xa5u8; chunk];
        // Bounded: 16 MiB in 512-byte pieces at most.
        for _ in 0..(1 << 15) {
            match file.write_all(&bytes) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    let _ = file.sync_all();
    path
}

/// systemd's side of the notify protocol: every datagram the server sends, kept by a thread
/// that drains the socket (a full one would block the sender) until this is dropped.
struct Notifications {
    path: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Notifications {
    fn bind(path: PathBuf) -> Notifications {
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::downgrade(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Some(seen) = keep.upgrade() {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    seen.lock().unwrap().push(text);
                }
            }
        });
        Notifications { path, seen }
    }

    /// Waits (bounded) until `n` datagrams have started with `prefix`.
    async fn wait_for(&self, prefix: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.iter().filter(|m| m.starts_with(prefix)).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "no {n} × {prefix:?} in {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Everything the server acknowledged, to look for afterwards.
#[derive(Default)]
struct Acked {
    users: Vec<String>,
    /// (conversation id, the user's message)
    turns: Vec<(String, String)>,
    tasks: Vec<String>,
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.unwrap();
        let status = r.status();
        if status.is_server_error() {
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            assert_eq!(retry.as_deref(), Some("5"), "{path}: {status} has Retry-After");
        }
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let r = self.http.get(format!("{}{path}", self.base)).bearer_auth(token);
        let r = r.send().await.unwrap();
        (r.status(), r.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, name: &str) -> (StatusCode, Value) {
        let body = json!({"username": name, "email": format!("{name}@example.com"), "password": "password-123"});
        self.post("/auth/register", None, body).await
    }

    async fn login(&self, name: &str) -> (StatusCode, Value) {
        self.post("/auth/login", None, json!({"username": name, "password": "password-123"})).await
    }

    async fn token(&self, name: &str) -> String {
        let (status, out) = self.login(name).await;
        assert_eq!(status, StatusCode::OK, "login {name}: {out}");
        out["access_token"].as_str().unwrap().to_string()
    }

    async fn chat(&self, token: &str, message: &str) -> (StatusCode, Value) {
        self.post("/chat", Some(token), json!({"message": message, "model": "gpt-4o-mini"})).await
    }

    async fn enqueue(&self, token: &str, message: &str) -> (StatusCode, Value) {
        let body = json!({"message": message, "model": "gpt-4o-mini"});
        self.post("/chat/background", Some(token), body).await
    }

    /// Waits (bounded) for the task to succeed.
    async fn succeeded(&self, token: &str, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, task) = self.get(&format!("/chat/tasks/{id}"), token).await;
            assert_eq!(status, StatusCode::OK, "{task}");
            if task["status"] == "succeeded" {
                return;
            }
            assert!(task["status"] != "failed", "{task}");
            assert!(Instant::now() < deadline, "task {id} did not succeed: {task}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ready(&self) -> Value {
        let r = self.http.get(format!("{}/ready", self.base)).send().await.unwrap();
        r.json().await.unwrap()
    }

    /// Every acknowledged write is there: users log in, turns are in their conversations,
    /// tasks succeeded.
    async fn check(&self, acked: &Acked, owner: &str) {
        for name in &acked.users {
            self.token(name).await;
        }
        let token = self.token(owner).await;
        for (conversation, message) in &acked.turns {
            let (status, detail) =
                self.get(&format!("/conversations/{conversation}"), &token).await;
            assert_eq!(status, StatusCode::OK, "{detail}");
            let found = detail["messages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["role"] == "user" && m["content"] == message.as_str());
            assert!(found, "turn {:.20}… missing from {conversation}", message);
        }
        for task in &acked.tasks {
            let (status, out) = self.get(&format!("/chat/tasks/{task}"), &token).await;
            assert_eq!((status, &out["status"]), (StatusCode::OK, &json!("succeeded")), "{out}");
        }
    }
}

/// `edgechat ARGS` against `dir`; (success, stdout + stderr).
fn edgechat(dir: &Path, base: &str, args: &[&str]) -> (bool, String) {
    let listen = base.trim_start_matches("http://");
    let out = command(dir)
        .env("EDGECHAT_DATA_DIR", dir)
        .env("EDGECHAT_SERVER__LISTEN", listen)
        .args(args)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn start(dir: &Path, up: &Upstream, log: &Path, extra: &[(&str, &str)]) -> Binary {
    let unlimited = "{ requests = 100000, per_secs = 1, burst = 100000 }";
    let mut env = vec![
        ("EDGECHAT_AUTH__JWT_SECRET", JWT_SECRET),
        ("EDGECHAT_LOCAL__ENABLED", "false"),
        ("EDGECHAT_PROVIDERS__OPENAI__BASE_URL", up.base.as_str()),
        ("EDGECHAT_PROVIDERS__OPENAI__API_KEY", "sk-test-full-disk"),
        ("EDGECHAT_RATE_LIMIT__AUTH_PER_ADDRESS", unlimited),
        ("EDGECHAT_RATE_LIMIT__CHAT_PER_USER__REQUESTS", unlimited),
        ("EDGECHAT_JOBS__WORKERS", "2"),
    ];
    env.extend_from_slice(extra);
    Binary::spawn_logged(dir, &[], &env, log)
}

/// How many lines of the log at `path` contain `needle`.
fn lines(path: &Path, needle: &str) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter(|l| l.contains(needle)).count()
}

/// The message a refused write carries: what is full, and that it resumes by itself.
fn says_disk_full(detail: &Value) -> bool {
    let text = detail.as_str().unwrap_or_default();
    text.contains("disk holding the server's data directory is full") && text.contains("resume")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_keeps_reads_and_recovers_without_a_restart() {
    let disk = match Tmpfs::mount("16m") {
        Ok(disk) => disk,
        Err(why) => {
            println!("SKIPPED full_disk: cannot mount a tmpfs here ({why}); run as root to test");
            return;
        }
    };
    let data = disk.path.clone();
    let up = Upstream::start(vec![answer(vec!["Noted", "."])]).await;
    let log = disk.outside("server.log");
    // Under a systemd watchdog of 1 s: a ping every 500 ms (a store check may take that long
    // on a loaded machine).
    let notify = Notifications::bind(disk.outside("notify.sock"));
    let socket = notify.path.to_str().unwrap();
    let server =
        start(&data, &up, &log, &[("NOTIFY_SOCKET", socket), ("WATCHDOG_USEC", "1000000")]);
    notify.wait_for("READY=1", 1).await;
    let api = Api { base: server.base.clone(), http: common::client() };
    let mut acked = Acked::default();

    // Before: users, a chat turn, a background job — each acknowledged.
    for name in ["before0", "before1", "before2"] {
        assert_eq!(api.register(name).await.0, StatusCode::OK);
        acked.users.push(name.into());
    }
    let token = api.token("before0").await;
    let (status, out) = api.chat(&token, "remember the first turn").await;
    assert_eq!(status, StatusCode::OK, "{out}");
    acked
        .turns
        .push((out["conversation_id"].as_str().unwrap().into(), "remember the first turn".into()));
    let (status, out) = api.enqueue(&token, "a job before").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{out}");
    let task = out["task_id"].as_str().unwrap().to_string();
    api.succeeded(&token, &task).await;
    acked.tasks.push(task.clone());

    // The disk fills. A small write may still fit in pages the file already holds, so write
    // turns until the store refuses one; those it acknowledged count as acknowledged.
    let filler = fill(&data);
    let mut refusal = None;
    for i in 0..64 {
        let message = format!("turn {i} {}", "x".repeat(16 << 10));
        match api.chat(&token, &message).await {
            (StatusCode::OK, out) => {
                acked.turns.push((out["conversation_id"].as_str().unwrap().into(), message))
            }
            (StatusCode::INSUFFICIENT_STORAGE, out) => {
                refusal = Some(out);
                break;
            }
            (status, out) => panic!("a write on a full disk answered {status}: {out}"),
        }
    }
    let refusal = refusal.expect("64 turns of 16 KiB fit on a full 16 MiB tmpfs");
    assert!(says_disk_full(&refusal["detail"]), "{refusal}");

    // From now on every write is refused with that message, on both faces; none is stored.
    let (status, out) = api.register("during").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{out}");
    assert!(says_disk_full(&out["detail"]), "{out}");
    let (status, out) = api.login("before1").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "login stores a refresh token: {out}");
    let (status, out) = api.chat(&token, "a turn during").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{out}");
    let (status, out) = api.enqueue(&token, "a job during").await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{out}");
    let (status, out) = api.post("/auth/api-keys", Some(&token), json!({"name": "during"})).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{out}");
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "during"}]});
    let (status, out) = api.post("/v1/chat/completions", Some(&token), body).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{out}");
    assert_eq!(out["error"]["code"], "insufficient_storage", "{out}");
    assert!(out["error"]["message"].as_str().unwrap().contains("is full"), "{out}");

    // Reads keep working; liveness is fine; readiness and the health check report the store.
    let (status, me) = api.get("/auth/me", &token).await;
    assert_eq!((status, &me["username"]), (StatusCode::OK, &json!("before0")), "{me}");
    let (status, listing) = api.get("/conversations", &token).await;
    assert_eq!(status, StatusCode::OK, "{listing}");
    let (conversation, first) = &acked.turns[0];
    let (status, detail) = api.get(&format!("/conversations/{conversation}"), &token).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["messages"][0]["content"], first.as_str());
    let (status, out) = api.get(&format!("/chat/tasks/{task}"), &token).await;
    assert_eq!((status, &out["status"]), (StatusCode::OK, &json!("succeeded")), "{out}");
    let health = api.http.get(format!("{}/health", api.base)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK, "/health stays liveness");
    let ready = api.ready().await;
    assert_eq!((&ready["status"], &ready["storage"]), (&json!("not_ready"), &json!("disk_full")));
    assert!(ready["reasons"].to_string().contains("disk holding the data directory is full"));
    let (ok, text) = edgechat(&data, &api.base, &["health"]);
    assert!(!ok && text.contains("disk_full"), "edgechat health: {text}");
    let during = disk.outside("during.redb");
    let (ok, text) = edgechat(&data, &api.base, &["backup", during.to_str().unwrap()]);
    assert!(!ok && text.contains("is full") && text.contains(data.to_str().unwrap()), "{text}");
    assert!(!during.exists());

    // The job workers notice (their claims are writes) and pause: one line for the service.
    let since = Instant::now();
    while lines(&log, "job workers paused") == 0 {
        assert!(since.elapsed() < Duration::from_secs(10), "the job workers never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The watchdog is still fed — a restart would not free space — and systemd's status says why.
    let degraded = "WATCHDOG=1\nSTATUS=degraded: the disk holding";
    notify.wait_for(degraded, 2).await;

    // Space comes back: writes resume within seconds, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    while api.ready().await["storage"] != "ok" {
        assert!(freed.elapsed() < Duration::from_secs(15), "still not writable after 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, out) = api.register("after0").await;
    assert_eq!(status, StatusCode::OK, "{out}");
    acked.users.push("after0".into());
    let (status, out) = api.chat(&token, "a turn after").await;
    assert_eq!(status, StatusCode::OK, "{out}");
    acked.turns.push((out["conversation_id"].as_str().unwrap().into(), "a turn after".into()));
    let (status, out) = api.enqueue(&token, "a job after").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{out}");
    let after_task = out["task_id"].as_str().unwrap().to_string();
    api.succeeded(&token, &after_task).await;
    acked.tasks.push(after_task);
    let (ok, text) = edgechat(&data, &api.base, &["health"]);
    assert!(ok, "edgechat health after: {text}");
    notify.wait_for("WATCHDOG=1\nSTATUS=serving; storage writable again", 1).await;
    let copy = disk.outside("after.redb");
    let (ok, text) = edgechat(&data, &api.base, &["backup", copy.to_str().unwrap()]);
    assert!(ok && copy.exists(), "backup after: {text}");
    api.check(&acked, "before0").await;
    // Nothing refused was stored.
    assert_eq!(api.login("during").await.0, StatusCode::UNAUTHORIZED);

    // The log says it once per change, not once per attempt or per worker.
    for (needle, n) in [
        ("storage cannot be written; writes are refused", 1),
        ("storage writable again", 1),
        ("job workers paused", 1),
        ("job workers resumed", 1),
        ("claiming a job failed", 0),
    ] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(lines(&log, needle), n, "{needle:?} in\n{text}");
    }

    // And after a restart on the same directory.
    assert!(server.signal(libc::SIGTERM).success());
    let server = start(&data, &up, &disk.outside("server2.log"), &[]);
    let api = Api { base: server.base.clone(), http: common::client() };
    api.check(&acked, "before0").await;
    assert_eq!(api.login("during").await.0, StatusCode::UNAUTHORIZED);
}
