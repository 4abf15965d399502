//! Process-wide Prometheus metrics. Events are counted where they happen (the HTTP frame, the
//! chat service, the job workers, the generation thread) through the functions here; values
//! that are states rather than events (queue depths, breaker states, the file's size) are read
//! by `GET /metrics` when it is scraped and set with [`set`] just before encoding.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOnly {
    method: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChatLabels {
    provider: &'static str,
    model: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: &'static str,
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    from: &'static str,
    to: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelStateLabel {
    model: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

fn provider(name: &str) -> ProviderLabel {
    ProviderLabel { provider: name.to_owned() }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type F64Gauge = Gauge<f64, AtomicU64>;

struct Metrics {
    registry: Registry,
    http_requests: Family<RouteLabels, Counter>,
    http_seconds: Family<RouteOnly, Histogram>,
    chat_requests: Family<ChatLabels, Counter>,
    chat_tokens: Family<TokenLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    local_tokens: Family<PhaseLabel, Counter>,
    local_seconds: Family<PhaseLabel, Counter<f64, AtomicU64>>,
    local_prompt_cache: Family<ResultLabel, Counter>,
    first_token_seconds: Family<ProviderLabel, Histogram>,
    upstream_seconds: Family<ProviderLabel, Histogram>,
    in_flight: Gauge,
    rate_limited: Family<LimitLabel, Counter>,
    provider_rejected: Family<ProviderLabel, Gauge>,
    process: Process,
    local_decode_rate: F64Gauge,
    local_prompt_cache_bytes: Gauge,
    local_memory_bytes: Gauge,
    local_model_loaded: Family<ModelLabel, Gauge>,
    jobs_finished: Family<StateLabel, Counter>,
    jobs_retried: Counter,
    provider_up: Family<ProviderLabel, Gauge>,
    circuit_open: Family<ProviderLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    local_queue: Family<ModelStateLabel, Gauge>,
    store_bytes: Gauge,
    connections: Family<StateLabel, Gauge>,
    connections_ended: Family<ReasonLabel, Counter>,
    local_kernels: LocalKernels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// A state value read at scrape time.
pub enum Reading<'a> {
    /// Whether the provider can answer now.
    ProviderUp(&'static str, bool),
    /// Whether the provider's circuit breaker is open.
    CircuitOpen(&'static str, bool),
    /// Whether the provider refuses our key.
    ProviderRejected(&'static str, bool),
    /// Background jobs in a state (queued, running, succeeded, failed, cancelled).
    Jobs(&'static str, u64),
    /// A local model's requests `waiting` in its queue or `active` in its batch.
    LocalQueue(&'a str, &'static str, usize),
    /// Whether the local model of this name is loaded.
    LocalModelLoaded(&'a str, bool),
    /// The loaded local models' memory: all of it, and their prompt caches'.
    LocalMemory { total: u64, prompt_cache: usize },
    /// The redb file's size.
    StoreBytes(u64),
    /// HTTP connections `open`, or refused and `held` before being closed.
    Connections(&'static str, usize),
    /// HTTP connections ended by the server for a reason (`refused`, `idle`,
    /// `header_timeout`, `evicted`) since start: a running total the transport keeps.
    ConnectionsEnded(&'static str, u64),
}

/// Registers `metric` under `name` and hands it back for the `Metrics` field.
fn add<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// Histogram bounds in seconds a person can read (1 ms to 1 min), not powers of 2.5.
const SECONDS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

fn seconds() -> Histogram {
    Histogram::new(SECONDS)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("edgechat");
    let r = &mut registry;
    let http_seconds = Family::<RouteOnly, Histogram>::new_with_constructor(seconds);
    r.register(
        "build",
        "The running build",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    let store_bytes = Gauge::default();
    r.register_with_unit(
        "store_size",
        "Size of the redb file",
        prometheus_client::registry::Unit::Bytes,
        store_bytes.clone(),
    );
    Metrics {
        http_requests: add(
            r,
            "http_requests",
            "HTTP requests by route template and status",
            Family::default(),
        ),
        http_seconds: add(
            r,
            "http_request_duration_seconds",
            "Time to the response head (the first byte of a stream)",
            http_seconds,
        ),
        chat_requests: add(
            r,
            "chat_requests",
            "Chat answers by provider, model and outcome",
            Family::default(),
        ),
        chat_tokens: add(
            r,
            "chat_tokens",
            "Tokens of finished chat answers (prompt, completion)",
            Family::default(),
        ),
        fallbacks: add(
            r,
            "chat_fallbacks",
            "Answers another provider (a rule's fallback, or the local model) gave instead of the one asked",
            Family::default(),
        ),
        local_tokens: add(
            r,
            "local_tokens",
            "Tokens of the local model's prompts and answers, by phase (prefill and decode: \
             computed; cached: prompt tokens the prompt cache served instead)",
            Family::default(),
        ),
        local_seconds: add(
            r,
            "local_forward_seconds",
            "Time in the local model's forward passes, by phase",
            Family::default(),
        ),
        local_decode_rate: add(
            r,
            "local_decode_tokens_per_second",
            "Decode speed of the last finished local generation",
            F64Gauge::default(),
        ),
        local_prompt_cache: add(
            r,
            "local_prompt_cache_lookups",
            "New local generations whose prompt started like a cached one (hit) or not (miss)",
            Family::default(),
        ),
        first_token_seconds: add(
            r,
            "chat_time_to_first_token_seconds",
            "From the start of an answer to its first token, by the provider that answered",
            Family::new_with_constructor(seconds),
        ),
        upstream_seconds: add(
            r,
            "upstream_latency_seconds",
            "From sending a request to a remote provider to its first event, per attempt",
            Family::new_with_constructor(seconds),
        ),
        in_flight: add(
            r,
            "http_requests_in_flight",
            "Requests being answered now (a stream until its last byte)",
            Gauge::default(),
        ),
        rate_limited: add(
            r,
            "rate_limited",
            "Requests refused by a rate limit, by limit",
            Family::default(),
        ),
        provider_rejected: add(
            r,
            "provider_rejected",
            "1 while the provider refuses our API key (401 or 403): it is not up",
            Family::default(),
        ),
        process: Process::default(),
        local_prompt_cache_bytes: add(
            r,
            "local_prompt_cache_bytes",
            "KV cache bytes the local models' prompt caches hold (local.prompt_cache_mb bounds each)",
            Gauge::default(),
        ),
        local_memory_bytes: add(
            r,
            "local_memory_bytes",
            "Memory the loaded local models take: their files plus their KV caches \
             (local.max_memory_mb bounds it)",
            Gauge::default(),
        ),
        local_model_loaded: add(
            r,
            "local_model_loaded",
            "1 while the local model is loaded, 0 while it waits for its next use",
            Family::default(),
        ),
        jobs_finished: add(
            r,
            "jobs_finished",
            "Background jobs reaching a final state, by state",
            Family::default(),
        ),
        jobs_retried: add(
            r,
            "jobs_retried",
            "Failed job attempts that were queued again",
            Counter::default(),
        ),
        provider_up: add(r, "provider_up", "1 when the provider can answer now", Family::default()),
        circuit_open: add(
            r,
            "circuit_breaker_open",
            "1 while the provider's circuit is open",
            Family::default(),
        ),
        jobs: add(r, "jobs", "Background jobs by state", Family::default()),
        local_queue: add(
            r,
            "local_queue",
            "Local-model requests waiting or in the running batch, by model",
            Family::default(),
        ),
        store_bytes,
        connections: add(
            r,
            "http_connections",
            "HTTP connections open, and refused ones held before they are closed",
            Family::default(),
        ),
        connections_ended: add(
            r,
            "http_connections_ended",
            "HTTP connections the server refused or closed, by reason",
            Family::default(),
        ),
        local_kernels: add(
            r,
            "local_kernels",
            "Instruction set of the local model's CPU kernels, once a model is loaded",
            LocalKernels::default(),
        ),
        // Last: every `add` above borrows it.
        registry,
    }
});

/// Distinct model labels kept; clients name models, so past this many the rest count as
/// `other` rather than growing the registry without bound.
const MAX_MODELS: usize = 64;

static MODELS: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// The label for `model`: itself while fewer than `MAX_MODELS` have been seen, else `other`.
fn model_label(model: &str) -> String {
    let mut seen = MODELS.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(model) || (seen.len() < MAX_MODELS && seen.insert(model.to_string())) {
        model.to_string()
    } else {
        "other".to_string()
    }
}

/// Counts one HTTP response; `route` is the matched template (`-` when none matched).
pub fn http_request(method: &str, route: &'static str, status: u16, elapsed: Duration) {
    let m = &*METRICS;
    // Clients may send any token as a method; only the standard ones get their own series.
    let method = match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    m.http_requests.get_or_create(&RouteLabels { method, route, status }).inc();
    m.http_seconds.get_or_create(&RouteOnly { method, route }).observe(elapsed.as_secs_f64());
}

/// Counts one finished (`ok`) or failed (`error`) chat answer and, when finished, its tokens.
pub fn chat_answer(provider: &'static str, model: &str, outcome: &'static str, tokens: (u32, u32)) {
    let m = &*METRICS;
    let model = model_label(model);
    m.chat_requests.get_or_create(&ChatLabels { provider, model: model.clone(), outcome }).inc();
    for (kind, n) in [("prompt", tokens.0), ("completion", tokens.1)] {
        if n > 0 {
            let labels = TokenLabels { provider, model: model.clone(), kind };
            m.chat_tokens.get_or_create(&labels).inc_by(n.into());
        }
    }
}

/// Counts an answer that fell back from `from` to `to` (another provider, or `local`).
pub fn fallback(from: &'static str, to: &'static str, reason: &'static str) {
    METRICS.fallbacks.get_or_create(&FallbackLabels { from, to, reason }).inc();
}

/// Records one forward pass of the local model over `tokens` tokens.
pub fn local_forward(phase: &'static str, tokens: usize, elapsed: Duration) {
    let m = &*METRICS;
    m.local_tokens.get_or_create(&PhaseLabel { phase }).inc_by(tokens as u64);
    m.local_seconds.get_or_create(&PhaseLabel { phase }).inc_by(elapsed.as_secs_f64());
}

/// Records a new sequence's prompt-cache lookup: `tokens` of its prompt whose K/V the cache
/// gave it (0: a miss).
pub fn local_prompt_cached(tokens: usize) {
    let m = &*METRICS;
    m.local_tokens.get_or_create(&PhaseLabel { phase: "cached" }).inc_by(tokens as u64);
    let result = if tokens > 0 { "hit" } else { "miss" };
    m.local_prompt_cache.get_or_create(&ResultLabel { result }).inc();
}

/// Records an answer's first token, `elapsed` after it started, from `provider`.
pub fn first_token(name: &str, elapsed: Duration) {
    let h = METRICS.first_token_seconds.get_or_create(&provider(name));
    h.observe(elapsed.as_secs_f64());
}

/// Records one attempt at a remote provider that got its first event after `elapsed`.
pub fn upstream_latency(name: &str, elapsed: Duration) {
    let h = METRICS.upstream_seconds.get_or_create(&provider(name));
    h.observe(elapsed.as_secs_f64());
}

/// A request began (`true`) or its response ended (`false`).
pub fn in_flight(started: bool) {
    match started {
        true => METRICS.in_flight.inc(),
        false => METRICS.in_flight.dec(),
    };
}

/// Counts a request refused by the rate limit `limit`.
pub fn rate_limited(limit: &'static str) {
    METRICS.rate_limited.get_or_create(&LimitLabel { limit }).inc();
}

/// Records the decode speed of a generation that just finished.
pub fn local_decode_rate(tokens_per_second: f64) {
    METRICS.local_decode_rate.set(tokens_per_second);
}

/// Records the instruction set the loaded local model's kernels use (`avx2`, `portable`, ...).
pub fn local_kernels(isa: &'static str) {
    let _ = METRICS.local_kernels.0.set(isa);
}

/// An OpenMetrics info metric whose one label is known only once the local model loads:
/// `edgechat_local_kernels_info{isa="avx2"} 1`, and no sample before (or without) a model.
#[derive(Clone, Debug, Default)]
struct LocalKernels(Arc<OnceLock<&'static str>>);

impl TypedMetric for LocalKernels {
    const TYPE: MetricType = MetricType::Info;
}

impl EncodeMetric for LocalKernels {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        match self.0.get() {
            Some(&isa) => encoder.encode_info(&[("isa", isa)]),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Counts a job reaching `state` (succeeded, failed, cancelled).
pub fn job_finished(state: &'static str) {
    METRICS.jobs_finished.get_or_create(&StateLabel { state }).inc();
}

/// Counts a failed attempt that was queued again.
pub fn job_retried() {
    METRICS.jobs_retried.inc();
}

/// Sets a scrape-time value.
pub fn set(reading: Reading) {
    let m = &*METRICS;
    let flag = |b: bool| i64::from(b);
    let _ = match reading {
        Reading::ProviderUp(name, up) => m.provider_up.get_or_create(&provider(name)).set(flag(up)),
        Reading::ProviderRejected(name, rejected) => {
            m.provider_rejected.get_or_create(&provider(name)).set(flag(rejected))
        }
        Reading::CircuitOpen(name, open) => {
            m.circuit_open.get_or_create(&provider(name)).set(flag(open))
        }
        Reading::Jobs(state, n) => m.jobs.get_or_create(&StateLabel { state }).set(n as i64),
        Reading::LocalQueue(model, state, n) => {
            let label = ModelStateLabel { model: model.to_owned(), state };
            m.local_queue.get_or_create(&label).set(n as i64)
        }
        Reading::LocalModelLoaded(model, loaded) => {
            let label = ModelLabel { model: model.to_owned() };
            m.local_model_loaded.get_or_create(&label).set(flag(loaded))
        }
        Reading::LocalMemory { total, prompt_cache } => {
            m.local_prompt_cache_bytes.set(prompt_cache as i64);
            m.local_memory_bytes.set(total as i64)
        }
        Reading::StoreBytes(n) => m.store_bytes.set(n as i64),
        Reading::Connections(state, n) => {
            m.connections.get_or_create(&StateLabel { state }).set(n as i64)
        }
        Reading::ConnectionsEnded(reason, total) => {
            // Two scrapes at once must not both add the same difference.
            static CATCH_UP: Mutex<()> = Mutex::new(());
            let _one = CATCH_UP.lock().unwrap_or_else(|p| p.into_inner());
            let counter = m.connections_ended.get_or_create(&ReasonLabel { reason });
            counter.inc_by(total.saturating_sub(counter.get())) as i64
        }
    };
}

/// Everything in the OpenMetrics text format: ours, then the process's.
pub fn encode() -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let m = &*METRICS;
    m.process.sample();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode_registry(&mut out, &m.registry);
    let _ = encode_registry(&mut out, &m.process.registry);
    let _ = encode_eof(&mut out);
    out
}

/// The conventional `process_*` metrics, without our prefix (dashboards expect these names),
/// read from `/proc` at each scrape.
struct Process {
    registry: Registry,
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: F64Gauge,
}

impl Default for Process {
    fn default() -> Self {
        use prometheus_client::registry::Unit;
        let mut registry = Registry::default();
        let r = &mut registry;
        let cpu_seconds = Counter::default();
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time",
            Unit::Seconds,
            cpu_seconds.clone(),
        );
        let resident_bytes = Gauge::default();
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory",
            Unit::Bytes,
            resident_bytes.clone(),
        );
        let open_fds = add(r, "process_open_fds", "Open file descriptors", Gauge::default());
        let max_fds = add(r, "process_max_fds", "The open-file limit", Gauge::default());
        let start_time = F64Gauge::default();
        r.register_with_unit(
            "process_start_time",
            "Start time, Unix seconds",
            Unit::Seconds,
            start_time.clone(),
        );
        Process { registry, cpu_seconds, resident_bytes, open_fds, max_fds, start_time }
    }
}

impl Process {
    fn sample(&self) {
        // Two scrapes at once must not both add the same CPU time.
        static ONE: Mutex<()> = Mutex::new(());
        let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: sysconf and getrlimit only read system values into what we pass.
        let (ticks, page, limit) = unsafe {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            let page = libc::sysconf(libc::_SC_PAGESIZE) as f64;
            (libc::sysconf(libc::_SC_CLK_TCK) as f64, page, limit)
        };
        self.max_fds.set(limit.rlim_cur as i64);
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
        // Fields after the command name, which may hold spaces: the 3rd onwards.
        let fields: Vec<f64> = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0.0);
        let cpu = (field(14) + field(15)) / ticks;
        self.cpu_seconds.inc_by((cpu - self.cpu_seconds.get()).max(0.0));
        self.resident_bytes.set((field(24) * page) as i64);
        if let Some(boot) = boot_time() {
            self.start_time.set(boot + field(22) / ticks);
        }
    }
}

/// When the machine booted, Unix seconds (`btime` in `/proc/stat`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The media type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_stop_growing_at_the_cap() {
        for i in 0..MAX_MODELS * 2 {
            let label = model_label(&format!("org/model-{i}"));
            assert!(label == format!("org/model-{i}") || label == "other");
        }
        assert_eq!(MODELS.lock().unwrap().len(), MAX_MODELS);
        assert_eq!(model_label("org/never-seen"), "other");
    }
}
