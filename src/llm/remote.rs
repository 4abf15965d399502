//! One streaming client for remote providers, speaking either of two wire dialects: OpenAI's
//! Chat Completions or HuggingFace's classic text-generation task (TGI). Streaming (SSE) always,
//! so that the first token can be forwarded as soon as it exists and a stall is noticed per
//! chunk. Retries, deadlines, breaker accounting, redaction and error classification live here
//! once; the dialect modules only build the request and read its chunks.

use super::decode::{Decode, DecodeError};
use super::sse::{SseEvent, SseParser};
use super::{
    chat_completions, text_generation, Breaker, ChatRequest, Event, EventStream, Phase,
    ProviderError, RetryPolicy, Timeouts,
};
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

/// Upstream error bodies are logged up to this many bytes (redacted), never returned.
const LOGGED_BODY: usize = 512;

/// The wire format a remote endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI Chat Completions at `{base_url}/chat/completions`: OpenAI, Azure-style gateways,
    /// OpenRouter, vLLM, llama-server and HuggingFace's router all speak it.
    ChatCompletions,
    /// HuggingFace's classic text-generation task (TGI) at `{base_url}/{model}`, for models
    /// only served there; the conversation is sent as a plain transcript.
    TextGeneration,
}

impl Dialect {
    /// Where a request for `model` goes.
    fn url(self, base: &str, model: &str) -> Result<String, ProviderError> {
        match self {
            Dialect::ChatCompletions => Ok(format!("{base}/chat/completions")),
            Dialect::TextGeneration => text_generation::url(base, model),
        }
    }

    fn body(self, req: &ChatRequest) -> Value {
        match self {
            Dialect::ChatCompletions => chat_completions::body(req),
            Dialect::TextGeneration => text_generation::body(req),
        }
    }

    /// The first field of `req` this dialect cannot honour (Chat Completions relays them all).
    pub fn refuses(self, req: &ChatRequest) -> Option<crate::message::Unsupported> {
        match self {
            Dialect::ChatCompletions => None,
            Dialect::TextGeneration => text_generation::refuses(req),
        }
    }

    fn decoder(self) -> Box<dyn Decode> {
        match self {
            Dialect::ChatCompletions => Box::<chat_completions::Decoder>::default(),
            Dialect::TextGeneration => Box::<text_generation::Decoder>::default(),
        }
    }
}

/// One remote endpoint in one dialect.
pub struct Remote {
    name: String,
    base_url: String,
    dialect: Dialect,
    api_key: Option<Secret>,
    client: reqwest::Client,
    timeouts: Timeouts,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
}

impl Remote {
    /// A client for `base_url` in `dialect`; without a key the provider counts as down. The
    /// breaker is shared so that two clients of one provider open and close together.
    pub fn new(
        name: &str,
        base_url: &str,
        dialect: Dialect,
        api_key: Option<Secret>,
        timeouts: Timeouts,
        retry: RetryPolicy,
        breaker: Arc<Breaker>,
    ) -> Result<Remote, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Connect(e.to_string()))?;
        Ok(Remote {
            name: name.to_string(),
            base_url: base_url.trim_end_matches('/').to_string(),
            dialect,
            api_key,
            client,
            timeouts,
            retry,
            breaker,
        })
    }

    /// The first field of `req` this endpoint's dialect cannot honour.
    pub fn refuses(&self, req: &ChatRequest) -> Option<crate::message::Unsupported> {
        self.dialect.refuses(req)
    }

    /// The provider's configured name (`openai`, `huggingface`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The breaker guarding this endpoint.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Starts a generation. Returns once the first event arrived, retrying retryable failures
    /// until then; after that, failures end the stream with an error instead.
    pub async fn chat(&self, req: &ChatRequest) -> Result<EventStream, ProviderError> {
        let key = self.api_key.as_ref().ok_or(ProviderError::NotConfigured)?;
        let url = self.dialect.url(&self.base_url, &req.model)?;
        if !self.breaker.allow() {
            return Err(ProviderError::CircuitOpen);
        }
        let body = self.dialect.body(req);
        let deadline = Instant::now() + self.timeouts.total;
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let error = match self.attempt(&url, &body, key, deadline).await {
                Ok(stream) => {
                    crate::metrics::upstream_latency(&self.name, started.elapsed());
                    self.breaker.success();
                    return Ok(stream);
                }
                Err(e) => e,
            };
            let retry_after = match &error {
                ProviderError::Status { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = self.retry.delay(attempt, retry_after);
            attempt += 1;
            if !error.is_retryable()
                || attempt >= self.retry.attempts
                || Instant::now() + delay >= deadline
            {
                if unwell(&error) {
                    self.breaker.failure();
                }
                return Err(error);
            }
            tracing::warn!(provider = %self.name, attempt, error = %error, delay_ms = delay.as_millis() as u64, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        url: &str,
        body: &Value,
        key: &Secret,
        deadline: Instant,
    ) -> Result<EventStream, ProviderError> {
        let first_deadline = deadline.min(Instant::now() + self.timeouts.first_byte);
        let send = self.client.post(url).bearer_auth(key.expose()).json(body).send();
        let response = timeout_at(first_deadline, send)
            .await
            .map_err(|_| ProviderError::Timeout(Phase::FirstByte))?
            .map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let text = timeout_at(first_deadline, response.text()).await.ok().and_then(Result::ok);
            tracing::warn!(provider = %self.name, status = status.as_u16(), body = %redact(text.as_deref().unwrap_or("")), "upstream refused");
            return Err(ProviderError::Status { status: status.as_u16(), retry_after });
        }
        let state = State {
            provider: self.name.clone(),
            body: response.bytes_stream().boxed(),
            parser: SseParser::default(),
            decoder: self.dialect.decoder(),
            queue: VecDeque::new(),
            done: false,
            idle: self.timeouts.idle,
            deadline,
            breaker: self.breaker.clone(),
            started: false,
        };
        let mut events = event_stream(state);
        match timeout_at(first_deadline, events.next()).await {
            Err(_) => Err(ProviderError::Timeout(Phase::FirstByte)),
            Ok(None) => Err(ProviderError::Protocol("empty stream".into())),
            Ok(Some(Err(e))) => Err(e),
            Ok(Some(Ok(first))) => Ok(stream::once(async { Ok(first) }).chain(events).boxed()),
        }
    }
}

/// Failures that say the endpoint is unwell (as opposed to this request being bad).
fn unwell(e: &ProviderError) -> bool {
    !matches!(e, ProviderError::Status { status: 400 | 404 | 413 | 422, .. })
}

fn classify(e: reqwest::Error) -> ProviderError {
    if e.is_connect() {
        ProviderError::Connect(e.to_string())
    } else if e.is_timeout() {
        ProviderError::Timeout(Phase::Connect)
    } else {
        ProviderError::Protocol(e.to_string())
    }
}

/// Logs must not carry keys an upstream echoes back: long token-like words are masked.
fn redact(text: &str) -> String {
    let cut: String = text.chars().take(LOGGED_BODY).collect();
    cut.split_inclusive(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .map(|w| {
            let word =
                w.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            if word.len() >= 20 {
                w.replacen(word, "[redacted]", 1)
            } else {
                w.to_string()
            }
        })
        .collect()
}

/// One response body being read: bytes → SSE events → the dialect's decoder → our events.
struct State {
    provider: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    decoder: Box<dyn Decode>,
    queue: VecDeque<Event>,
    done: bool,
    idle: Duration,
    deadline: Instant,
    breaker: Arc<Breaker>,
    /// Whether an event went out: failures before that are counted by `chat`'s retry loop.
    started: bool,
}

/// Turns the response body into events; dropping the stream drops the connection.
fn event_stream(state: State) -> EventStream {
    stream::unfold(state, |mut s| async move {
        match s.next_event().await {
            Ok(Some(event)) => {
                s.started = true;
                Some((Ok(event), s))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(provider = %s.provider, error = %e, "stream failed");
                if s.started {
                    s.breaker.failure();
                }
                s.done = true;
                s.queue.clear();
                Some((Err(e), s))
            }
        }
    })
    .boxed()
}

impl State {
    async fn next_event(&mut self) -> Result<Option<Event>, ProviderError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            let wait = self.deadline.min(Instant::now() + self.idle);
            let mut events = Vec::new();
            match timeout_at(wait, self.body.next()).await {
                Err(_) if Instant::now() >= self.deadline => {
                    return Err(ProviderError::Timeout(Phase::Total))
                }
                Err(_) => return Err(ProviderError::Timeout(Phase::Idle)),
                Ok(Some(Err(e))) => {
                    return Err(ProviderError::Protocol(format!("connection broke: {e}")))
                }
                Ok(Some(Ok(bytes))) => self
                    .parser
                    .feed(&bytes, &mut events)
                    .map_err(|e| ProviderError::Protocol(e.to_string()))?,
                Ok(None) => {
                    self.parser.finish(&mut events);
                    for e in events.drain(..) {
                        self.handle(e)?;
                    }
                    if !self.done {
                        let why = "stream ended before its final event";
                        return Err(ProviderError::Protocol(why.into()));
                    }
                }
            }
            for e in events {
                self.handle(e)?;
            }
        }
    }

    fn handle(&mut self, event: SseEvent) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        match self.decoder.decode(&event.data, &mut self.queue) {
            Ok(done) => {
                self.done = done;
                Ok(())
            }
            Err(DecodeError::Malformed(why)) => {
                Err(ProviderError::Protocol(format!("malformed chunk: {why}")))
            }
            Err(DecodeError::ErrorEvent) => {
                tracing::warn!(provider = %self.provider, body = %redact(&event.data), "error event mid-stream");
                Err(ProviderError::Protocol("upstream sent an error event".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_masks_long_tokens_only() {
        let out = redact(r#"{"error": "bad key sk-abcdefghijklmnopqrstuvwxyz012345 given"}"#);
        assert_eq!(out, r#"{"error": "bad key [redacted] given"}"#);
        assert_eq!(redact("short words stay"), "short words stay");
    }

    #[test]
    fn each_dialect_has_its_own_url() {
        let base = "https://api-inference.huggingface.co/models";
        let url = Dialect::TextGeneration.url(base, "HuggingFaceH4/zephyr-7b-beta").unwrap();
        assert_eq!(url, format!("{base}/HuggingFaceH4/zephyr-7b-beta"));
        let url = Dialect::ChatCompletions.url("https://api.openai.com/v1", "gpt-4o").unwrap();
        assert_eq!(url, "https://api.openai.com/v1/chat/completions");
    }
}
