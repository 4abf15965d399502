//! The words every part that handles a conversation shares — the store, the remote providers,
//! the local engine and the chat service — so that none of them has to know another to speak
//! of a turn: its messages, what the answer must look like (tools, a JSON schema), and what a
//! generation yields (deltas and tool-call fragments, then why it ended and what it cost).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering one of the assistant's `tool_calls`.
    Tool,
}

impl Role {
    /// The wire name every chat API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One turn of a conversation, as a model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The functions an assistant turn called (its `content` may then be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// On a `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A turn by `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A function call the model made: `arguments` is JSON text, as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// The call as OpenAI writes it in a message's `tool_calls`.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments; `None` takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// The arguments must validate against `parameters` exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// Exactly this function.
    Function(String),
}

/// The form the answer's text must take; serializes as OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema {
        json_schema: JsonSchema,
    },
}

/// A named JSON schema the answer must validate against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchema {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `None` accepts any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// What the answer must look like beyond text: the tools it may call and the format of its
/// text. The default is plain text and no tools.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shape {
    pub tools: Vec<Tool>,
    /// `None`: the provider's default (`auto` with tools).
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
}

impl Shape {
    /// Tools are offered and the model may call them.
    pub fn offers_tools(&self) -> bool {
        !self.tools.is_empty() && self.tool_choice != Some(ToolChoice::None)
    }
}

/// Why generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn token, a stop string, or the provider's natural end.
    #[default]
    Stop,
    /// `max_tokens` or the context window ran out.
    Length,
    /// The answer is one or more tool calls.
    ToolCalls,
    /// The provider withheld content.
    ContentFilter,
}

impl FinishReason {
    /// The wire name (`finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Token counts of one answer, as the provider (or the local engine) reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "UsageRecord", into = "UsageRecord")]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from a prompt cache instead of computed (OpenAI's
    /// `prompt_tokens_details.cached_tokens`; the local model's prefix cache).
    pub cached_tokens: u32,
}

impl Usage {
    /// Prompt and completion together.
    pub fn total(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// How a usage is stored: with its total, as stored messages have always had it.
#[derive(Serialize, Deserialize)]
struct UsageRecord {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    cached_tokens: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<UsageRecord> for Usage {
    fn from(r: UsageRecord) -> Self {
        let UsageRecord { prompt_tokens, completion_tokens, cached_tokens, .. } = r;
        Usage { prompt_tokens, completion_tokens, cached_tokens }
    }
}

impl From<Usage> for UsageRecord {
    fn from(u: Usage) -> Self {
        let Usage { prompt_tokens, completion_tokens, cached_tokens } = u;
        UsageRecord { prompt_tokens, completion_tokens, total_tokens: u.total(), cached_tokens }
    }
}

/// One item of a generation stream: text deltas (and what else the provider streams), then
/// exactly one `Finish`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    /// A fragment of a tool call, relayed as it came.
    ToolCall(ToolCallDelta),
    /// A fragment of the model's refusal to answer (OpenAI's `refusal`).
    Refusal(String),
    /// Token log probabilities of the chunk (OpenAI's `logprobs.content` items, as sent).
    Logprobs(Vec<Value>),
    /// The upstream's `system_fingerprint`, once.
    Fingerprint(String),
    Finish {
        reason: FinishReason,
        /// `None` when a remote provider reported none.
        usage: Option<Usage>,
    },
}

/// A request field a provider cannot honour, and why: answered with `400` naming the field,
/// never dropped silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// The field as the client wrote it (`tools`, `logit_bias`, …).
    pub field: String,
    pub why: String,
}

impl Unsupported {
    /// `field` is not supported, because `why`.
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> Unsupported {
        Unsupported { field: field.into(), why: why.into() }
    }
}

/// OpenAI fields that describe the caller, not the answer: every provider accepts them, and
/// those that have no use for them change nothing in the answer.
pub const INFORMATIONAL_FIELDS: [&str; 3] = ["user", "metadata", "safety_identifier"];

/// One streamed piece of a tool call: the first piece of an `index` carries its id and name,
/// the rest append to its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_stored_as_it_always_was_and_old_records_read_back() {
        let old = r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}"#;
        let usage: Usage = serde_json::from_str(old).unwrap();
        assert_eq!(usage, Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 0 });
        assert_eq!(serde_json::to_string(&usage).unwrap(), old);
        let cached = Usage { cached_tokens: 1, ..usage };
        let text = serde_json::to_string(&cached).unwrap();
        assert_eq!(
            text,
            r#"{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"cached_tokens":1}"#
        );
        assert_eq!(serde_json::from_str::<Usage>(&text).unwrap(), cached);
    }
}
