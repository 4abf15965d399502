//! What a background job stores: its own versioned request record, not an HTTP body, so that a
//! change to the API cannot change the format of jobs already queued; and its answer, in the
//! shape `POST /chat` answers (which `GET /chat/tasks/{id}` returns as is).

use crate::chat::{Answerer, ChatInput, Completion, Thread};
use crate::clock::rfc3339;
use crate::llm::Sampling;
use crate::message::{Message, ResponseFormat, Role, Shape, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The request record's format. Records without `version` are version 0: the `/chat` body as
/// builds before it stored them (upgraded when the job service starts).
const VERSION: u32 = 1;

/// A chat to run in the background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// `VERSION` when written.
    pub version: u32,
    pub model: Option<String>,
    /// The conversation this turn continues; `None` starts one.
    pub conversation_id: Option<Uuid>,
    /// This turn's messages (a system prompt, then the user's).
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

impl JobRequest {
    /// The record of `input` (its sampling fields beyond these are not queued: the seed face,
    /// the only one with background jobs, sets no others).
    pub fn of(input: &ChatInput) -> JobRequest {
        JobRequest {
            version: VERSION,
            model: input.model.clone(),
            conversation_id: match input.thread {
                Thread::Continue(id) => Some(id),
                Thread::New | Thread::Unstored => None,
            },
            messages: input.messages.clone(),
            max_tokens: input.params.max_tokens,
            temperature: input.params.temperature,
            response_format: input.shape.response_format.clone(),
        }
    }

    /// The chat input it stands for, on behalf of `user`.
    pub fn input(&self, user: Uuid) -> ChatInput {
        ChatInput {
            user,
            model: self.model.clone(),
            thread: self.conversation_id.map_or(Thread::New, Thread::Continue),
            messages: self.messages.clone(),
            params: Sampling {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                ..Sampling::default()
            },
            shape: Shape { response_format: self.response_format.clone(), ..Shape::default() },
            extra: Default::default(),
        }
    }

    /// Reads a stored request of any version; `None` when it is neither.
    pub fn read(stored: &Value) -> Option<JobRequest> {
        match stored.get("version") {
            Some(_) => serde_json::from_value(stored.clone()).ok(),
            None => serde_json::from_value::<BodyV0>(stored.clone()).ok().map(BodyV0::upgrade),
        }
    }

    /// The current record for a stored request of an older version; `None` when it is
    /// current already (or unreadable: its job then fails with a clear error).
    pub fn upgrade(stored: &Value) -> Option<Value> {
        if stored.get("version").is_some() {
            return None;
        }
        let record = JobRequest::read(stored)?;
        Some(serde_json::to_value(record).expect("records serialize"))
    }
}

/// Version 0: the `POST /chat` body as it was queued.
#[derive(Deserialize)]
struct BodyV0 {
    message: String,
    model: Option<String>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    conversation_id: Option<String>,
    system: Option<String>,
}

impl BodyV0 {
    fn upgrade(self) -> JobRequest {
        let conversation_id = match self.conversation_id.as_deref() {
            None | Some("") => None,
            // Checked when it was queued; a bad one fails as a missing conversation.
            Some(id) => Some(Uuid::parse_str(id).unwrap_or(Uuid::nil())),
        };
        let system = self.system.filter(|s| !s.trim().is_empty());
        let messages = system
            .map(|s| Message::new(Role::System, s))
            .into_iter()
            .chain([Message::new(Role::User, self.message)])
            .collect();
        JobRequest {
            version: VERSION,
            model: self.model,
            conversation_id,
            messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            response_format: None,
        }
    }
}

/// A succeeded job's answer, stored in the shape of `POST /chat`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAnswer {
    pub response: String,
    pub conversation_id: String,
    pub message_id: String,
    pub model: String,
    pub provider: String,
    pub fallback: bool,
    pub usage: Usage,
    pub created_at: String,
}

impl JobAnswer {
    /// The answer `who` gave in `done`.
    pub fn new(who: &Answerer, done: &Completion) -> JobAnswer {
        let id = |u: Option<Uuid>| u.map(|u| u.to_string()).unwrap_or_default();
        JobAnswer {
            response: done.text.clone(),
            conversation_id: id(done.conversation_id),
            message_id: id(done.message_id),
            model: who.model.clone(),
            provider: who.provider.as_str().to_string(),
            fallback: who.fallback.is_some(),
            usage: done.usage,
            created_at: rfc3339(done.created_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_queued_chat_body_upgrades_to_the_record() {
        let conv = Uuid::now_v7();
        let v0 = json!({"message": "hi", "model": "m", "max_tokens": 5, "temperature": null,
            "conversation_id": conv.to_string(), "system": "be brief", "stream": false});
        let record = JobRequest::read(&v0).unwrap();
        assert_eq!(record.conversation_id, Some(conv));
        assert_eq!(
            record.messages,
            vec![Message::new(Role::System, "be brief"), Message::new(Role::User, "hi")]
        );
        let upgraded = JobRequest::upgrade(&v0).unwrap();
        assert_eq!(upgraded["version"], 1);
        assert_eq!(JobRequest::read(&upgraded), Some(record));
        assert_eq!(JobRequest::upgrade(&upgraded), None, "a current record stays as it is");
        let blank = json!({"message": "hi", "system": "  ", "conversation_id": ""});
        let record = JobRequest::read(&blank).unwrap();
        assert_eq!((record.messages.len(), record.conversation_id), (1, None));
    }
}
