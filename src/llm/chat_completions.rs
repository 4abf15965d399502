//! OpenAI's Chat Completions dialect: the request body and the reading of its stream chunks
//! (`choices[0].delta.content`, a `finish_reason`, a usage-only chunk, then `[DONE]`).

use super::decode::{Decode, DecodeError};
use super::{ChatRequest, Event, FinishReason, Usage};
use serde_json::{json, Value};
use std::collections::VecDeque;

/// The upstream request: always streamed, usage requested in the last chunk.
pub(super) fn body(req: &ChatRequest) -> Value {
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
    if let Some(v) = req.sampling.max_tokens {
        body["max_tokens"] = v.into();
    }
    if let Some(v) = req.sampling.temperature {
        body["temperature"] = v.into();
    }
    if let Some(v) = req.sampling.top_p {
        body["top_p"] = v.into();
    }
    if let Some(v) = req.sampling.seed {
        body["seed"] = v.into();
    }
    if !req.sampling.stop.is_empty() {
        body["stop"] = json!(req.sampling.stop);
    }
    body
}

/// Remembers the finish reason and usage, which arrive in chunks before `[DONE]`.
#[derive(Debug, Default)]
pub(super) struct Decoder {
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl Decode for Decoder {
    fn decode(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, DecodeError> {
        if data.trim() == "[DONE]" {
            let reason = self.finish.unwrap_or(FinishReason::Stop);
            out.push_back(Event::Finish { reason, usage: self.usage });
            return Ok(true);
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if chunk.get("error").is_some() {
            return Err(DecodeError::ErrorEvent);
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
            self.usage = Some(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
                cached_tokens: u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as u32,
            });
        }
        if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
            if let Some(text) =
                choice.pointer("/delta/content").and_then(Value::as_str).filter(|t| !t.is_empty())
            {
                out.push_back(Event::Delta(text.to_string()));
            }
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some("length") => self.finish = Some(FinishReason::Length),
                Some(_) => self.finish = Some(FinishReason::Stop),
                None => {}
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Sampling;
    use crate::message::{Message, Role};

    #[test]
    fn the_body_carries_only_set_parameters() {
        let req = ChatRequest {
            model: "gpt-4o-mini".into(),
            messages: vec![Message::new(Role::User, "hi")],
            sampling: Sampling { max_tokens: Some(5), ..Default::default() },
        };
        let b = body(&req);
        assert_eq!(b["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!((b["max_tokens"].as_u64(), b["stream"].as_bool()), (Some(5), Some(true)));
        assert!(b.get("temperature").is_none() && b.get("stop").is_none());
    }

    #[test]
    fn done_ends_with_the_remembered_reason_and_usage() {
        let mut d = Decoder::default();
        let mut out = VecDeque::new();
        let chunks = [
            r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#,
        ];
        for c in chunks {
            assert_eq!(d.decode(c, &mut out), Ok(false));
        }
        assert_eq!(d.decode("[DONE]", &mut out), Ok(true));
        let usage = Some(Usage { prompt_tokens: 2, completion_tokens: 1, cached_tokens: 0 });
        let finish = Event::Finish { reason: FinishReason::Length, usage };
        assert_eq!(Vec::from(out), vec![Event::Delta("Hi".into()), finish]);
        assert_eq!(d.decode(r#"{"error":{}}"#, &mut VecDeque::new()), Err(DecodeError::ErrorEvent));
    }
}
