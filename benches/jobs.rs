//! Durable enqueues per second through the real server (`POST /chat/background`, each `202`
//! sent only after its job committed), with 1, 8 and 64 concurrent clients, next to the disk's
//! own fsync rate measured in the same run (small write + fdatasync on the same filesystem),
//! on the redb file and, when PostgreSQL is installed, on a PostgreSQL server on loopback.
//! Group commit is what lets many clients share one fsync (ours on redb, PostgreSQL's WAL
//! flush there): the goal is ≥ 10× the single-client rate with 64 clients on both. Run with
//! `cargo bench --bench jobs`.
//!
//! Jobs go to a stand-in upstream that never answers, so the workers hold one job each and
//! the rest stay queued: the figures are for enqueueing alone.

#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "../tests/common/upstream.rs"]
mod upstream;

use edgechat::config::{Config, QuotaConfig};
use edgechat::secret::Secret;
use edgechat::server::{self, Environment};
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use upstream::{Act, Upstream};

const RUN: Duration = Duration::from_secs(4);

/// fdatasync'd 512-byte appends per second in `dir`.
fn fsync_rate(dir: &Path) -> f64 {
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        f.write_all(&[7u8; 512]).unwrap();
        assert_eq!(unsafe { libc::fdatasync(f.as_raw_fd()) }, 0);
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn config(dir: &Path, up: &Upstream) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.storage.data_dir = Some(dir.to_path_buf());
    c.local.enabled = false;
    c.providers.openai.base_url = up.base.clone();
    c.providers.openai.api_key = Some(Secret::new("sk-bench"));
    c.providers.openai.first_byte_timeout_ms = 3_600_000;
    c.routing.default_model = "gpt-4o-mini".into();
    let loose = QuotaConfig { requests: 10_000_000, per_secs: 1, burst: 10_000_000 };
    c.rate_limit.auth_per_address = loose;
    c.rate_limit.chat_per_user.requests = loose;
    c.jobs.max_queued = 10_000_000;
    c.jobs.max_queued_per_user = 10_000_000;
    c
}

/// `clients` tasks enqueueing back to back for `RUN`: (enqueues per second, p50, p99).
async fn enqueue_rate(base: &str, token: &str, clients: usize) -> (f64, Duration, Duration) {
    let http =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(clients).build().unwrap();
    let started = Instant::now();
    let tasks = (0..clients).map(|_| {
        let (http, url, token) =
            (http.clone(), format!("{base}/chat/background"), token.to_string());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while started.elapsed() < RUN {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"message": "hi"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        all.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (all.len() as f64 / secs, pct(0.5), pct(0.99))
}

/// The store's side alone: batches of `n` jobs per transaction, as group commit makes them.
async fn store_rate(running: &edgechat::server::Running) {
    use edgechat::store::{Job, NewUser, QueueLimits};
    let limits = QueueLimits { per_user: u32::MAX, total: u64::MAX };
    let new = NewUser {
        username: "store-only".into(),
        email: "store-only@example.com".into(),
        password_hash: "$argon2id$unused".into(),
        is_admin: false,
    };
    let user = running.store().create_user(new, 0).await.unwrap().id;
    for n in [1usize, 8, 64] {
        let started = Instant::now();
        let mut done = 0;
        while started.elapsed() < Duration::from_secs(2) {
            let jobs = (0..n).map(|_| Job::new(user, json!({"message": "hi"}), 0)).collect();
            done += running.store().enqueue_jobs(jobs, limits).await.unwrap().len();
        }
        println!(
            "store only, {n:>2} jobs per commit: {:>8.0} jobs/s",
            done as f64 / started.elapsed().as_secs_f64()
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let up = Upstream::start(vec![Act::StallBeforeHead]).await;
        let dir = tempfile::tempdir().unwrap();
        let fsyncs = fsync_rate(dir.path());
        println!("disk: {fsyncs:.0} fdatasync/s (512-byte appends, same filesystem)");
        println!("\nredb file");
        measure(config(dir.path(), &up), fsyncs).await;
        if postgres::installed() {
            println!("\nPostgreSQL on loopback (fsync on, synchronous_commit on)");
            let pg = tempfile::tempdir().unwrap();
            let mut c = config(pg.path(), &up);
            c.storage.url = Some(Secret::new(postgres::database()));
            c.auth.jwt_secret = Some(Secret::new("bench-secret-bench-secret-bench-secret-0"));
            measure(c, fsyncs).await;
        } else {
            println!("PostgreSQL is not installed: left out (apt-get install postgresql)");
        }
    });
}

/// Enqueue rates through the server `config` describes, then the store's side alone.
async fn measure(config: Config, fsyncs: f64) {
    {
        let running = server::start_default(config, &Environment::default()).await.unwrap();
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::new();
        let creds =
            json!({"username": "bench", "email": "b@example.com", "password": "password-bench"});
        http.post(format!("{base}/auth/register")).json(&creds).send().await.unwrap();
        let login: Value = http
            .post(format!("{base}/auth/login"))
            .json(&creds)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = login["access_token"].as_str().unwrap().to_string();
        println!(
            "{:>8} {:>12} {:>10} {:>10} {:>12}",
            "clients", "enqueues/s", "p50", "p99", "vs fsync/s"
        );
        let mut single = 0.0;
        for clients in [1, 8, 64] {
            let (rate, p50, p99) = enqueue_rate(&base, &token, clients).await;
            if clients == 1 {
                single = rate;
            }
            println!(
                "{clients:>8} {rate:>12.0} {:>8.2}ms {:>8.2}ms {:>11.2}×",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                rate / fsyncs
            );
        }
        let (rate64, _, _) = enqueue_rate(&base, &token, 64).await;
        println!("64 clients / 1 client: {:.1}× (goal ≥ 10×)", rate64 / single);
        store_rate(&running).await;
        running.shutdown().await;
    }
}
