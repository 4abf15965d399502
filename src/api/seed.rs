//! The seed face's request and answer, shared by `POST /chat` and background jobs (a job stores
//! the request as accepted and, when done, exactly the answer `POST /chat` would have given).

use super::extract::Checks;
use super::shape::{ResponseFormatIn, ShapeIn};
use crate::chat::{Answerer, ChatInput, Completion, Thread};
use crate::jobs::JobAnswer;
use crate::llm::Sampling;
use crate::message::{Message, Role, Shape, Usage};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// `POST /chat` and `POST /chat/background`. Unknown fields are ignored, as the seed's FastAPI
/// did.
#[derive(Deserialize, ToSchema)]
pub struct SeedRequest {
    /// What the user says (not only white space).
    #[schema(min_length = 1, pattern = "\\S")]
    pub message: String,
    /// Defaults to `routing.default_model`, else the local model.
    #[serde(default)]
    #[schema(max_length = 256)]
    pub model: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 32768)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// Continue this conversation (its earlier turns are the context); omit to start one.
    #[serde(default)]
    pub conversation_id: Option<String>,
    /// A system prompt for this turn.
    #[serde(default)]
    pub system: Option<String>,
    /// Answer as server-sent events (`POST /chat` only).
    #[serde(default)]
    pub stream: bool,
    /// JSON output: `{"type": "json_object"}`, or `json_schema` with a schema, as on the OpenAI
    /// face.
    #[serde(default)]
    pub response_format: Option<ResponseFormatIn>,
}

impl SeedRequest {
    /// The answer's shape (its response format), each problem reported in `checks`.
    pub fn shape(&self, checks: &mut Checks) -> Shape {
        let given = ShapeIn {
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: self.response_format.as_ref(),
        };
        given.check(checks)
    }

    /// The chat input for `user`, shaped by `shape`; `None` when `conversation_id` cannot name a
    /// conversation.
    pub fn input(&self, user: Uuid, shape: Shape) -> Option<ChatInput> {
        let thread = match self.conversation_id.as_deref() {
            None | Some("") => Thread::New,
            Some(id) => Thread::Continue(Uuid::parse_str(id).ok()?),
        };
        let mut messages = Vec::new();
        if let Some(system) = self.system.as_ref().filter(|s| !s.trim().is_empty()) {
            messages.push(Message::new(Role::System, system.clone()));
        }
        messages.push(Message::new(Role::User, self.message.clone()));
        let params = Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            ..Sampling::default()
        };
        let model = self.model.clone();
        Some(ChatInput { user, model, thread, messages, params, shape, extra: Default::default() })
    }
}

/// The answer to `POST /chat` (also its last SSE event, and a background job's result).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SeedAnswer {
    pub response: String,
    pub conversation_id: String,
    pub message_id: String,
    /// The model that answered (the local model's name after a fallback).
    pub model: String,
    /// `openai`, `huggingface` or `local`.
    pub provider: String,
    /// Whether the local model answered because the chosen provider could not.
    pub fallback: bool,
    pub usage: UsageOut,
    pub created_at: String,
}

impl SeedAnswer {
    /// The answer object for a completion stored as `conversation_id` / `message_id`.
    pub fn new(who: &Answerer, done: &Completion) -> SeedAnswer {
        JobAnswer::new(who, done).into()
    }
}

/// A background job's stored answer is the answer `POST /chat` gives.
impl From<JobAnswer> for SeedAnswer {
    fn from(a: JobAnswer) -> SeedAnswer {
        SeedAnswer {
            response: a.response,
            conversation_id: a.conversation_id,
            message_id: a.message_id,
            model: a.model,
            provider: a.provider,
            fallback: a.fallback,
            usage: UsageOut::from(&a.usage),
            created_at: a.created_at,
        }
    }
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl From<&Usage> for UsageOut {
    fn from(u: &Usage) -> UsageOut {
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
        }
    }
}

/// An optional count that also accepts `53.0`: JSON Schema (and pydantic) call that an integer.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(whole(d)?.map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX)))
}

/// An optional 64-bit integer (a sampling seed), also as a whole float.
pub fn whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    whole(d)
}

fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    let in_range = |f: f64| f.fract() == 0.0 && f > i64::MIN as f64 && f < i64::MAX as f64;
    match n.as_i64().or_else(|| n.as_f64().filter(|f| in_range(*f)).map(|f| f as i64)) {
        Some(v) => Ok(Some(v)),
        None => Err(D::Error::custom(format!("expected a 64-bit whole number, got {n}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Completion;
    use crate::config::ProviderName;
    use crate::message::{FinishReason, Usage};

    #[test]
    fn a_jobs_stored_answer_reads_as_the_answer_post_chat_gives() {
        let who = Answerer { model: "m".into(), provider: ProviderName::LOCAL, fallback: None };
        let done = Completion {
            text: "hello".into(),
            finish: FinishReason::Stop,
            usage: Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 1 },
            conversation_id: Some(Uuid::now_v7()),
            message_id: Some(Uuid::now_v7()),
            created_at: 1_700_000_000_000,
            ..Completion::default()
        };
        // Stored before the record had its own type: the answer object itself.
        let answer = serde_json::to_value(SeedAnswer::new(&who, &done)).unwrap();
        let read: JobAnswer = serde_json::from_value(answer.clone()).unwrap();
        assert_eq!(serde_json::to_value(SeedAnswer::from(read)).unwrap(), answer);
    }
}
