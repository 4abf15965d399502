//! HuggingFace's classic text-generation task (the TGI wire format): one prompt string in, SSE
//! events of one token each out, the last of which carries `generated_text` and the details.
//! There is no `[DONE]`: that last event ends the stream.

use super::decode::{Decode, DecodeError};
use super::{
    ChatRequest, Event, FinishReason, Message, ProviderError, ResponseFormat, Role, Usage,
};
use crate::message::{Unsupported, INFORMATIONAL_FIELDS};
use serde_json::{json, Value};
use std::collections::VecDeque;

/// `{base_url}/{model}`. The model id goes into the path verbatim, so anything that could step
/// out of `{base_url}/` (`..`, `?`, `#`, `%`, …) is refused, as the upstream would refuse an
/// unknown model, before the key is sent anywhere else.
pub(super) fn url(base: &str, model: &str) -> Result<String, ProviderError> {
    let plain = |s: &str| {
        !matches!(s, "" | "." | "..")
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if model.split('/').all(plain) {
        return Ok(format!("{base}/{model}"));
    }
    tracing::warn!(model = %model.escape_debug(), "model id is not a repository path");
    Err(ProviderError::Status { status: 400, retry_after: None })
}

/// The upstream request: always streamed, with details so that the last event has the finish
/// reason and token counts. HF refuses a temperature of 0 (and a `top_p` of 1), so those are
/// expressed as greedy decoding (and no nucleus filter); any other temperature asks for
/// sampling explicitly, since TGI would otherwise decode greedily at 1.0.
pub(super) fn body(req: &ChatRequest) -> Value {
    let mut p = json!({"return_full_text": false, "details": true});
    if let Some(v) = req.sampling.max_tokens {
        p["max_new_tokens"] = v.into();
    }
    match req.sampling.temperature {
        Some(t) if t <= 0.0 => p["do_sample"] = false.into(),
        Some(t) => {
            p["do_sample"] = true.into();
            p["temperature"] = t.into();
        }
        None => {}
    }
    if let Some(v) = req.sampling.top_p.filter(|&v| v < 1.0) {
        p["top_p"] = v.into();
    }
    if let Some(v) = req.sampling.seed {
        p["seed"] = v.into();
    }
    if !req.sampling.stop.is_empty() {
        p["stop"] = json!(req.sampling.stop);
    }
    if let Some(v) = req.sampling.frequency_penalty {
        p["frequency_penalty"] = v.into();
    }
    if let Some(grammar) = grammar(req.shape.response_format.as_ref()) {
        p["grammar"] = grammar;
    }
    json!({"inputs": transcript(&req.messages), "parameters": p, "stream": true})
}

/// TGI's JSON grammar for a JSON response format.
fn grammar(format: Option<&ResponseFormat>) -> Option<Value> {
    let schema = match format? {
        ResponseFormat::Text => return None,
        ResponseFormat::JsonObject => json!({"type": "object"}),
        ResponseFormat::JsonSchema { json_schema } => {
            json_schema.schema.clone().unwrap_or_else(|| json!({}))
        }
    };
    Some(json!({"type": "json", "value": schema}))
}

/// The first field of `req` this API cannot honour: it has no tools, no log probabilities,
/// no presence penalty or logit bias, and none of OpenAI's other options.
pub(super) fn refuses(req: &ChatRequest) -> Option<Unsupported> {
    const WHY: &str =
        "is not supported by HuggingFace's text-generation API (use a model served by the router)";
    let s = &req.sampling;
    let asked = [
        ("tools", !req.shape.tools.is_empty()),
        ("tool_choice", req.shape.tool_choice.is_some()),
        ("parallel_tool_calls", req.shape.parallel_tool_calls.is_some()),
        ("logprobs", s.logprobs.is_some()),
        ("presence_penalty", s.presence_penalty.is_some()),
        ("logit_bias", !s.logit_bias.is_empty()),
    ];
    let extra = req.extra.keys().find(|k| !INFORMATIONAL_FIELDS.contains(&k.as_str()));
    let field = asked.iter().find(|(_, on)| *on).map(|(f, _)| *f).or(extra.map(String::as_str))?;
    Some(Unsupported::new(field, format!("{field} {WHY}")))
}

/// The task takes one string, so the conversation becomes a plain transcript that ends where
/// the assistant's next turn begins.
pub(super) fn transcript(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        let who = match m.role {
            Role::System => "System",
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::Tool => "Tool",
        };
        out.push_str(&format!("{who}: {}\n\n", m.content));
    }
    out.push_str("Assistant:");
    out
}

/// Stateless: every event stands alone and the last one carries the totals.
#[derive(Debug, Default)]
pub(super) struct Decoder;

impl Decode for Decoder {
    fn decode(&mut self, data: &str, out: &mut VecDeque<Event>) -> Result<bool, DecodeError> {
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if chunk.get("error").is_some() {
            return Err(DecodeError::ErrorEvent);
        }
        let token = chunk.get("token").filter(|t| t.get("special") != Some(&Value::Bool(true)));
        if let Some(text) =
            token.and_then(|t| t.get("text")).and_then(Value::as_str).filter(|t| !t.is_empty())
        {
            out.push_back(Event::Delta(text.to_string()));
        }
        if chunk.get("generated_text").is_none_or(Value::is_null) {
            return Ok(false);
        }
        out.push_back(finish(chunk.get("details").filter(|d| d.is_object())));
        Ok(true)
    }
}

/// The `Finish` for the last event's details. Prompt tokens come from `prefill` when the
/// upstream listed it, else from newer TGI's `input_length`, else are unknown (0).
fn finish(details: Option<&Value>) -> Event {
    let reason = match details.and_then(|d| d.get("finish_reason")).and_then(Value::as_str) {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let count = |d: &Value, k: &str| d.get(k).and_then(Value::as_u64).map(|n| n as u32);
    let usage = details.and_then(|d| {
        let prefill = d.get("prefill").and_then(Value::as_array).filter(|p| !p.is_empty());
        let prompt_tokens =
            prefill.map(|p| p.len() as u32).or_else(|| count(d, "input_length")).unwrap_or(0);
        Some(Usage {
            prompt_tokens,
            completion_tokens: count(d, "generated_tokens")?,
            cached_tokens: 0,
        })
    });
    Event::Finish { reason, usage }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Sampling;

    #[test]
    fn the_transcript_labels_turns_and_opens_the_assistant_s() {
        let messages = [
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello."),
            Message::new(Role::User, "Bye"),
        ];
        let want = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:";
        assert_eq!(transcript(&messages), want);
        assert_eq!(transcript(&[]), "Assistant:");
    }

    #[test]
    fn the_body_carries_only_set_parameters_and_greedy_for_zero_temperature() {
        let req = ChatRequest {
            messages: vec![Message::new(Role::User, "hi")],
            sampling: Sampling { temperature: Some(0.0), top_p: Some(1.0), ..Default::default() },
            ..Default::default()
        };
        let want = json!({"inputs": "User: hi\n\nAssistant:", "stream": true,
            "parameters": {"return_full_text": false, "details": true, "do_sample": false}});
        assert_eq!(body(&req), want);
        let sampling = Sampling { temperature: Some(0.5), top_p: Some(0.25), ..req.sampling };
        let req = ChatRequest { sampling, ..req };
        let p = &body(&req)["parameters"];
        assert_eq!((p["temperature"].as_f64(), p["top_p"].as_f64()), (Some(0.5), Some(0.25)));
        assert_eq!(p["do_sample"], true);
    }

    #[test]
    fn model_ids_must_be_repository_paths() {
        assert!(url("http://h/models", "org/name-1.5_b").is_ok());
        for bad in ["", "../x", "org/../../v1", "a//b", "a?b", "a#b", "a%2e", "a b", "/a"] {
            let err = url("http://h/models", bad).unwrap_err();
            assert_eq!(err, ProviderError::Status { status: 400, retry_after: None }, "{bad}");
        }
    }

    #[test]
    fn special_tokens_are_skipped_and_the_generated_text_ends_the_stream() {
        let mut d = Decoder;
        let mut out = VecDeque::new();
        let tok = r#"{"token":{"id":1,"text":"Hi","logprob":-0.1,"special":false},"generated_text":null,"details":null}"#;
        assert_eq!(d.decode(tok, &mut out), Ok(false));
        let last = r#"{"token":{"id":2,"text":"</s>","logprob":0.0,"special":true},"generated_text":"Hi",
            "details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,"input_length":5}}"#;
        assert_eq!(d.decode(last, &mut out), Ok(true));
        let usage = Some(Usage { prompt_tokens: 5, completion_tokens: 2, cached_tokens: 0 });
        let finish = Event::Finish { reason: FinishReason::Stop, usage };
        assert_eq!(Vec::from(out), vec![Event::Delta("Hi".into()), finish]);
        let err = d.decode(r#"{"error":"boom","error_type":"generation"}"#, &mut VecDeque::new());
        assert_eq!(err, Err(DecodeError::ErrorEvent));
        assert!(matches!(d.decode("{", &mut VecDeque::new()), Err(DecodeError::Malformed(_))));
    }
}
