//! Latency of the real server over loopback: `GET /health`, and an authenticated
//! `GET /conversations` with a JWT and with an API key (a page of 20 from 50 conversations).
//!
//! The peer measured in the same run is a bare hyper server answering a fixed JSON body: the
//! floor for this client, loopback and runtime, so the difference is what edgechat adds.
//! Criterion reports the mean round trip; after it, a plain pass of sequential requests on one
//! keep-alive connection prints p50/p99/p99.9, and the real binary's idle RSS is read from
//! /proc. Run with `cargo bench --bench http`.

use criterion::{criterion_group, Criterion};
use edgechat::config::{Config, QuotaConfig};
use edgechat::server::{self, Environment, Running};
use edgechat::store::{NewMessage, Role, TurnTarget};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Fixture {
    base: String,
    peer: String,
    jwt: String,
    key: String,
    _running: Running,
    _dir: tempfile::TempDir,
}

/// Sends a request and returns its JSON answer.
async fn call(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.storage.data_dir = Some(dir.path().to_path_buf());
    // The HTTP path alone: no local model (its load and memory are measured in `local`).
    config.local.enabled = false;
    config.rate_limit.auth_per_address =
        QuotaConfig { requests: 1_000_000, per_secs: 1, burst: 1_000_000 };
    let running = server::start_default(config, &Environment::default()).await.unwrap();
    let base = format!("http://{}", running.addr);
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let creds =
        json!({"username": "bench", "email": "bench@example.com", "password": "password-bench"});
    let registered = call(c.post(format!("{base}/auth/register")).json(&creds)).await;
    let user = registered["id"].as_str().unwrap().parse().unwrap();
    let tokens = call(c.post(format!("{base}/auth/login")).json(&creds)).await;
    let jwt = tokens["access_token"].as_str().unwrap().to_string();
    let key = call(
        c.post(format!("{base}/auth/api-keys")).bearer_auth(&jwt).json(&json!({"name": "bench"})),
    )
    .await;
    for i in 0..50 {
        let msg = |role, text: &str| NewMessage {
            role,
            content: text.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            model: None,
            provider: None,
            usage: None,
        };
        let turn = vec![msg(Role::User, "hello there"), msg(Role::Assistant, "general kenobi")];
        let target =
            TurnTarget::New { title: format!("conversation {i}"), model: "smollm2".into() };
        running.store().record_turn(user, target, turn, 1_000 + i).await.unwrap();
    }
    Fixture {
        base,
        peer: bare_hyper().await,
        jwt,
        key: key["key"].as_str().unwrap().to_string(),
        _running: running,
        _dir: dir,
    }
}

/// A bare hyper HTTP/1.1 server with one fixed answer, on 127.0.0.1:0.
async fn bare_hyper() -> String {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    let body = r#"{"status":"healthy","version":"0.1.0","uptime_s":1}"#;
                    Ok::<_, std::convert::Infallible>(edgechat::http::bytes(
                        http::StatusCode::OK,
                        "application/json",
                        body,
                    ))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    format!("http://{addr}/health")
}

fn percentiles(rt: &tokio::runtime::Runtime, f: &Fixture) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let cases = [
        ("peer: bare hyper", "", None),
        ("GET /health", "/health", None),
        ("GET /conversations (JWT)", "/conversations", Some(&f.jwt)),
        ("GET /conversations (API key)", "/conversations", Some(&f.key)),
    ];
    for (name, path, token) in cases {
        let url = if path.is_empty() { f.peer.clone() } else { format!("{}{path}", f.base) };
        let mut samples: Vec<Duration> = rt.block_on(async {
            let mut out = Vec::with_capacity(5000);
            for i in 0..5500 {
                let mut r = client.get(&url);
                if let Some(t) = token {
                    r = r.bearer_auth(t);
                }
                let t = Instant::now();
                let resp = r.send().await.unwrap();
                assert!(resp.status().is_success());
                resp.bytes().await.unwrap();
                if i >= 500 {
                    out.push(t.elapsed());
                }
            }
            out
        });
        samples.sort();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64()
                * 1e6
        };
        println!(
            "{name:<30} n={} p50={:.0}µs p99={:.0}µs p99.9={:.0}µs",
            samples.len(),
            at(0.5),
            at(0.99),
            at(0.999)
        );
    }
}

/// Starts the release-or-debug binary this bench was built with and reads its idle RSS.
fn idle_rss() {
    let exe = env!("CARGO_BIN_EXE_edgechat");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("binary exited").unwrap();
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.to_string();
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder().no_proxy().build().unwrap();
        for _ in 0..100 {
            c.get(format!("{base}/health")).send().await.unwrap();
        }
    });
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let field = |name: &str| status.lines().find(|l| l.starts_with(name)).unwrap_or("").to_string();
    println!("idle binary after 100 requests: {} | {}", field("VmRSS:"), field("VmHWM:"));
    let _ = child.kill();
    let _ = child.wait();
}

fn latency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let f = rt.block_on(fixture());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut group = c.benchmark_group("loopback");
    group.bench_function("peer: bare hyper", |b| {
        b.to_async(&rt)
            .iter(|| async { client.get(&f.peer).send().await.unwrap().bytes().await.unwrap() })
    });
    let health = format!("{}/health", f.base);
    group.bench_function("GET /health", |b| {
        b.to_async(&rt)
            .iter(|| async { client.get(&health).send().await.unwrap().bytes().await.unwrap() })
    });
    let list = format!("{}/conversations", f.base);
    for (name, token) in
        [("GET /conversations JWT", &f.jwt), ("GET /conversations API key", &f.key)]
    {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                client.get(&list).bearer_auth(token).send().await.unwrap().bytes().await.unwrap()
            })
        });
    }
    group.finish();
    percentiles(&rt, &f);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
    targets = latency
}

fn main() {
    benches();
    idle_rss();
    Criterion::default().configure_from_args().final_summary();
}
