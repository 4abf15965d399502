//! The OpenAI face: `POST /v1/chat/completions` (JSON and `chat.completion.chunk` SSE) and
//! `GET /v1/models`, so that the official SDKs work by pointing `base_url` here. Every field of
//! OpenAI's request is honoured or refused with `400` naming it (the provider that answers
//! decides which); fields OpenAI does not define are ignored, as OpenAI ignores them. Errors
//! are OpenAI-shaped (see `api::error`).

use super::error::rate_limit_headers;
use super::extract::Checks;
use super::frame::{
    admit, check_input_size, check_max_tokens, check_model, check_temperature, data, done_event,
    sse, stream_error, streamed, whole, with_answerer, Progress, SseStream,
};
use super::seed::{whole_i64, whole_number};
use super::shape::{ResponseFormatIn, ShapeIn, ToolCallIn, ToolChoiceIn, ToolIn};
use super::{handler, ApiError, App, Doc, Face, Req, Routes};
use crate::chat::{Answerer, ChatInput, Completion, Step, Thread};
use crate::llm::Sampling;
use crate::message::{Message, Role};
use crate::message::{ToolCall, ToolCallDelta};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

type Answer = Result<Response<crate::http::Body>, ApiError>;

pub fn routes(r: &mut Routes) {
    let doc = |summary| Doc::new("openai", summary).secured();
    r.add(
        Method::POST,
        "/v1/chat/completions",
        handler(completions),
        doc("OpenAI Chat Completions (JSON, or chat.completion.chunk SSE with stream: true)")
            .body::<CompletionRequest>()
            .refine(cross_field_rules)
            .json::<CompletionOut>(200)
            .streams()
            .errors(&[400, 404, 429, 502, 503]),
    );
    r.add(
        Method::GET,
        "/v1/models",
        handler(models),
        doc("The models this server can answer now, with the provider that owns each")
            .json::<ModelList>(200),
    );
}

/// OpenAI request fields relayed verbatim to upstreams that speak Chat Completions (and
/// refused by the others, except the informational `user`, `metadata`, `safety_identifier`).
const RELAYED: [&str; 13] = [
    "user",
    "metadata",
    "safety_identifier",
    "service_tier",
    "reasoning_effort",
    "verbosity",
    "prediction",
    "modalities",
    "audio",
    "web_search_options",
    "prompt_cache_key",
    "functions",
    "function_call",
];

/// The Chat Completions request. Every OpenAI field is honoured or refused by name; the ones
/// not listed here (`user`, `metadata`, `service_tier`, `reasoning_effort`, …) are relayed to
/// Chat Completions upstreams as given. Fields OpenAI does not define are ignored.
#[derive(Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[schema(max_length = 256)]
    model: String,
    #[schema(min_items = 1)]
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 32768)]
    max_tokens: Option<u32>,
    /// Wins over `max_tokens` when both are given.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 32768)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f32>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    top_p: Option<f64>,
    /// A string or a list of at most 4 strings.
    #[serde(default)]
    #[schema(schema_with = stop_schema)]
    stop: Option<Stop>,
    #[serde(default, deserialize_with = "whole_i64")]
    seed: Option<i64>,
    /// Only 1 is supported.
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 1)]
    n: Option<u32>,
    /// Stored as a conversation unless false.
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    #[schema(min_items = 0, max_items = 128)]
    tools: Option<Vec<ToolIn>>,
    #[serde(default)]
    tool_choice: Option<ToolChoiceIn>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<ResponseFormatIn>,
    #[serde(default)]
    logprobs: Option<bool>,
    /// Alternatives per token, with `logprobs: true` (else there are no log probabilities).
    #[serde(default, deserialize_with = "whole_i64")]
    #[schema(minimum = 0, maximum = 20)]
    top_logprobs: Option<i64>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    frequency_penalty: Option<f32>,
    /// Token id (as a string) → bias from -100 to 100.
    #[serde(default)]
    #[schema(value_type = Option<std::collections::HashMap<String, f64>>)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    /// The OpenAI fields in `RELAYED`, and any others (which are ignored).
    #[serde(flatten)]
    #[schema(ignore)]
    rest: serde_json::Map<String, Value>,
}

/// `stream_options`.
#[derive(Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Where generation stops: one string or a list.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// One message of the conversation so far.
#[derive(Deserialize, ToSchema)]
pub struct InMessage {
    role: InRole,
    /// Text, or a list of text parts; may be null on an assistant turn that calls tools.
    #[serde(default)]
    content: Option<InContent>,
    /// The functions an assistant turn called.
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallIn>>,
    /// On a `tool` message: the call it answers.
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// Who said it; `developer` is OpenAI's newer name for `system`; `tool` answers a tool call.
#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InRole {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// `content`: a string, or parts of which only `text` ones are supported.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InContent {
    Text(String),
    Parts(Vec<TextPart>),
}

/// `{"type": "text", "text": …}`.
#[derive(Deserialize, ToSchema)]
pub struct TextPart {
    /// Checked by deserializing; nothing else to do with it.
    #[serde(rename = "type")]
    #[allow(dead_code)]
    kind: TextKind,
    text: String,
}

/// Only `text` parts are supported (no images or audio).
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    Text,
}

/// A non-streamed completion.
#[derive(Serialize, ToSchema)]
pub struct CompletionOut {
    id: String,
    object: &'static str,
    created: i64,
    model: String,
    #[schema(value_type = Vec<Object>)]
    choices: Vec<Value>,
    usage: UsageV1,
    system_fingerprint: Option<String>,
}

/// OpenAI's usage object: the counts, and how many prompt tokens came from a prompt cache
/// (the local model's, or the upstream's as it reported them).
#[derive(Serialize, ToSchema)]
pub struct UsageV1 {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptTokensDetails,
}

/// Where the prompt tokens came from.
#[derive(Serialize, ToSchema)]
pub struct PromptTokensDetails {
    cached_tokens: u32,
}

impl UsageV1 {
    fn of(done: &Completion) -> Self {
        let u = done.usage;
        UsageV1 {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
            prompt_tokens_details: PromptTokensDetails { cached_tokens: u.cached_tokens },
        }
    }
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    object: &'static str,
    data: Vec<ModelOut>,
}

/// One model and its provider.
#[derive(Serialize, ToSchema)]
pub struct ModelOut {
    id: String,
    object: &'static str,
    created: i64,
    /// `local`, `openai` or `huggingface`.
    owned_by: &'static str,
}

async fn models(app: Arc<App>, req: Req) -> Answer {
    req.principal(&app).await?;
    let created = app.started_unix();
    let data = app
        .chat
        .models()
        .into_iter()
        .map(|(id, p)| ModelOut { id, object: "model", created, owned_by: p.as_str() })
        .collect();
    Ok(crate::http::json(StatusCode::OK, &ModelList { object: "list", data }))
}

async fn completions(app: Arc<App>, mut req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let body: CompletionRequest = req.json(&app).await?;
    let limit = admit(&app, principal.user.id)?;
    let input = input(&app, principal.user.id, &body)?;
    let (user, access) = (principal.user.id, req.access());
    let id = format!("chatcmpl-{}", Uuid::now_v7().simple());
    let mut response = if body.stream {
        let usage = body.stream_options.is_some_and(|o| o.include_usage);
        let (who, steps) = streamed(&app, user, &input, access).await?;
        with_answerer(sse(chunks(steps, id, usage)), &who)
    } else {
        let (who, done) = whole(&app, user, &input, &access).await?;
        with_answerer(crate::http::json(StatusCode::OK, &completion(id, &who, &done)), &who)
    };
    rate_limit_headers(response.headers_mut(), &limit, Face::OpenAi);
    Ok(response)
}

/// Most stop sequences in one request, as OpenAI allows.
const MAX_STOP: usize = 4;

fn input(app: &App, user: Uuid, body: &CompletionRequest) -> Result<ChatInput, ApiError> {
    let mut checks = Checks::default();
    checks
        .field("model", check_model(Some(&body.model)))
        .field("messages", check_messages(&body.messages))
        .field("stop", check_stop(body.stop.as_ref()))
        .field("max_tokens", check_max_tokens(body.max_tokens))
        .field("max_completion_tokens", check_max_tokens(body.max_completion_tokens))
        .field("temperature", check_temperature(body.temperature))
        .field("n", if body.n.unwrap_or(1) == 1 { Ok(()) } else { Err("only n = 1 is supported") });
    let messages: Vec<Message> = body.messages.iter().map(message).collect();
    let texts = messages.iter().flat_map(|m| {
        std::iter::once(m.content.as_str()).chain(m.tool_calls.iter().map(|c| c.arguments.as_str()))
    });
    check_input_size(&mut checks, app, "messages", texts);
    let shape = ShapeIn {
        tools: body.tools.as_deref(),
        tool_choice: body.tool_choice.as_ref(),
        parallel_tool_calls: body.parallel_tool_calls,
        response_format: body.response_format.as_ref(),
    }
    .check(&mut checks);
    let params = sampling(&mut checks, body);
    checks.finish()?;
    let extra = body.rest.iter().filter(|(k, _)| RELAYED.contains(&k.as_str()));
    Ok(ChatInput {
        user,
        model: Some(body.model.clone()),
        thread: if body.store == Some(false) { Thread::Unstored } else { Thread::New },
        messages,
        params,
        shape,
        extra: extra.map(|(k, v)| (k.clone(), v.clone())).collect(),
    })
}

/// How to sample, each problem reported in `checks`.
fn sampling(checks: &mut Checks, body: &CompletionRequest) -> Sampling {
    if body.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        checks.field("top_p", Err("must be in (0, 1]"));
    }
    let penalties = [
        ("presence_penalty", body.presence_penalty),
        ("frequency_penalty", body.frequency_penalty),
    ];
    for (field, v) in penalties {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            checks.field(field, Err("must be between -2 and 2"));
        }
    }
    Sampling {
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
        // A top_p too small for f32 still means "only the most likely token".
        top_p: body.top_p.map(|p| (p as f32).max(f32::MIN_POSITIVE)),
        stop: stop_list(body.stop.as_ref()),
        seed: body.seed.map(|s| s as u64),
        presence_penalty: body.presence_penalty,
        frequency_penalty: body.frequency_penalty,
        logit_bias: logit_bias(checks, body.logit_bias.as_ref()),
        logprobs: logprobs(checks, body.logprobs, body.top_logprobs),
    }
}

/// `logit_bias`: token ids (as strings) to biases from -100 to 100.
fn logit_bias(
    checks: &mut Checks,
    bias: Option<&serde_json::Map<String, Value>>,
) -> Vec<(u32, f32)> {
    let mut out = Vec::new();
    for (token, b) in bias.into_iter().flatten() {
        match (token.parse::<u32>(), b.as_f64().filter(|b| (-100.0..=100.0).contains(b))) {
            (Ok(id), Some(b)) => out.push((id, b as f32)),
            _ => {
                checks.field("logit_bias", Err("must map token ids to numbers from -100 to 100"));
                break;
            }
        }
    }
    out
}

/// `logprobs` and `top_logprobs` as one setting: `None`, or how many alternatives.
fn logprobs(checks: &mut Checks, on: Option<bool>, top: Option<i64>) -> Option<u8> {
    match (on.unwrap_or(false), top) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            checks.field("top_logprobs", Err("must be between 0 and 20"));
            None
        }
        (true, top) => Some(top.unwrap_or(0) as u8),
        // Without `logprobs` there are none to give, alternatives or not.
        (false, _) => None,
    }
}

/// A conversation needs something to answer: at least one user message; a tool result names
/// its call, and only assistant turns call tools.
fn check_messages(messages: &[InMessage]) -> Result<(), &'static str> {
    if messages.is_empty() {
        Err("must not be empty")
    } else if !messages.iter().any(|m| m.role == InRole::User) {
        Err("must contain at least one message with role `user`")
    } else if messages.iter().any(|m| m.role == InRole::Tool && m.tool_call_id.is_none()) {
        Err("a message with role `tool` needs its `tool_call_id`")
    } else if messages.iter().any(|m| m.role != InRole::Assistant && m.tool_calls.is_some()) {
        Err("only messages with role `assistant` may have `tool_calls`")
    } else {
        Ok(())
    }
}

/// `stop` as documented: null, one string, or a list of up to `MAX_STOP`.
fn stop_schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String);
    let list = ArrayBuilder::new().items(text()).max_items(Some(MAX_STOP));
    let null = ObjectBuilder::new().schema_type(Type::Null);
    OneOfBuilder::new().item(text()).item(list).item(null).into()
}

/// The document says what the checks require across fields, in JSON Schema words utoipa
/// cannot write: a user message (`contains`), a tool result's call id, tool calls only on
/// assistant turns, tools for a `required` or named `tool_choice`, token ids as `logit_bias`
/// keys.
fn cross_field_rules(components: &mut serde_json::Map<String, Value>) {
    if let Some(request) = components.get_mut("CompletionRequest") {
        if let Some(messages) = request.pointer_mut("/properties/messages") {
            messages["contains"] = json!({
                "type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}
            });
        }
        if let Some(bias) = request.pointer_mut("/properties/logit_bias") {
            bias["propertyNames"] = json!({"pattern": "^[0-9]{1,9}$"});
            bias["additionalProperties"] =
                json!({"type": "number", "minimum": -100, "maximum": 100});
        }
        request["allOf"] = json!([{
            "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [
                {"const": "required"}, {"type": "object"}
            ]}}},
            "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
        }]);
    }
    if let Some(message) = components.get_mut("InMessage") {
        message["allOf"] = json!([
            {"if": {"properties": {"role": {"const": "tool"}}},
             "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string"}}}},
            {"if": {"properties": {"role": {"not": {"const": "assistant"}}}},
             "then": {"properties": {"tool_calls": {"type": "null"}}}},
        ]);
    }
}

fn check_stop(stop: Option<&Stop>) -> Result<(), &'static str> {
    match stop {
        Some(Stop::Many(items)) if items.len() > MAX_STOP => {
            const _: () = assert!(MAX_STOP == 4, "the message below names the limit");
            Err("must have at most 4 sequences")
        }
        _ => Ok(()),
    }
}

fn message(m: &InMessage) -> Message {
    let role = match m.role {
        InRole::System | InRole::Developer => Role::System,
        InRole::User => Role::User,
        InRole::Assistant => Role::Assistant,
        InRole::Tool => Role::Tool,
    };
    let content = match &m.content {
        None => String::new(),
        Some(InContent::Text(s)) => s.clone(),
        Some(InContent::Parts(parts)) => parts.iter().map(|p| p.text.as_str()).collect(),
    };
    Message {
        tool_calls: m.tool_calls.iter().flatten().map(ToolCallIn::call).collect(),
        tool_call_id: m.tool_call_id.clone(),
        ..Message::new(role, content)
    }
}

/// The stop strings; empty ones could never match and are dropped.
fn stop_list(stop: Option<&Stop>) -> Vec<String> {
    let list = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(items)) => items.clone(),
    };
    list.into_iter().filter(|s| !s.is_empty()).collect()
}

fn completion(id: String, who: &Answerer, done: &Completion) -> CompletionOut {
    let calls: Vec<Value> = done.tool_calls.iter().map(ToolCall::to_openai).collect();
    let content = match done.text.is_empty() && (!calls.is_empty() || done.refusal.is_some()) {
        true => Value::Null,
        false => done.text.as_str().into(),
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": done.refusal});
    if !calls.is_empty() {
        message["tool_calls"] = calls.into();
    }
    CompletionOut {
        id,
        object: "chat.completion",
        created: done.created_at / 1000,
        model: who.model.clone(),
        choices: vec![json!({
            "index": 0,
            "message": message,
            "logprobs": logprobs_out(&done.logprobs),
            "finish_reason": done.finish.as_str(),
        })],
        usage: UsageV1::of(done),
        system_fingerprint: done.fingerprint.clone(),
    }
}

/// A choice's `logprobs`: null when none were asked for (or given).
fn logprobs_out(items: &[Value]) -> Value {
    match items.is_empty() {
        true => Value::Null,
        false => json!({"content": items, "refusal": null}),
    }
}

/// A streamed tool-call fragment as OpenAI sends it: id, type and name only on the first.
fn tool_call_delta(d: &ToolCallDelta) -> Value {
    let mut function = json!({"arguments": d.arguments});
    if let Some(name) = &d.name {
        function["name"] = name.as_str().into();
    }
    let mut call = json!({"index": d.index, "function": function});
    if let Some(id) = &d.id {
        call["id"] = id.as_str().into();
        call["type"] = "function".into();
    }
    json!({"tool_calls": [call]})
}

/// The frame of every `chat.completion.chunk` of one answer.
struct Chunker {
    id: String,
    created: i64,
    /// `stream_options.include_usage`: every chunk has `usage`, null but in the last.
    usage: bool,
}

impl Chunker {
    fn chunk(&self, p: &Progress, delta: Value, finish: Option<&str>) -> Value {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": p.who.model, "system_fingerprint": p.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The chunks of one step: a delta (text, refusal, tool-call fragment, log probabilities),
    /// or the finish reason, usage when asked for, and `[DONE]`.
    fn events(&self, p: &Progress) -> Vec<Bytes> {
        let delta = |d: Value| vec![data(&self.chunk(p, d, None))];
        match &p.step {
            Ok(Step::Delta(d)) => delta(json!({ "content": d })),
            Ok(Step::Refusal(r)) => delta(json!({ "refusal": r })),
            Ok(Step::ToolCall(d)) => delta(tool_call_delta(d)),
            Ok(Step::Logprobs(items)) => {
                let mut c = self.chunk(p, json!({}), None);
                c["choices"][0]["logprobs"] = logprobs_out(items);
                vec![data(&c)]
            }
            Ok(Step::Done(done)) => {
                let mut out = vec![data(&self.chunk(p, json!({}), Some(done.finish.as_str())))];
                if self.usage {
                    let mut last = self.chunk(p, json!({}), None);
                    last["choices"] = json!([]);
                    last["usage"] = json!(UsageV1::of(done));
                    out.push(data(&last));
                }
                out.push(done_event());
                out
            }
            Err(e) => vec![data(&stream_error(e))],
        }
    }
}

/// `chat.completion.chunk` events: the role, each step's chunks, then `[DONE]`.
fn chunks(steps: stream::BoxStream<'static, Progress>, id: String, usage: bool) -> SseStream {
    let chunker = Chunker { id, created: crate::clock::now_ms() / 1000, usage };
    let mut first = true;
    let all = steps.map(move |p| {
        let mut out = chunker.events(&p);
        // The role goes first, in the first step's frame (the fingerprint is known by then).
        if std::mem::take(&mut first) {
            let role = json!({"role": "assistant", "content": ""});
            out.insert(0, data(&chunker.chunk(&p, role, None)));
        }
        out
    });
    all.flat_map(stream::iter).boxed()
}
