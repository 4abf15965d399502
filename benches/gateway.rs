//! Gateway overhead: the latency edgechat adds to a chat request on its way to an upstream,
//! and the highest request rate it sustains.
//!
//! A stand-in for OpenAI's Chat Completions API on loopback answers at once: the SSE stream that
//! `tests/common/upstream.rs` plays for `answer(["Hello", "!"])` (two deltas, a finish chunk, a
//! usage chunk, `[DONE]`), but with `TCP_NODELAY` and without that stand-in's zero-length sleeps.
//! Each of those sleeps waits for tokio's next 1 ms timer tick, and without `TCP_NODELAY`
//! Nagle's algorithm holds the frames after the first until the client's delayed ACK (~40 ms);
//! that stand-in is measured once too, to show it. One load generator sends the same request
//! at a fixed rate straight to the stand-in, and through edgechat's `POST /v1/chat/completions`,
//! non-streaming and streaming, with `"store": false` (the gateway path alone, the figure
//! comparable to other gateways) and stored (the default: one durable redb write transaction
//! per request). The difference to the direct path is what edgechat adds. Where PostgreSQL is
//! installed, the stored request is also sent to edgechat on PostgreSQL (a server on loopback,
//! fsync on), with one replica and with two replicas behind a round-robin TCP balancer, all in
//! this process. Then each path's rate is raised step by step until it no longer keeps up.
//!
//! Open loop: send times are fixed in advance and latency counts from the scheduled time, so a
//! server that falls behind shows its queueing instead of slowing the generator down (no
//! coordinated omission). Requests go over a pool of keep-alive HTTP/1.1 connections (reqwest),
//! authenticated with an API key. Everything shares this machine's cores in one process:
//! edgechat and the stand-ins on a 2-worker runtime, the generator on a 1-worker runtime, paced
//! by the main thread. No tracing subscriber is installed, so edgechat's access log costs
//! nothing here. Run with `cargo bench --bench gateway`.

#[path = "../tests/common/postgres.rs"]
mod postgres;
#[path = "../tests/common/upstream.rs"]
mod upstream;

use bytes::Bytes;
use edgechat::config::{Config, QuotaConfig};
use edgechat::secret::Secret;
use edgechat::server::{self, Environment, Running};
use edgechat::store::Store;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use uuid::Uuid;

const MODEL: &str = "gpt-4o-mini";
/// The fixed rate of the latency comparison, in requests per second.
const FIXED_RATE: f64 = 1000.0;
/// Requests per path per round (one second at the fixed rate); paths take turns each round.
const ROUND: usize = 1000;
const ROUNDS: usize = 5;
/// The steps of the rate search, and how long each lasts.
const RATES: [f64; 10] =
    [250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 6000.0, 8000.0, 12000.0, 16000.0];
const STEP: Duration = Duration::from_secs(2);
/// A rate is sustained while p99 stays under this, nothing fails and the queue stays bounded.
const MAX_P99: Duration = Duration::from_millis(50);
/// Requests in flight beyond which the generator stops (below edgechat's 1,024 connections).
const MAX_IN_FLIGHT: usize = 512;
const TIMEOUT: Duration = Duration::from_secs(5);

/// One way of sending the request.
struct Path {
    name: &'static str,
    url: String,
    auth: HeaderValue,
    body: Bytes,
    /// What the answer must contain.
    expect: &'static str,
    /// The store an edgechat path writes to, and its user.
    store: Option<(Store, Uuid)>,
}

/// The outcome of requests at one rate.
#[derive(Default)]
struct Run {
    /// Sorted once the run is complete.
    latencies: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    /// Scheduled but never sent: too many were in flight.
    unsent: usize,
    span: Duration,
    /// CPU time of the whole process (generator, edgechat and stand-in) during the run.
    cpu: Duration,
}

impl Run {
    fn at(&self, q: f64) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::MAX;
        }
        self.latencies[((n as f64 * q) as usize).min(n - 1)]
    }

    /// Process CPU per request answered, in µs.
    fn cpu_per_request(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.latencies.len() + self.errors).max(1) as f64
    }

    fn achieved(&self) -> f64 {
        self.latencies.len() as f64 / self.span.as_secs_f64()
    }

    fn sustained(&self, rate: f64) -> bool {
        self.errors == 0
            && self.unsent == 0
            && self.at(0.99) <= MAX_P99
            && self.achieved() >= 0.95 * rate
    }

    fn merge(&mut self, other: Run) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.unsent += other.unsent;
        self.span += other.span;
        self.cpu += other.cpu;
    }
}

/// One edgechat deployment: its replicas, the address clients use (a replica's own, or the
/// balancer's in front of several), and an API key of a user there.
struct Edgechat {
    replicas: Vec<Running>,
    base: String,
    key: HeaderValue,
    user: Uuid,
    _dirs: Vec<tempfile::TempDir>,
}

impl Edgechat {
    fn store(&self) -> &Store {
        self.replicas[0].store()
    }
}

/// Everything the load is sent to: the stand-ins, edgechat on the redb file, and (when
/// PostgreSQL is installed) edgechat on PostgreSQL with one replica, and with two behind a
/// round-robin balancer.
struct Setup {
    instant: String,
    scripted: upstream::Upstream,
    redb: Edgechat,
    postgres: Option<(Edgechat, Edgechat)>,
}

/// An upstream that answers every request at once with the stand-in's stream, in three
/// frames as it sends them; returns its API root (ending in `/v1`).
async fn instant_upstream() -> String {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::{Frame, Incoming};
    use std::convert::Infallible;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frames = Arc::new(stream_frames());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            let frames = frames.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let frames = frames.clone();
                    async move {
                        req.into_body().collect().await?;
                        let chunks: Vec<Result<_, Infallible>> =
                            frames.iter().map(|b| Ok(Frame::data(b.clone()))).collect();
                        let body = StreamBody::new(futures_util::stream::iter(chunks));
                        let head =
                            hyper::Response::builder().header("content-type", "text/event-stream");
                        Ok::<_, hyper::Error>(head.body(body).unwrap())
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// The bytes `tests/common/upstream.rs` sends for `answer(vec!["Hello", "!"])`.
fn stream_frames() -> Vec<Bytes> {
    let chunk = |d: &str| {
        let c = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": null}]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}});
    let last = format!("data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n");
    vec![chunk("Hello"), chunk("!"), Bytes::from(last)]
}

/// edgechat with the instant stand-in as its `openai` provider, no local model, loose limits.
fn config(dir: &std::path::Path, upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.storage.data_dir = Some(dir.to_path_buf());
    c.local.enabled = false;
    let loose = QuotaConfig { requests: 1_000_000_000, per_secs: 1, burst: 1_000_000_000 };
    c.rate_limit.auth_per_address = loose;
    c.rate_limit.chat_per_user.requests = loose;
    c.rate_limit.chat_per_user.tokens = loose;
    let p = &mut c.providers.openai;
    p.base_url = upstream.to_string();
    p.api_key = Some(Secret::new("sk-test"));
    p.attempts = 1;
    p.breaker_failures = 1_000_000;
    c
}

async fn call(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// `replicas` edgechat servers on the instant stand-in, on the redb file (one) or on a
/// fresh PostgreSQL database, behind a balancer when there are several; a user and key.
async fn edgechat(instant: &str, database: Option<String>, replicas: usize) -> Edgechat {
    let mut running = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..replicas {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path(), instant);
        c.storage.url = database.clone().map(Secret::new);
        c.auth.jwt_secret = Some(Secret::new("bench-secret-bench-secret-bench-secret-0"));
        running.push(server::start_default(c, &Environment::default()).await.unwrap());
        dirs.push(dir);
    }
    let base = match running.len() {
        1 => format!("http://{}", running[0].addr),
        _ => balancer(running.iter().map(|r| r.addr).collect()).await,
    };
    let (key, user) = user_and_key(&base).await;
    Edgechat { replicas: running, base, key, user, _dirs: dirs }
}

/// A round-robin TCP balancer on loopback (a new connection goes to the next backend), the
/// stand-in for nginx or a cloud load balancer; returns its base URL.
async fn balancer(backends: Vec<std::net::SocketAddr>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[next % backends.len()];
            next += 1;
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(backend).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn setup() -> Setup {
    let instant = instant_upstream().await;
    let scripted = upstream::Upstream::start(vec![upstream::answer(vec!["Hello", "!"])]).await;
    let redb = edgechat(&instant, None, 1).await;
    let postgres = match postgres::installed() {
        true => Some((
            edgechat(&instant, Some(postgres::database()), 1).await,
            edgechat(&instant, Some(postgres::database()), 2).await,
        )),
        false => {
            println!(
                "PostgreSQL is not installed: its paths are left out (apt-get install postgresql)"
            );
            None
        }
    };
    Setup { instant, scripted, redb, postgres }
}

/// Registers a user at `base`; returns an API key header of theirs and their id.
async fn user_and_key(base: &str) -> (HeaderValue, Uuid) {
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    let creds =
        json!({"username": "bench", "email": "bench@example.com", "password": "password-bench"});
    let user = call(c.post(format!("{base}/auth/register")).json(&creds)).await;
    let tokens = call(c.post(format!("{base}/auth/login")).json(&creds)).await;
    let jwt = tokens["access_token"].as_str().unwrap();
    let key =
        call(c.post(format!("{base}/auth/api-keys")).bearer_auth(jwt).json(&json!({"name": "b"})))
            .await;
    let key = format!("Bearer {}", key["key"].as_str().unwrap());
    (HeaderValue::from_str(&key).unwrap(), user["id"].as_str().unwrap().parse().unwrap())
}

fn body(stream: bool, store: Option<bool>) -> Bytes {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": stream,
    });
    if let Some(store) = store {
        b["store"] = json!(store);
    }
    Bytes::from(b.to_string())
}

fn paths(s: &Setup) -> Vec<Path> {
    let direct = |name, base: &str| Path {
        name,
        url: format!("{base}/chat/completions"),
        auth: HeaderValue::from_static("Bearer sk-test"),
        body: body(true, None),
        expect: "data: [DONE]",
        store: None,
    };
    let through = |e: &Edgechat, name, stream, store, expect| Path {
        name,
        url: format!("{}/v1/chat/completions", e.base),
        auth: e.key.clone(),
        body: body(stream, store),
        expect,
        store: Some((e.store().clone(), e.user)),
    };
    let (json, sse) = (r#""content":"Hello!""#, "data: [DONE]");
    let r = &s.redb;
    let mut all = vec![
        direct("direct: instant stand-in (SSE)", &s.instant),
        direct("direct: tests' stand-in (no TCP_NODELAY)", &s.scripted.base),
        through(r, "edgechat JSON, store:false", false, Some(false), json),
        through(r, "edgechat SSE, store:false", true, Some(false), sse),
        through(r, "edgechat JSON, stored", false, None, json),
        through(r, "edgechat SSE, stored", true, None, sse),
    ];
    if let Some((one, two)) = &s.postgres {
        all.push(through(one, "PostgreSQL, 1 replica: JSON, stored", false, None, json));
        all.push(through(one, "PostgreSQL, 1 replica: SSE, stored", true, None, sse));
        all.push(through(two, "PostgreSQL, 2 replicas + LB: JSON, stored", false, None, json));
    }
    all
}

fn request(client: &reqwest::Client, p: &Path) -> reqwest::RequestBuilder {
    client
        .post(&p.url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(AUTHORIZATION, p.auth.clone())
        .body(p.body.clone())
}

/// An error with its causes, which reqwest's message leaves out.
fn chain(e: reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        out += &format!(": {c}");
        cause = c.source();
    }
    out
}

/// Sends one request and reads the whole answer; the latency counts from `at`.
async fn send(client: reqwest::Client, p: Arc<Path>, at: Instant) -> Result<Duration, String> {
    let response = request(&client, &p).send().await.map_err(chain)?;
    let status = response.status();
    let body = response.bytes().await.map_err(chain)?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(at.elapsed())
}

/// User and system CPU time of this process so far.
fn cpu_time() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn pace(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Sends `count` requests at `rate` per second, open loop, and waits for all of them.
fn run_at(load: &Runtime, client: &reqwest::Client, p: &Arc<Path>, rate: f64, count: usize) -> Run {
    let period = Duration::from_secs_f64(1.0 / rate);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let cpu = cpu_time();
    let start = Instant::now() + Duration::from_millis(1);
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let at = start + period.mul_f64(i as f64);
        pace(at);
        if in_flight.load(Relaxed) >= MAX_IN_FLIGHT {
            break;
        }
        in_flight.fetch_add(1, Relaxed);
        let (client, p, n) = (client.clone(), p.clone(), in_flight.clone());
        tasks.push(load.spawn(async move {
            let out = tokio::time::timeout(TIMEOUT, send(client, p, at)).await;
            n.fetch_sub(1, Relaxed);
            out.unwrap_or_else(|_| Err("timed out".into()))
        }));
    }
    let mut run = Run { unsent: count - tasks.len(), ..Run::default() };
    for outcome in load.block_on(futures_util::future::join_all(tasks)) {
        match outcome.unwrap() {
            Ok(latency) => run.latencies.push(latency),
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    run.span = start.elapsed();
    run.cpu = cpu_time() - cpu;
    run.latencies.sort();
    run
}

fn us(d: Duration) -> String {
    if d == Duration::MAX {
        return "—".into();
    }
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// `a − b` in µs, signed.
fn added(a: Duration, b: Duration) -> String {
    format!("{:+.0}", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

/// Checks once that each path answers as expected and that only stored requests are stored.
fn check(load: &Runtime, client: &reqwest::Client, paths: &[Path]) {
    let newest = |p: &Path| {
        let (store, user) = p.store.as_ref()?;
        let page = load.block_on(store.conversations(*user, 1, None)).unwrap();
        page.items.first().map(|c| c.id)
    };
    for p in paths {
        let before = newest(p);
        let text = load.block_on(async {
            let r = request(client, p).send().await.unwrap();
            assert!(r.status().is_success(), "{}: {}", p.name, r.status());
            r.text().await.unwrap()
        });
        assert!(text.contains(p.expect), "{}: {text}", p.name);
        let stored = newest(p) != before;
        assert_eq!(stored, p.name.ends_with("stored"), "{}", p.name);
    }
}

/// Paths take turns, one second each, so that drift on a shared machine hits them alike.
fn fixed_rate(load: &Runtime, client: &reqwest::Client, paths: &[Arc<Path>]) -> Vec<Run> {
    for p in paths {
        run_at(load, client, p, FIXED_RATE, ROUND / 2);
    }
    let mut runs: Vec<Run> = paths.iter().map(|_| Run::default()).collect();
    for _ in 0..ROUNDS {
        for (p, run) in paths.iter().zip(&mut runs) {
            run.merge(run_at(load, client, p, FIXED_RATE, ROUND));
        }
    }
    for run in &mut runs {
        run.latencies.sort();
    }
    runs
}

fn print_fixed(paths: &[Arc<Path>], runs: &[Run]) {
    println!(
        "\nAt {FIXED_RATE} req/s, {ROUNDS} rounds × {ROUND} requests per path, latency in µs \
         from the scheduled send to the end of the body; added = path − direct (instant); \
         cpu/req = CPU µs of the whole process (generator, edgechat, stand-in) per request"
    );
    println!(
        "{:<42} {:>5} {:>4} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "path", "ok", "err", "unsent", "p50", "p99", "p99.9", "+p50", "+p99", "+p99.9", "cpu/req"
    );
    let base = &runs[0];
    for (p, r) in paths.iter().zip(runs) {
        let q = [0.5, 0.99, 0.999];
        println!(
            "{:<42} {:>5} {:>4} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>8} {:>7.0}",
            p.name,
            r.latencies.len(),
            r.errors,
            r.unsent,
            us(r.at(q[0])),
            us(r.at(q[1])),
            us(r.at(q[2])),
            added(r.at(q[0]), base.at(q[0])),
            added(r.at(q[1]), base.at(q[1])),
            added(r.at(q[2]), base.at(q[2])),
            r.cpu_per_request(),
        );
        if let Some(e) = &r.first_error {
            println!("    first error: {e}");
        }
    }
}

/// Raises the rate step by step; returns the highest one sustained.
fn max_rate(load: &Runtime, client: &reqwest::Client, p: &Arc<Path>) -> Option<f64> {
    println!("\n{}", p.name);
    let mut best = None;
    for rate in RATES {
        let run = run_at(load, client, p, rate, (rate * STEP.as_secs_f64()) as usize);
        println!(
            "  {rate:>6} req/s: ok {:>6} err {:>4} unsent {:>6} achieved {:>6.0}/s  \
             p50 {:>7} µs  p99 {:>8} µs  cpu {:>4.0} µs/req",
            run.latencies.len(),
            run.errors,
            run.unsent,
            run.achieved(),
            us(run.at(0.5)),
            us(run.at(0.99)),
            run.cpu_per_request(),
        );
        if let Some(e) = &run.first_error {
            println!("    first error: {e}");
        }
        if !run.sustained(rate) {
            break;
        }
        best = Some(rate);
    }
    best
}

/// One stored turn on its own: `record_turn` (one durable write transaction), one at a time,
/// as the stored paths do after each answer, on each store. Its inverse bounds their rate.
fn commit_cost(serve: &Runtime, s: &Setup) {
    turn_cost(serve, "redb", &s.redb);
    if let Some((one, _)) = &s.postgres {
        turn_cost(serve, "PostgreSQL", one);
    }
    let dir = tempfile::tempdir().unwrap();
    let (p50, p99, p999) = percentiles(fdatasync_latencies(dir.path()));
    println!(
        "the disk alone (peer: a 512-byte append + fdatasync on the same filesystem), 1,000 in \
         a row: p50 {p50} µs, p99 {p99} µs, p99.9 {p999} µs"
    );
}

fn turn_cost(serve: &Runtime, name: &str, e: &Edgechat) {
    use edgechat::store::{NewMessage, Role, TurnTarget};
    let msg = |role, text: &str| NewMessage {
        role,
        content: text.into(),
        tool_calls: Vec::new(),
        tool_call_id: None,
        model: None,
        provider: None,
        usage: None,
    };
    let cpu = cpu_time();
    let samples: Vec<Duration> = serve.block_on(async {
        let mut out = Vec::with_capacity(1000);
        for i in 0..1000 {
            let turn = vec![msg(Role::User, "Say hello."), msg(Role::Assistant, "Hello!")];
            let target = TurnTarget::New { title: "Say hello.".into(), model: MODEL.into() };
            let t = Instant::now();
            e.store().record_turn(e.user, target, turn, i).await.unwrap();
            out.push(t.elapsed());
        }
        out
    });
    let cpu = (cpu_time() - cpu).as_secs_f64() * 1e6 / samples.len() as f64;
    let (p50, p99, p999) = percentiles(samples);
    println!(
        "\n{name} record_turn alone, 1,000 in a row: p50 {p50} µs, p99 {p99} µs, p99.9 {p999} µs, \
         CPU {cpu:.0} µs per turn (this process only)"
    );
}

/// The floor of any durable commit on this disk: appends made durable one at a time.
fn fdatasync_latencies(dir: &std::path::Path) -> Vec<Duration> {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    (0..1000)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&[7u8; 512]).unwrap();
            assert_eq!(unsafe { libc::fdatasync(f.as_raw_fd()) }, 0);
            t.elapsed()
        })
        .collect()
}

/// p50, p99 and p99.9 in µs.
fn percentiles(mut samples: Vec<Duration>) -> (String, String, String) {
    samples.sort();
    let at = |q: f64| us(samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)]);
    (at(0.5), at(0.99), at(0.999))
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu.lines().find(|l| l.starts_with("model name")).unwrap_or("model name: ?");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("{cores} cores, {} | load average {}", model.trim(), load.trim());
}

/// A pool of keep-alive HTTP/1.1 connections. Idle ones are dropped after 5 s (httpx's default),
/// well before edgechat closes them (60 s): a request sent on a connection as the server closes it
/// fails with "connection closed before message completed", which is not what is measured here.
fn new_client() -> reqwest::Client {
    let builder = reqwest::Client::builder().no_proxy().http1_only();
    builder.pool_idle_timeout(Duration::from_secs(5)).build().unwrap()
}

fn main() {
    machine();
    let serve =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let load =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let setup = serve.block_on(setup());
    let client = new_client();
    let all = paths(&setup);
    check(&load, &client, &all);
    let all: Vec<Arc<Path>> = all.into_iter().map(Arc::new).collect();
    let runs = fixed_rate(&load, &client, &all);
    print_fixed(&all, &runs);
    println!("\nMax sustained rate (p99 ≤ {MAX_P99:?}, no errors, ≥ 95 % of the rate achieved)");
    let searched: Vec<_> = all.iter().filter(|p| !p.name.contains("tests'")).collect();
    let best: Vec<_> =
        searched.iter().map(|p| (p.name, max_rate(&load, &new_client(), p))).collect();
    println!();
    for (name, rate) in best {
        match rate {
            Some(r) => println!("{name:<42} {r:>6.0} req/s"),
            None => println!("{name:<42} < {:.0} req/s", RATES[0]),
        }
    }
    commit_cost(&serve, &setup);
    machine();
    drop(load);
    serve.block_on(async {
        let postgres = setup.postgres.into_iter().flat_map(|(a, b)| [a, b]);
        for e in std::iter::once(setup.redb).chain(postgres) {
            for r in e.replicas {
                r.shutdown().await;
            }
        }
    });
}
