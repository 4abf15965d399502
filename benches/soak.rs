//! Load and soak: the release binary, as operators run it, under mixed traffic for a bounded
//! time — logins, chats on both faces against a loopback stand-in for OpenAI (stored, and
//! continuing conversations), background jobs and their status, conversation listings — from
//! closed-loop virtual users. Reports throughput, latency percentiles per operation, errors,
//! and the server's RSS over time. Goal: zero errors, flat RSS.
//!
//! `cargo bench --bench soak` runs 180 s with 8 users; `SOAK_SECS` and `SOAK_USERS` change
//! that. Everything is on loopback; every request has a 10 s timeout and the run its deadline.
//! The default local model is loaded when it is present (as in production), though all chats
//! go to the stand-in.

#[path = "../tests/common/upstream.rs"]
mod upstream;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use upstream::{answer, Upstream};

const TIMEOUT: Duration = Duration::from_secs(10);
const SAMPLE: Duration = Duration::from_secs(10);
/// Turns after which a virtual user starts a new conversation (keeps prompts short).
const TURNS_PER_CONVERSATION: usize = 10;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Latencies and failures per operation.
#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, (Vec<Duration>, usize)>,
    first_errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, op: &'static str, took: Duration, result: Result<(), String>) {
        let entry = self.ops.entry(op).or_default();
        match result {
            Ok(()) => entry.0.push(took),
            Err(e) => {
                entry.1 += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(format!("{op}: {e}"));
                }
            }
        }
    }

    fn done(&self) -> (usize, usize) {
        self.ops.values().fold((0, 0), |(n, e), (l, f)| (n + l.len(), e + f))
    }
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn start_server(dir: &Path, upstream: &str) -> Server {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let loose = "{ requests = 1000000, per_secs = 1, burst = 1000000 }";
    let config = format!(
        "[auth]\njwt_secret = \"soak-secret-soak-secret-soak-secret-0123\"\n\
         [rate_limit]\nauth_per_address = {loose}\nfailed_logins_per_username = {loose}\n\
         [rate_limit.chat_per_user]\nrequests = {loose}\n\
         [local]\nenabled = {}\nmodel = \"{}\"\n\
         [providers.openai]\nbase_url = \"{upstream}\"\napi_key = \"sk-soak\"\n\
         [log]\nlevel = \"warn\"\n",
        model.exists(),
        model.display()
    );
    std::fs::write(dir.join("soak.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgechat"))
        .args(["--config", "soak.toml", "serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("edgechat exited before listening").unwrap();
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Server { child, base }
}

async fn send(request: reqwest::RequestBuilder, want: u16) -> Result<Value, String> {
    let r = request.timeout(TIMEOUT).send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(|e| e.to_string())?;
    if status != want {
        return Err(format!("{status}: {}", &body[..body.len().min(200)]));
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// One virtual user's loop until `deadline`.
async fn user(base: String, id: usize, deadline: Instant, tally: Arc<Mutex<Tally>>) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let name = format!("soak{id}");
    let creds = json!({"username": name, "password": "soak-password-1"});
    let reg = json!({"username": name, "email": format!("{name}@example.com"), "password": "soak-password-1"});
    send(http.post(format!("{base}/auth/register")).json(&reg), 200).await.expect("register");
    let mut token = String::new();
    let mut conversation: Option<String> = None;
    let mut turns = 0;
    let mut jobs: Vec<String> = Vec::new();
    let mut step = 0usize;
    while Instant::now() < deadline {
        let started = Instant::now();
        let (op, result): (&'static str, Result<(), String>) = match step % 10 {
            _ if token.is_empty() || step % 50 == 0 => {
                let r = send(http.post(format!("{base}/auth/login")).json(&creds), 200).await;
                if let Ok(v) = &r {
                    token = v["access_token"].as_str().unwrap_or_default().to_string();
                }
                ("login", r.map(drop))
            }
            0 | 3 | 6 => {
                let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]});
                let r = send(
                    http.post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&token)
                        .json(&body),
                    200,
                )
                .await;
                ("v1_chat", r.map(drop))
            }
            1 | 4 => {
                let mut body = json!({"message": "Tell me more.", "model": "gpt-4o-mini"});
                if let Some(c) = &conversation {
                    body["conversation_id"] = json!(c);
                }
                let r =
                    send(http.post(format!("{base}/chat")).bearer_auth(&token).json(&body), 200)
                        .await;
                if let Ok(v) = &r {
                    turns += 1;
                    conversation = (turns % TURNS_PER_CONVERSATION != 0)
                        .then(|| v["conversation_id"].as_str().map(str::to_string))
                        .flatten();
                }
                ("seed_chat", r.map(drop))
            }
            2 | 7 => {
                let r = send(
                    http.get(format!("{base}/conversations?limit=20")).bearer_auth(&token),
                    200,
                )
                .await;
                ("list_conversations", r.map(drop))
            }
            5 => {
                let body = json!({"message": "Summarise this.", "model": "gpt-4o-mini"});
                let r = send(
                    http.post(format!("{base}/chat/background")).bearer_auth(&token).json(&body),
                    202,
                )
                .await;
                if let Some(id) = r.as_ref().ok().and_then(|v| v["task_id"].as_str()) {
                    jobs.push(id.to_string());
                }
                ("job_enqueue", r.map(drop))
            }
            _ => {
                let Some(id) = jobs.pop() else {
                    step += 1;
                    continue;
                };
                let r = send(http.get(format!("{base}/chat/tasks/{id}")).bearer_auth(&token), 200)
                    .await;
                ("job_status", r.map(drop))
            }
        };
        tally.lock().unwrap().record(op, started.elapsed(), result);
        step += 1;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn report(tally: &Tally, span: Duration, rss: &[(u64, f64)]) {
    println!("\n| operation | done | errors | per s | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (op, (lat, errors)) in &tally.ops {
        let mut l = lat.clone();
        l.sort();
        let q = |p: f64| {
            l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        println!(
            "| {op} | {} | {errors} | {:.0} | {} | {} | {} | {} |",
            l.len(),
            l.len() as f64 / span.as_secs_f64(),
            ms(q(0.5)),
            ms(q(0.9)),
            ms(q(0.99)),
            ms(l.last().copied().unwrap_or_default())
        );
    }
    let (done, errors) = tally.done();
    println!(
        "\ntotal: {done} requests in {:.0} s = {:.0}/s, {errors} errors",
        span.as_secs_f64(),
        done as f64 / span.as_secs_f64()
    );
    for e in &tally.first_errors {
        println!("  error: {e}");
    }
    let line: Vec<String> = rss.iter().map(|(t, mb)| format!("{t}s {mb:.1}")).collect();
    println!("server RSS (MB) over time: {}", line.join(", "));
    // Flatness: the second half's growth, which excludes warm-up (caches, pools, first pages).
    if rss.len() >= 4 {
        let half = &rss[rss.len() / 2..];
        let (first, last) = (half[0].1, half[half.len() - 1].1);
        println!("second-half RSS change: {:+.1} MB ({first:.1} → {last:.1})", last - first);
    }
}

fn main() {
    let secs = env_or("SOAK_SECS", 180);
    let users = env_or("SOAK_USERS", 8) as usize;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let upstream = runtime.block_on(Upstream::start(vec![answer(vec![
        "Hello",
        " from",
        " the",
        " stand-in.",
    ])]));
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &upstream.base);
    let pid = server.child.id();
    println!("soak: {users} users for {secs} s against {} (pid {pid}); {}", server.base, machine());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..users)
        .map(|i| runtime.spawn(user(server.base.clone(), i, deadline, tally.clone())))
        .collect();
    let mut rss = vec![(0, rss_mb(pid))];
    let mut last = (0usize, 0usize);
    while Instant::now() < deadline {
        std::thread::sleep(SAMPLE.min(deadline.saturating_duration_since(Instant::now())));
        let t = started.elapsed().as_secs();
        let now = tally.lock().unwrap().done();
        let mb = rss_mb(pid);
        rss.push((t, mb));
        println!(
            "{t:>4} s  {:>6.0} req/s  errors {:>3}  rss {mb:.1} MB",
            (now.0 - last.0) as f64 / SAMPLE.as_secs_f64(),
            now.1
        );
        let _ = std::io::stdout().flush();
        last = now;
    }
    for t in tasks {
        // Each user stops at the deadline; its last request is bounded by TIMEOUT.
        runtime.block_on(t).unwrap();
    }
    let span = started.elapsed();
    let db = dir.path().join("data/edgechat.redb");
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    report(&tally.lock().unwrap(), span, &rss);
    println!("database after the run: {:.1} MB", size as f64 / 1e6);
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    format!(
        "{} × {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        model.unwrap_or_default()
    )
}
