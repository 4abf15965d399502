//! The words every part that handles a conversation shares — the store, the remote providers,
//! the local engine and the chat service — so that none of them has to know another to speak
//! of a turn: its messages, and what a generation yields (deltas, then why it ended and what
//! it cost).

use serde::{Deserialize, Serialize};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The wire name every chat API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation, as a model sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    /// A turn by `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into() }
    }
}

/// Why generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token, a stop string, or the provider's natural end.
    Stop,
    /// `max_tokens` or the context window ran out.
    Length,
}

impl FinishReason {
    /// The wire name (`finish_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
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

/// One item of a generation stream: text deltas, then exactly one `Finish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Delta(String),
    Finish {
        reason: FinishReason,
        /// `None` when a remote provider reported none.
        usage: Option<Usage>,
    },
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
