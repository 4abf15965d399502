//! A client for OpenAI's Chat Completions wire format, streaming (SSE) always, so that the
//! first token can be forwarded as soon as it exists and a stall is noticed per chunk.
//! Base URL and key are configurable: OpenAI, Azure-style gateways, OpenRouter, vLLM,
//! llama-server and HuggingFace's router all speak it.

use super::sse::{SseEvent, SseParser};
use super::{
    Breaker, ChatRequest, Event, EventStream, FinishReason, Phase, ProviderError, RetryPolicy,
    Timeouts, Usage,
};
use crate::secret::Secret;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

/// Upstream error bodies are logged up to this many bytes (redacted), never returned.
const LOGGED_BODY: usize = 512;

/// One OpenAI-compatible endpoint.
pub struct OpenAiCompatible {
    name: String,
    url: String,
    api_key: Option<Secret>,
    client: reqwest::Client,
    timeouts: Timeouts,
    retry: RetryPolicy,
    breaker: Arc<Breaker>,
}

impl OpenAiCompatible {
    /// A client for `{base_url}/chat/completions`; without a key the provider counts as down.
    pub fn new(
        name: &str,
        base_url: &str,
        api_key: Option<Secret>,
        timeouts: Timeouts,
        retry: RetryPolicy,
        breaker: Breaker,
    ) -> Result<OpenAiCompatible, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Connect(e.to_string()))?;
        Ok(OpenAiCompatible {
            name: name.to_string(),
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
            client,
            timeouts,
            retry,
            breaker: Arc::new(breaker),
        })
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
        if !self.breaker.allow() {
            return Err(ProviderError::CircuitOpen);
        }
        let deadline = Instant::now() + self.timeouts.total;
        let mut attempt = 0;
        loop {
            let error = match self.attempt(req, key, deadline).await {
                Ok(stream) => {
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
        req: &ChatRequest,
        key: &Secret,
        deadline: Instant,
    ) -> Result<EventStream, ProviderError> {
        let first_deadline = deadline.min(Instant::now() + self.timeouts.first_byte);
        let send = self.client.post(&self.url).bearer_auth(key.expose()).json(&body(req)).send();
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
        let mut events = event_stream(
            self.name.clone(),
            response.bytes_stream().boxed(),
            self.timeouts.idle,
            deadline,
            self.breaker.clone(),
        );
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

/// The upstream request: always streamed, usage requested in the last chunk.
fn body(req: &ChatRequest) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
        .collect();
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(v) = req.max_tokens {
        body["max_tokens"] = v.into();
    }
    if let Some(v) = req.temperature {
        body["temperature"] = v.into();
    }
    if let Some(v) = req.top_p {
        body["top_p"] = v.into();
    }
    if let Some(v) = req.seed {
        body["seed"] = v.into();
    }
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    body
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

struct State {
    provider: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    queue: VecDeque<Event>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    done: bool,
    idle: Duration,
    deadline: Instant,
    breaker: Arc<Breaker>,
}

/// Turns the response body into events; dropping the stream drops the connection.
fn event_stream(
    provider: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    idle: Duration,
    deadline: Instant,
    breaker: Arc<Breaker>,
) -> EventStream {
    let state = State {
        provider,
        body,
        parser: SseParser::default(),
        queue: VecDeque::new(),
        finish: None,
        usage: None,
        done: false,
        idle,
        deadline,
        breaker,
    };
    stream::unfold(state, |mut s| async move {
        match s.next_event().await {
            Ok(Some(event)) => Some((Ok(event), s)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(provider = %s.provider, error = %e, "stream failed");
                s.breaker.failure();
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
                        return Err(ProviderError::Protocol("stream ended before [DONE]".into()));
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
        if event.data.trim() == "[DONE]" {
            self.done = true;
            let reason = self.finish.unwrap_or(FinishReason::Stop);
            self.queue.push_back(Event::Finish { reason, usage: self.usage });
            return Ok(());
        }
        let chunk: Value = serde_json::from_str(&event.data)
            .map_err(|e| ProviderError::Protocol(format!("malformed chunk: {e}")))?;
        if chunk.get("error").is_some() {
            tracing::warn!(provider = %self.provider, body = %redact(&event.data), "error event mid-stream");
            return Err(ProviderError::Protocol("upstream sent an error event".into()));
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            });
        }
        if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
            if let Some(text) =
                choice.pointer("/delta/content").and_then(Value::as_str).filter(|t| !t.is_empty())
            {
                self.queue.push_back(Event::Delta(text.to_string()));
            }
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some("length") => self.finish = Some(FinishReason::Length),
                Some(_) => self.finish = Some(FinishReason::Stop),
                None => {}
            }
        }
        Ok(())
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
    fn the_body_carries_only_set_parameters() {
        let req = ChatRequest {
            model: "gpt-4o-mini".into(),
            messages: vec![crate::message::Message::new(crate::message::Role::User, "hi")],
            max_tokens: Some(5),
            ..Default::default()
        };
        let b = body(&req);
        assert_eq!(b["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!((b["max_tokens"].as_u64(), b["stream"].as_bool()), (Some(5), Some(true)));
        assert!(b.get("temperature").is_none() && b.get("stop").is_none());
    }
}
