//! The OpenAI face: `POST /v1/chat/completions` (JSON and `chat.completion.chunk` SSE) and
//! `GET /v1/models`, so that the official SDKs work by pointing `base_url` here. Unknown
//! request fields are ignored, as OpenAI does; errors are OpenAI-shaped (see `api::error`).

use super::error::rate_limit_headers;
use super::extract::Checks;
use super::frame::{
    admit, charge, check_input_size, check_max_tokens, check_model, check_temperature, data,
    done_event, sse, steps, stream_error, with_answerer, SseStream,
};
use super::seed::{whole_i64, whole_number};
use super::{handler, ApiError, App, Doc, Face, Req, Routes};
use crate::chat::{Answerer, ChatInput, Completion, Reply, Step, Thread};
use crate::llm::Sampling;
use crate::message::{Message, Role};
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
            .refine(needs_a_user_message)
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

/// The Chat Completions request; fields not listed are accepted and ignored.
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
    /// Text, or a list of text parts; may be null on an assistant turn.
    #[serde(default)]
    content: Option<InContent>,
}

/// Who said it; `developer` is OpenAI's newer name for `system`.
#[derive(Deserialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InRole {
    System,
    Developer,
    User,
    Assistant,
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
    #[schema(value_type = Option<String>)]
    system_fingerprint: Option<()>,
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
    let user = principal.user.id;
    let id = format!("chatcmpl-{}", Uuid::now_v7().simple());
    let mut response = if body.stream {
        let usage = body.stream_options.is_some_and(|o| o.include_usage);
        let reply = app.chat.start(&input).await?;
        let who = reply.answerer().clone();
        with_answerer(sse(chunks(app.clone(), user, reply, id, usage)), &who)
    } else {
        let (who, done) = app.chat.complete(&input).await?;
        charge(&app, user, &done);
        with_answerer(crate::http::json(StatusCode::OK, &completion(id, &who, &done)), &who)
    };
    rate_limit_headers(response.headers_mut(), &limit, Face::OpenAi);
    Ok(response)
}

/// Most stop sequences in one request, as OpenAI allows.
const MAX_STOP: usize = 4;

fn input(app: &App, user: Uuid, body: &CompletionRequest) -> Result<ChatInput, ApiError> {
    let mut checks = Checks::default();
    let max_tokens = body.max_completion_tokens.or(body.max_tokens);
    checks
        .field("model", check_model(Some(&body.model)))
        .field("messages", check_messages(&body.messages))
        .field("stop", check_stop(body.stop.as_ref()))
        .field("max_tokens", check_max_tokens(body.max_tokens))
        .field("max_completion_tokens", check_max_tokens(body.max_completion_tokens))
        .field("temperature", check_temperature(body.temperature))
        .field("n", if body.n.unwrap_or(1) == 1 { Ok(()) } else { Err("only n = 1 is supported") });
    if body.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        checks.field("top_p", Err("must be in (0, 1]"));
    }
    // A top_p too small for f32 still means "only the most likely token".
    let top_p = body.top_p.map(|p| (p as f32).max(f32::MIN_POSITIVE));
    let messages: Vec<Message> = body.messages.iter().map(message).collect();
    check_input_size(&mut checks, app, "messages", messages.iter().map(|m| m.content.as_str()));
    checks.finish()?;
    Ok(ChatInput {
        user,
        model: Some(body.model.clone()),
        thread: if body.store == Some(false) { Thread::Unstored } else { Thread::New },
        messages,
        params: Sampling {
            max_tokens,
            temperature: body.temperature,
            top_p,
            stop: stop_list(body.stop.as_ref()),
            seed: body.seed.map(|s| s as u64),
        },
    })
}

/// A conversation needs something to answer: at least one user message.
fn check_messages(messages: &[InMessage]) -> Result<(), &'static str> {
    if messages.is_empty() {
        Err("must not be empty")
    } else if !messages.iter().any(|m| m.role == InRole::User) {
        Err("must contain at least one message with role `user`")
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

/// The document says what `check_messages` requires (JSON Schema's `contains`, which utoipa
/// cannot write).
fn needs_a_user_message(components: &mut serde_json::Map<String, Value>) {
    let messages =
        components.get_mut("CompletionRequest").and_then(|s| s.pointer_mut("/properties/messages"));
    if let Some(messages) = messages {
        messages["contains"] = json!({
            "type": "object", "required": ["role"], "properties": {"role": {"const": "user"}}
        });
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
    };
    let content = match &m.content {
        None => String::new(),
        Some(InContent::Text(s)) => s.clone(),
        Some(InContent::Parts(parts)) => parts.iter().map(|p| p.text.as_str()).collect(),
    };
    Message::new(role, content)
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
    CompletionOut {
        id,
        object: "chat.completion",
        created: done.created_at / 1000,
        model: who.model.clone(),
        choices: vec![json!({
            "index": 0,
            "message": {"role": "assistant", "content": done.text, "refusal": null},
            "logprobs": null,
            "finish_reason": done.finish.as_str(),
        })],
        usage: UsageV1::of(done),
        system_fingerprint: None,
    }
}

/// `chat.completion.chunk` events: the role, each delta, the finish reason, optionally usage,
/// then `[DONE]`.
fn chunks(app: Arc<App>, user: Uuid, reply: Reply, id: String, usage: bool) -> SseStream {
    let created = crate::clock::now_ms() / 1000;
    let chunk = move |model: &str, delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let model = reply.answerer().model.clone();
    let first = data(&chunk(&model, json!({"role": "assistant", "content": ""}), None));
    let rest = steps(reply).map(move |(who, step)| match step {
        Ok(Step::Delta(d)) => vec![data(&chunk(&who.model, json!({ "content": d }), None))],
        Ok(Step::Done(done)) => {
            charge(&app, user, &done);
            let mut out = vec![data(&chunk(&who.model, json!({}), Some(done.finish.as_str())))];
            if usage {
                let mut last = chunk(&who.model, json!({}), None);
                last["choices"] = json!([]);
                last["usage"] = json!(UsageV1::of(&done));
                out.push(data(&last));
            }
            out.push(done_event());
            out
        }
        Err(e) => vec![data(&stream_error(&e))],
    });
    stream::once(async move { first }).chain(rest.flat_map(stream::iter)).boxed()
}
