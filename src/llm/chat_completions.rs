//! OpenAI's Chat Completions dialect: the request body and the reading of its stream chunks
//! (`choices[0].delta.content`, a `finish_reason`, a usage-only chunk, then `[DONE]`).

use super::decode::{Decode, DecodeError};
use super::{
    ChatRequest, Event, FinishReason, Message, Shape, ToolCall, ToolCallDelta, ToolChoice, Usage,
};
use serde_json::{json, Value};
use std::collections::VecDeque;

/// The upstream request: always streamed, usage requested in the last chunk; the other OpenAI
/// fields the caller gave are relayed as they came.
pub(super) fn body(req: &ChatRequest) -> Value {
    let messages: Vec<Value> = req.messages.iter().map(message).collect();
    let mut body = Value::Object(req.extra.clone());
    let base = json!({
        "model": req.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    body.as_object_mut().expect("an object").extend(base.as_object().expect("an object").clone());
    sampling(&mut body, req);
    shape(&mut body, &req.shape);
    body
}

/// A message as OpenAI takes it: an assistant's tool calls, a tool result's call id.
fn message(m: &Message) -> Value {
    let mut out = json!({"role": m.role.as_str(), "content": m.content});
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = m.tool_calls.iter().map(ToolCall::to_openai).collect();
        if m.content.is_empty() {
            out["content"] = Value::Null;
        }
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = id.as_str().into();
    }
    out
}

fn sampling(body: &mut Value, req: &ChatRequest) {
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
    let s = &req.sampling;
    for (key, v) in
        [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)]
    {
        if let Some(v) = v {
            body[key] = v.into();
        }
    }
    if !s.logit_bias.is_empty() {
        let bias: serde_json::Map<String, Value> =
            s.logit_bias.iter().map(|(id, b)| (id.to_string(), number(*b))).collect();
        body["logit_bias"] = bias.into();
    }
    if let Some(n) = s.logprobs {
        body["logprobs"] = true.into();
        if n > 0 {
            body["top_logprobs"] = n.into();
        }
    }
}

/// A whole number as an integer (as clients write biases), anything else as a float.
fn number(v: f32) -> Value {
    match v.fract() == 0.0 {
        true => json!(v as i64),
        false => json!(v),
    }
}

/// Tools, the tool choice and the response format, in OpenAI's words.
fn shape(body: &mut Value, shape: &Shape) {
    if !shape.tools.is_empty() {
        let tools: Vec<Value> =
            shape.tools.iter().map(|t| json!({"type": "function", "function": t})).collect();
        body["tools"] = tools.into();
    }
    if let Some(choice) = &shape.tool_choice {
        body["tool_choice"] = match choice {
            ToolChoice::None => "none".into(),
            ToolChoice::Auto => "auto".into(),
            ToolChoice::Required => "required".into(),
            ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
        };
    }
    if let Some(v) = shape.parallel_tool_calls {
        body["parallel_tool_calls"] = v.into();
    }
    if let Some(format) = &shape.response_format {
        body["response_format"] = serde_json::to_value(format).expect("formats serialize");
    }
}

/// Remembers the finish reason and usage, which arrive in chunks before `[DONE]`, and whether
/// the fingerprint was passed on.
#[derive(Debug, Default)]
pub(super) struct Decoder {
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    fingerprint: bool,
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
        if let Some(f) = chunk.get("system_fingerprint").and_then(Value::as_str) {
            if !std::mem::replace(&mut self.fingerprint, true) {
                out.push_back(Event::Fingerprint(f.to_string()));
            }
        }
        if let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) {
            choice_events(choice, out);
            self.finish = match choice.get("finish_reason").and_then(Value::as_str) {
                Some("length") => Some(FinishReason::Length),
                Some("tool_calls" | "function_call") => Some(FinishReason::ToolCalls),
                Some("content_filter") => Some(FinishReason::ContentFilter),
                Some(_) => Some(FinishReason::Stop),
                None => self.finish,
            };
        }
        Ok(false)
    }
}

/// The events of one streamed choice: text, refusal and tool-call fragments, log probabilities.
fn choice_events(choice: &Value, out: &mut VecDeque<Event>) {
    let text = |key: &str| {
        choice.pointer(&format!("/delta/{key}")).and_then(Value::as_str).filter(|t| !t.is_empty())
    };
    if let Some(t) = text("content") {
        out.push_back(Event::Delta(t.to_string()));
    }
    if let Some(t) = text("refusal") {
        out.push_back(Event::Refusal(t.to_string()));
    }
    let calls = choice.pointer("/delta/tool_calls").and_then(Value::as_array);
    for call in calls.into_iter().flatten() {
        let s = |p: &str| call.pointer(p).and_then(Value::as_str).map(str::to_string);
        out.push_back(Event::ToolCall(ToolCallDelta {
            index: call.get("index").and_then(Value::as_u64).unwrap_or(0) as u32,
            id: s("/id"),
            name: s("/function/name"),
            arguments: s("/function/arguments").unwrap_or_default(),
        }));
    }
    let logprobs = choice.pointer("/logprobs/content").and_then(Value::as_array);
    if let Some(items) = logprobs.filter(|l| !l.is_empty()) {
        out.push_back(Event::Logprobs(items.clone()));
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
            ..Default::default()
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
