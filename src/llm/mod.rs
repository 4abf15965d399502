//! Language-model providers behind one abstraction: a `ChatRequest` in, a stream of text
//! deltas out, ending in exactly one `Finish` with the reason and token usage.
//!
//! Remote providers go through one client, `Remote`, in one of two wire dialects: OpenAI's Chat
//! Completions (OpenAI and anything that speaks it, such as HuggingFace's router, vLLM,
//! OpenRouter or llama-server) or HuggingFace's classic text-generation task (TGI). Either way
//! it retries only before the first event reaches the caller, keeps per-phase deadlines
//! (connect, first byte, idle, total), and sits behind a circuit breaker, shareable between the
//! clients of one provider, so that an offline box stops paying a timeout per request.
//! Nothing here knows about HTTP serving or storage.

mod breaker;
mod chat_completions;
mod decode;
mod remote;
mod sse;
mod text_generation;

pub use breaker::{Breaker, BreakerState};
pub use remote::{Dialect, Remote};
pub use sse::{SseError, SseEvent, SseParser};

use futures_util::stream::BoxStream;
use std::time::Duration;

pub use crate::message::{
    Event, FinishReason, JsonSchema, Message, ResponseFormat, Role, Shape, Tool, ToolCall,
    ToolCallDelta, ToolChoice, Usage,
};

/// What to generate.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    pub shape: Shape,
    /// Other OpenAI request fields (`user`, `metadata`, `service_tier`, …), sent verbatim to
    /// upstreams that speak Chat Completions; `Dialect::refuses` names them for the others.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// How to sample; `None` leaves a parameter to the provider's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Generation ends before any of these would appear.
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (in the model's own vocabulary) → bias added to its logit.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each token's log probability, with this many alternatives.
    pub logprobs: Option<u8>,
}

/// The deadline that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    FirstByte,
    Idle,
    Total,
}

/// Why a provider could not answer. `is_retryable` and `reason` drive retries and fallback.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("no API key configured")]
    NotConfigured,
    #[error("circuit open after repeated failures")]
    CircuitOpen,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out waiting ({0:?})")]
    Timeout(Phase),
    /// The upstream answered with an error status; its body is logged, never returned.
    #[error("upstream answered {status}")]
    Status { status: u16, retry_after: Option<Duration> },
    /// The upstream broke its own wire format, or the connection dropped mid-stream.
    #[error("bad upstream stream: {0}")]
    Protocol(String),
}

impl ProviderError {
    /// Connect errors, first-byte timeouts, 429 and 5xx are worth another try.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect(_)
            | ProviderError::Timeout(Phase::Connect | Phase::FirstByte) => true,
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// A short, stable word for logs, metrics and the fallback header.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::NotConfigured => "not_configured",
            ProviderError::CircuitOpen => "circuit_open",
            ProviderError::Connect(_) => "unreachable",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Status { status: 429, .. } => "rate_limited",
            ProviderError::Status { status, .. } if *status >= 500 => "upstream_error",
            ProviderError::Status { .. } => "rejected",
            ProviderError::Protocol(_) => "protocol_error",
        }
    }
}

/// A stream of generation events; dropping it cancels the generation or upstream request.
pub type EventStream = BoxStream<'static, Result<Event, ProviderError>>;

/// Deadlines for one request to a remote provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
}

/// How often and how patiently to retry before the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Exponential backoff with full jitter, or the upstream's `Retry-After` when it gave one
    /// (capped at `max_delay`, so a hostile header cannot park a request).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.max_delay);
        }
        let exp = self.base_delay.saturating_mul(1u32 << attempt.min(16)).min(self.max_delay);
        exp.mul_f64(rand::random::<f64>())
    }
}
