//! The local model engine: a GGUF model run in-process with candle, so edgechat answers with no
//! network at all.
//!
//! [`Engine::load`] reads the model once; [`Engine::generate`] renders the chat template,
//! tokenizes, and queues the request for the model's one generation thread, returning a
//! stream of [`Event`]s. A server holds its models in a [`Registry`], which loads each on
//! first use and unloads idle ones to make room. Invariants:
//! - generation never runs on the caller's (tokio) threads: a dedicated thread owns the weights;
//! - the wait queue is bounded: overflow is [`LocalError::Busy`], never unbounded memory;
//! - dropping the stream cancels the request before its next token;
//! - a prompt that does not fit the context window is refused up front
//!   ([`LocalError::PromptTooLong`]); the caller trims history.

pub mod cli;
mod error;
pub mod files;
mod gguf;
mod grammar;
mod model;
mod registry;
mod sampler;
mod scheduler;
mod spm;
mod template;
mod text;
mod tokenizer;

pub use error::LocalError;
pub use gguf::{list_models, ModelInfo};
pub use registry::{LoadLimits, Loaded, ModelSpec, Registry};
pub use sampler::SamplingDefaults;
pub use template::{CallFormat, ChatTemplate, Message, Role, CHATML};
pub use tokenizer::TextTokenizer;

use crate::message::{ResponseFormat, Tool};
use futures_util::Stream;
use grammar::{Constraint, Grammars};
use sampler::SamplingParams;
use scheduler::{Calls, Job, Queue};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// How the engine runs; the defaults suit one small model on a small machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineOptions {
    /// Compute threads; `None` means every core. candle sizes its pools once per process, so
    /// the first engine loaded decides (and `RAYON_NUM_THREADS` set outside wins over both).
    pub threads: Option<usize>,
    /// Requests generated at once, one forward pass for all of them per token.
    pub max_batch: usize,
    /// Requests that may wait beyond those; one more is refused as busy.
    pub max_queue: usize,
    /// Caps the context window below what the model allows (less KV cache memory).
    pub context: Option<usize>,
    /// MiB of KV cache kept from finished requests, so that a prompt starting like one of
    /// theirs (the next turn of a conversation) computes only the rest; 0 turns it off.
    pub prompt_cache_mb: usize,
    /// A Jinja chat template used instead of the file's own (for a file whose template is
    /// missing, wrong, or does not offer tools).
    pub chat_template: Option<PathBuf>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: None,
            max_batch: 4,
            max_queue: 32,
            context: None,
            prompt_cache_mb: 256,
            chat_template: None,
        }
    }
}

/// One chat completion to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
    /// Most tokens to generate; reaching it ends with [`FinishReason::Length`].
    pub max_tokens: usize,
    /// 0 is greedy and deterministic.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables it.
    pub repetition_penalty: f32,
    /// Makes sampling at temperature > 0 reproducible.
    pub seed: Option<u64>,
    /// Generation ends before any of these would appear; none of it is ever emitted.
    pub stop: Vec<String>,
    /// JSON (any object, or valid against a schema), enforced token by token.
    pub response_format: Option<ResponseFormat>,
    /// Tools the chat template offers the model (ignored by templates without tools).
    pub tools: Vec<Tool>,
    /// The model may call them on its own (`tool_choice: auto`); each call it opens is held to
    /// the call's schema.
    pub calls: Option<AutoCalls>,
    /// OpenAI's penalties, from -2 to 2 (0 disables them).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Token id → bias added to its logit.
    pub logit_bias: Vec<(u32, f32)>,
    /// Send each token's log probability, with this many alternatives.
    pub logprobs: Option<u8>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            messages: Vec::new(),
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            response_format: None,
            tools: Vec::new(),
            calls: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
        }
    }
}

pub use crate::message::{Event, FinishReason, Usage};

/// Tool calls the model makes when it chooses to, in its template's [`CallFormat`].
#[derive(Debug, Clone, PartialEq)]
pub struct AutoCalls {
    /// One call: `{"name": …, <the format's arguments key>: …}` for one of the tools.
    pub schema: Value,
    /// Several calls in one answer (tagged formats; a bare call is the whole answer).
    pub parallel: bool,
}

/// A loaded model; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("model", &self.inner.info.path).finish_non_exhaustive()
    }
}

/// Two handles are equal when they are the same loaded model (not merely the same file).
impl PartialEq for Engine {
    fn eq(&self, other: &Engine) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

struct Inner {
    info: ModelInfo,
    /// What runs the matrices: the CPU kernels' instruction set, or the GPU backend.
    kernels: &'static str,
    /// The longest sequence (prompt + answer) the engine runs.
    context: usize,
    tokenizer: Arc<TextTokenizer>,
    template: ChatTemplate,
    sampling: SamplingDefaults,
    queue: Arc<Queue>,
    /// Built on the first request for JSON output (a few hundred milliseconds).
    grammars: OnceLock<Result<Grammars, String>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.queue.shutdown();
    }
}

impl Engine {
    /// Loads the model at `path` and starts its generation thread. Blocking (about the time to
    /// read the file): call it from `spawn_blocking` in async code.
    pub fn load(path: &Path, options: EngineOptions) -> Result<Engine, LocalError> {
        set_threads(options.threads);
        let gguf = gguf::GgufFile::open(path)?;
        let info = gguf.info()?;
        let tokenizer = Arc::new(TextTokenizer::load(&gguf)?);
        let source = match (&options.chat_template, gguf.string("tokenizer.chat_template")) {
            (Some(file), _) => std::fs::read_to_string(file).map_err(|e| {
                LocalError::Template(format!("cannot read {}: {e}", file.display()))
            })?,
            (None, Some(source)) => source.to_owned(),
            (None, None) => template::fallback(|t| tokenizer.has_token(t)).to_owned(),
        };
        let template = ChatTemplate::new(&source, &tokenizer.bos_text, &tokenizer.eos_text)?;
        let sampling = SamplingDefaults::of(&gguf);
        let device = model::device();
        let kernels = model::kernels(&device);
        let (weights, limit) = model::Weights::load(gguf, &device)?;
        let context = options.context.map_or(limit, |c| c.clamp(1, limit));
        let queue = Arc::new(Queue::new(options.max_queue));
        let (worker_queue, worker_tokenizer) = (queue.clone(), tokenizer.clone());
        let batch = weights.batch_limit(options.max_batch.max(1));
        let prompt_cache = options.prompt_cache_mb.saturating_mul(1 << 20);
        std::thread::Builder::new()
            .name("edgechat-local".into())
            .spawn(move || {
                scheduler::run(worker_queue, weights, worker_tokenizer, device, batch, prompt_cache)
            })
            .map_err(|e| {
                LocalError::Generation(format!("cannot start the generation thread: {e}"))
            })?;
        let grammars = OnceLock::new();
        let inner =
            Inner { info, kernels, context, tokenizer, template, sampling, queue, grammars };
        Ok(Engine { inner: Arc::new(inner) })
    }

    /// Requests (waiting in the queue, in the running batch) right now.
    pub fn queue_depth(&self) -> (usize, usize) {
        self.inner.queue.depth()
    }

    /// Memory the model takes now: its file (mapped) plus its KV caches, the running
    /// requests' and the prompt cache's.
    pub fn memory_bytes(&self) -> u64 {
        self.inner.info.file_size + self.inner.queue.kv_bytes() as u64
    }

    /// Whether another handle to this model exists: a request being answered holds one (in
    /// its [`Generation`]), so a model no one else holds is idle.
    pub fn in_use(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
    }

    /// Bytes of KV cache the prompt cache holds.
    pub fn prompt_cache_bytes(&self) -> usize {
        self.inner.queue.prompt_cache_bytes()
    }

    /// How this model samples when a request does not say.
    pub fn sampling(&self) -> SamplingDefaults {
        self.inner.sampling
    }

    /// The model file's facts.
    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// What runs the matrices: `avx2` or `portable` on the CPU (`edgechat_llama::Isa`;
    /// `EDGECHAT_ISA=portable` narrows it), `cuda` or `metal` on a GPU.
    pub fn kernels(&self) -> &'static str {
        self.inner.kernels
    }

    /// Prompt plus answer tokens the engine accepts.
    pub fn context_length(&self) -> usize {
        self.inner.context
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.inner.tokenizer
    }

    /// The prompt text the model sees for `messages`.
    pub fn render_prompt(&self, messages: &[Message]) -> Result<String, LocalError> {
        self.inner.template.render(messages)
    }

    /// How the model calls tools, when its chat template offers them (so it can choose to).
    pub fn call_format(&self) -> Option<CallFormat> {
        self.inner.template.call_format()
    }

    /// Tokens the prompt for `messages` takes, so that callers can trim history to fit.
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<usize, LocalError> {
        let prompt = self.render_prompt(messages)?;
        Ok(self.inner.tokenizer.encode_prompt(&prompt)?.len())
    }

    /// Queues a request and returns its stream. Fails at once when the request is invalid, the
    /// prompt does not fit, or the queue is full.
    pub fn generate(&self, request: GenerateRequest) -> Result<Generation, LocalError> {
        let params = validate(&request)?;
        let prompt = self.inner.template.render_with_tools(&request.messages, &request.tools)?;
        let prompt = self.inner.tokenizer.encode_prompt(&prompt)?;
        let context = self.inner.context;
        if prompt.len() >= context {
            return Err(LocalError::PromptTooLong { prompt_tokens: prompt.len(), context });
        }
        let constraint = self.constraint(request.response_format.as_ref())?;
        let calls = request.calls.as_ref().map(|auto| self.calls(auto)).transpose()?;
        let vocab = self.inner.tokenizer.vocab_size();
        if let Some((id, _)) = request.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            return Err(LocalError::InvalidRequest(format!(
                "logit_bias: token {id} is not in the model's vocabulary of {vocab} tokens"
            )));
        }
        let (reply, rx) = mpsc::unbounded_channel();
        self.inner.queue.push(Job {
            max_tokens: request.max_tokens.min(context - prompt.len()),
            prompt,
            params,
            seed: request.seed,
            stop: request.stop,
            constraint,
            calls,
            logit_bias: request.logit_bias,
            logprobs: request.logprobs,
            reply,
        })?;
        Ok(Generation { rx, done: false, _engine: self.clone() })
    }
}

impl Engine {
    /// Builds the model's grammar tables (once; a few hundred milliseconds) on the blocking
    /// pool, so that a JSON request's `generate` does not do it on an async thread.
    pub async fn prepare_grammar(&self) {
        let engine = self.clone();
        let _ = tokio::task::spawn_blocking(move || engine.grammars().map(|_| ())).await;
    }

    fn grammars(&self) -> Result<&Grammars, LocalError> {
        self.inner
            .grammars
            .get_or_init(|| Grammars::new(&self.inner.tokenizer).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| LocalError::Generation(e.clone()))
    }

    /// The grammar state for `format`: `None` for text.
    fn constraint(
        &self,
        format: Option<&ResponseFormat>,
    ) -> Result<Option<Constraint>, LocalError> {
        let schema = match format {
            None | Some(ResponseFormat::Text) => return Ok(None),
            Some(ResponseFormat::JsonObject) => None,
            Some(ResponseFormat::JsonSchema { json_schema }) => json_schema.schema.as_ref(),
        };
        self.grammars()?.json(schema).map(Some)
    }

    /// The grammar of `auto`'s calls, in the format this model's template teaches.
    fn calls(&self, auto: &AutoCalls) -> Result<Calls, LocalError> {
        let format = self.call_format().ok_or_else(|| {
            LocalError::InvalidRequest("this model's chat template does not call tools".into())
        })?;
        let grammar = self.grammars()?.call(&auto.schema)?;
        Ok(Calls { format, grammar, parallel: auto.parallel })
    }
}

/// The events of one request. Dropping it cancels the request.
pub struct Generation {
    rx: mpsc::UnboundedReceiver<Result<Event, LocalError>>,
    done: bool,
    /// Keeps the model loaded until the answer ends, even if the registry unloads it.
    _engine: Engine,
}

impl Generation {
    /// The whole answer and how it ended; handy for tests and `chat -p`.
    pub async fn collect_text(mut self) -> Result<(String, FinishReason, Usage), LocalError> {
        use futures_util::StreamExt;
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event? {
                Event::Delta(d) => text.push_str(&d),
                Event::Finish { reason, usage } => {
                    return Ok((text, reason, usage.unwrap_or_default()));
                }
                _ => {}
            }
        }
        Err(LocalError::Stopped)
    }
}

impl Stream for Generation {
    type Item = Result<Event, LocalError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                self.done = matches!(item, Ok(Event::Finish { .. }) | Err(_));
                Poll::Ready(Some(item))
            }
            // The thread went away without finishing: say so once.
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(LocalError::Stopped)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn validate(r: &GenerateRequest) -> Result<SamplingParams, LocalError> {
    let bad = |m: &str| Err(LocalError::InvalidRequest(m.to_owned()));
    if r.messages.is_empty() {
        return bad("no messages");
    }
    if r.max_tokens == 0 {
        return bad("max_tokens must be at least 1");
    }
    if !(r.temperature.is_finite() && r.temperature >= 0.0) {
        return bad("temperature must be 0 or more");
    }
    if !(r.top_p > 0.0 && r.top_p <= 1.0) {
        return bad("top_p must be in (0, 1]");
    }
    if !(r.repetition_penalty.is_finite() && r.repetition_penalty > 0.0) {
        return bad("repetition_penalty must be more than 0");
    }
    if ![r.presence_penalty, r.frequency_penalty].iter().all(|p| (-2.0..=2.0).contains(p)) {
        return bad("presence_penalty and frequency_penalty must be between -2 and 2");
    }
    Ok(SamplingParams {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        repetition_penalty: r.repetition_penalty,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
    })
}

/// candle reads its thread counts from the environment when its pools first start, so this
/// must run before any tensor work; an explicit `RAYON_NUM_THREADS` is left alone.
fn set_threads(threads: Option<usize>) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
}
