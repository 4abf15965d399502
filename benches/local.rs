//! `cargo bench --bench local`: the local engine on the default model — load time, prefill
//! tokens/s (a 256-token prompt), decode tokens/s (128 tokens) alone and for a batch of
//! `EDGECHAT_BENCH_BATCH` requests together (default 4: aggregate tokens/s once all have
//! their first token), decode held to a nested JSON schema by constrained decoding (as a share
//! of free decode), peak RSS. Compare with llama.cpp on the same file and threads:
//! `bash benches/llama-bench.sh`.
//!
//! Environment: `EDGECHAT_BENCH_MODEL` (default models/SmolLM2-135M-Instruct.Q4_1.gguf),
//! `EDGECHAT_BENCH_THREADS` (default: all cores), `EDGECHAT_BENCH_RUNS` (default 3),
//! `EDGECHAT_BENCH_ALLOCATOR=default` to keep glibc's own mmap threshold instead of the
//! binary's (`cli::tune_allocator`).

use edgechat::local::{Engine, EngineOptions, GenerateRequest, Message, Role};
use edgechat::message::{JsonSchema, ResponseFormat};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PREFILL_TOKENS: usize = 256;
const DECODE_TOKENS: usize = 128;

fn main() {
    // `cargo bench` passes `--bench`; a filter that excludes us means nothing to do.
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"local".contains(a.as_str())) {
        return;
    }
    let model = std::env::var("EDGECHAT_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !model.exists() {
        eprintln!("{} is missing: run `bash models/fetch-default.sh`", model.display());
        std::process::exit(1);
    }
    if std::env::var("EDGECHAT_BENCH_ALLOCATOR").as_deref() != Ok("default") {
        edgechat::cli::tune_allocator();
    }
    let threads = std::env::var("EDGECHAT_BENCH_THREADS").ok().and_then(|t| t.parse().ok());
    let runs: usize =
        std::env::var("EDGECHAT_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let started = Instant::now();
    let batch: usize =
        std::env::var("EDGECHAT_BENCH_BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(4);
    // No prompt cache: each run must compute its prompt again.
    let options = EngineOptions {
        threads,
        max_batch: batch.max(1),
        prompt_cache_mb: 0,
        ..EngineOptions::default()
    };
    let engine = Engine::load(&model, options).expect("load the model");
    let load = started.elapsed();
    let rss_loaded = peak_rss_kib();

    let prompt = prompt_of(&engine, PREFILL_TOKENS);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut batched = Vec::new();
    let mut constrained = Vec::new();
    // The first constrained request builds the vocabulary's grammar tables: not timed.
    runtime.block_on(time_request(&engine, nested("warm up"), 2));
    for _ in 0..runs {
        // One generated token: the time is the prompt's forward pass plus one sampling step.
        let (t, _) = runtime.block_on(time(&engine, prompt.clone(), 1));
        prefill.push(PREFILL_TOKENS as f64 / t.as_secs_f64());
        let short = vec![Message::new(Role::User, "Write a long story about a brave dragon.")];
        let (first, _) = runtime.block_on(time(&engine, short.clone(), 1));
        let (total, n) = runtime.block_on(time(&engine, short, DECODE_TOKENS));
        decode.push((n - 1) as f64 / (total - first).as_secs_f64());
        let ask = "Invent a library of books with long descriptions.";
        let (first, _) = runtime.block_on(time_request(&engine, nested(ask), 1));
        let (total, n) = runtime.block_on(time_request(&engine, nested(ask), DECODE_TOKENS));
        constrained.push((n - 1) as f64 / (total - first).as_secs_f64());
        if batch > 1 {
            batched.push(runtime.block_on(decode_together(&engine, batch)));
        }
    }
    println!("model: {}", model.display());
    println!("threads: {}", std::env::var("RAYON_NUM_THREADS").unwrap_or_default());
    println!("load: {} ms", load.as_millis());
    println!(
        "prefill pp{PREFILL_TOKENS}: {:.1} tok/s (best of {runs}: {})",
        best(&prefill),
        list(&prefill)
    );
    println!(
        "decode tg{DECODE_TOKENS}: {:.1} tok/s (best of {runs}: {})",
        best(&decode),
        list(&decode)
    );
    println!(
        "decode tg{DECODE_TOKENS} json_schema (nested): {:.1} tok/s, {:.0} % of free decode (best of {runs}: {})",
        best(&constrained),
        100.0 * best(&constrained) / best(&decode),
        list(&constrained)
    );
    if batch > 1 {
        println!(
            "decode tg{DECODE_TOKENS} x{batch} together: {:.1} tok/s in all (best of {runs}: {})",
            best(&batched),
            list(&batched)
        );
    }
    println!(
        "peak rss: {} MiB after load, {} MiB at end",
        rss_loaded / 1024,
        peak_rss_kib() / 1024
    );
}

/// Messages whose rendered prompt is exactly `tokens` long.
fn prompt_of(engine: &Engine, tokens: usize) -> Vec<Message> {
    let words = "the quick brown fox jumps over the lazy dog while a storm gathers ";
    let mut text = String::new();
    loop {
        let messages = vec![Message::new(Role::User, text.clone())];
        let rendered = engine.render_prompt(&messages).unwrap();
        let n = engine.tokenizer().encode(&rendered).unwrap().len();
        if n >= tokens {
            // Trim word by word down to the exact count.
            while engine
                .tokenizer()
                .encode(&engine.render_prompt(&[Message::new(Role::User, text.clone())]).unwrap())
                .unwrap()
                .len()
                > tokens
            {
                text.pop();
            }
            return vec![Message::new(Role::User, text)];
        }
        text.push_str(words);
    }
}

/// A request whose answer must follow a nested schema: books, each with authors and chapters.
fn nested(ask: &str) -> GenerateRequest {
    let text = serde_json::json!({"type": "string"});
    let chapter = serde_json::json!({"type": "object", "required": ["title", "summary"],
        "properties": {"title": text, "summary": text}, "additionalProperties": false});
    let book = serde_json::json!({"type": "object", "required": ["title", "authors", "chapters"],
        "additionalProperties": false, "properties": {"title": text,
            "authors": {"type": "array", "items": text},
            "chapters": {"type": "array", "items": chapter}}});
    let schema = serde_json::json!({"type": "object", "required": ["books"],
        "additionalProperties": false, "properties": {"books": {"type": "array", "items": book}}});
    let json_schema = JsonSchema {
        name: "library".into(),
        description: None,
        schema: Some(schema),
        strict: None,
    };
    GenerateRequest {
        messages: vec![Message::new(Role::User, ask)],
        response_format: Some(ResponseFormat::JsonSchema { json_schema }),
        ..GenerateRequest::default()
    }
}

async fn time(engine: &Engine, messages: Vec<Message>, max_tokens: usize) -> (Duration, usize) {
    time_request(engine, GenerateRequest { messages, ..GenerateRequest::default() }, max_tokens)
        .await
}

async fn time_request(
    engine: &Engine,
    request: GenerateRequest,
    max_tokens: usize,
) -> (Duration, usize) {
    let request = GenerateRequest { max_tokens, ..request };
    let started = Instant::now();
    let (_, _, usage) = engine.generate(request).unwrap().collect_text().await.unwrap();
    (started.elapsed(), usage.completion_tokens as usize)
}

/// Aggregate decode tokens/s of `n` requests generated together, from the moment the last
/// of them has its first token (every prompt is in) to the end of the first to finish (the
/// batch is full all along).
async fn decode_together(engine: &Engine, n: usize) -> f64 {
    use futures_util::StreamExt;
    let one = |i: usize| async move {
        let text = format!("Story number {i}: write a long story about a brave dragon.");
        let messages = vec![Message::new(Role::User, text)];
        let request =
            GenerateRequest { messages, max_tokens: DECODE_TOKENS, ..GenerateRequest::default() };
        let mut stream = engine.generate(request).unwrap();
        let mut times = Vec::new();
        while let Some(event) = stream.next().await {
            if let edgechat::local::Event::Delta(_) = event.unwrap() {
                times.push(Instant::now());
            }
        }
        times
    };
    let all = futures_util::future::join_all((0..n).map(one)).await;
    let start = all.iter().filter_map(|t| t.first()).max().copied().unwrap();
    let end = all.iter().filter_map(|t| t.last()).min().copied().unwrap();
    let tokens: usize =
        all.iter().map(|t| t.iter().filter(|&&x| x > start && x <= end).count()).sum();
    tokens as f64 / (end - start).as_secs_f64()
}

fn best(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(0.0, f64::max)
}

fn list(xs: &[f64]) -> String {
    xs.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ")
}

/// VmHWM: the most resident memory the process has had.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
