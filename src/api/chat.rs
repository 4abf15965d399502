//! `POST /chat`: the seed face's chat, JSON or SSE, and the frame both chat faces share
//! (per-user request and token limits, the fallback header, SSE bodies).

use super::error::rate_limit_headers;
use super::extract::Checks;
use super::{handler, ApiError, App, Doc, Face, Req, Routes};
use crate::chat::{Answerer, ChatInput, Completion, Reply, Step, Thread};
use crate::clock::rfc3339;
use crate::http::{json, Body};
use crate::llm::Sampling;
use crate::message::{Message, Role};
use crate::ratelimit::Decision;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use utoipa::ToSchema;
use uuid::Uuid;

type Answer = Result<Response<Body>, ApiError>;

pub fn routes(r: &mut Routes) {
    r.add(
        http::Method::POST,
        "/chat",
        handler(chat),
        Doc::new("chat", "Chat with a model (JSON, or SSE with \"stream\": true)")
            .secured()
            .body::<ChatBody>()
            .json::<ChatOut>(200)
            .streams()
            .errors(&[404, 429, 502, 503]),
    );
}

/// `POST /chat`. Unknown fields are ignored, as the seed's FastAPI did.
#[derive(Deserialize, ToSchema)]
pub struct ChatBody {
    /// What the user says.
    #[schema(min_length = 1)]
    message: String,
    /// Defaults to `routing.default_model`, else the local model.
    #[serde(default)]
    model: Option<String>,
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(minimum = 1, maximum = 32768)]
    max_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f32>,
    /// Continue this conversation (its earlier turns are the context); omit to start one.
    #[serde(default)]
    conversation_id: Option<String>,
    /// A system prompt for this turn.
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    stream: bool,
}

/// The answer to `POST /chat` (also the last SSE event before `[DONE]`).
#[derive(Serialize, ToSchema)]
pub struct ChatOut {
    response: String,
    conversation_id: String,
    message_id: String,
    /// The model that answered (the local model's name after a fallback).
    model: String,
    /// `openai`, `huggingface` or `local`.
    provider: &'static str,
    /// Whether the local model answered because the chosen provider could not.
    fallback: bool,
    usage: UsageOut,
    created_at: String,
}

/// Token counts of one answer.
#[derive(Serialize, ToSchema)]
pub struct UsageOut {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl UsageOut {
    pub(super) fn of(c: &Completion) -> UsageOut {
        let u = c.usage;
        UsageOut {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// Largest accepted `max_tokens`; providers clamp further to what their model allows.
pub(super) const MAX_TOKENS: u32 = 32_768;

async fn chat(app: Arc<App>, mut req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let body: ChatBody = req.json(&app).await?;
    let limit = admit(&app, principal.user.id)?;
    Checks::default()
        .field("message", non_empty(&body.message))
        .field("max_tokens", check_max_tokens(body.max_tokens))
        .field("temperature", check_temperature(body.temperature))
        .finish()?;
    let thread = match body.conversation_id.as_deref() {
        None | Some("") => Thread::New,
        Some(id) => Thread::Continue(
            Uuid::parse_str(id).map_err(|_| ApiError::NotFound("Conversation not found"))?,
        ),
    };
    let mut messages = Vec::new();
    if let Some(system) = body.system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new(Role::System, system));
    }
    messages.push(Message::new(Role::User, body.message));
    let input = ChatInput {
        user: principal.user.id,
        model: body.model,
        thread,
        messages,
        params: Sampling {
            max_tokens: body.max_tokens,
            temperature: body.temperature,
            ..Sampling::default()
        },
    };
    let user = principal.user.id;
    let mut response = if body.stream {
        let reply = app.chat.start(&input).await?;
        let who = reply.answerer().clone();
        let events = seed_events(app.clone(), user, reply);
        with_answerer(sse(events), &who)
    } else {
        let (who, done) = app.chat.complete(&input).await?;
        charge(&app, user, &done);
        with_answerer(json(StatusCode::OK, &seed_out(&who, &done)), &who)
    };
    rate_limit_headers(response.headers_mut(), &limit, Face::Seed);
    Ok(response)
}

fn seed_out(who: &Answerer, done: &Completion) -> ChatOut {
    let id = |u: Option<Uuid>| u.map(|u| u.to_string()).unwrap_or_default();
    ChatOut {
        response: done.text.clone(),
        conversation_id: id(done.conversation_id),
        message_id: id(done.message_id),
        model: who.model.clone(),
        provider: who.provider.as_str(),
        fallback: who.fallback.is_some(),
        usage: UsageOut::of(done),
        created_at: rfc3339(done.created_at),
    }
}

/// `data: {"delta": …}` per delta, the whole answer object, then `[DONE]`.
fn seed_events(app: Arc<App>, user: Uuid, reply: Reply) -> SseStream {
    steps(reply)
        .map(move |(who, step)| match step {
            Ok(Step::Delta(d)) => vec![data(&serde_json::json!({ "delta": d }))],
            Ok(Step::Done(done)) => {
                charge(&app, user, &done);
                vec![data(&seed_out(&who, &done)), done_event()]
            }
            Err(e) => vec![data(&stream_error(&e))],
        })
        .flat_map(stream::iter)
        .boxed()
}

/// A reply as a stream of (who answers, step), ending after `Done` or an error.
pub(super) fn steps(
    reply: Reply,
) -> stream::BoxStream<'static, (Answerer, Result<Step, crate::chat::ChatError>)> {
    stream::unfold(Some(reply), |state| async move {
        let mut reply = state?;
        let step = reply.next().await?;
        let who = reply.answerer().clone();
        let more = matches!(step, Ok(Step::Delta(_)));
        Some(((who, step), more.then_some(reply)))
    })
    .boxed()
}

/// What a stream says when the answer breaks after it started: no upstream detail.
pub(super) fn stream_error(e: &crate::chat::ChatError) -> Value {
    tracing::warn!(error = %e, "chat stream failed");
    serde_json::json!({"error": {
        "message": format!("The answer was interrupted: {e}"),
        "type": "server_error", "param": null, "code": "stream_interrupted",
    }})
}

/// SSE bytes, one event per item.
pub(super) type SseStream = stream::BoxStream<'static, Bytes>;

pub(super) fn data<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).expect("response types serialize infallibly");
    Bytes::from(format!("data: {json}\n\n"))
}

pub(super) fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// A `text/event-stream` response; dropping it (client gone) drops the reply, which cancels
/// the upstream request or the local generation.
pub(super) fn sse(events: SseStream) -> Response<Body> {
    let frames = events.map(|b| Ok::<_, crate::http::BoxError>(Frame::data(b)));
    let mut r = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Adds `X-Edgechat-Provider`, and `X-Edgechat-Fallback` when the local model stood in.
pub(super) fn with_answerer(mut r: Response<Body>, who: &Answerer) -> Response<Body> {
    let h = r.headers_mut();
    h.insert("x-edgechat-provider", HeaderValue::from_static(who.provider.as_str()));
    if let Some(f) = who.fallback {
        if let Ok(v) = HeaderValue::from_str(&f.header()) {
            h.insert("x-edgechat-fallback", v);
        }
        h.insert("x-edgechat-fallback-reason", HeaderValue::from_static(f.reason));
    }
    r
}

/// The user's chat request limit (taken) and token budget (checked); `429` when over either.
pub(super) fn admit(app: &App, user: Uuid) -> Result<Decision, ApiError> {
    let key = user.simple().to_string();
    let requests = app.chat_requests.check(&key);
    if !requests.allowed {
        return Err(ApiError::RateLimited(requests));
    }
    let tokens = app.chat_tokens.peek(&key);
    if !tokens.allowed {
        return Err(ApiError::TokensLimited(tokens));
    }
    Ok(requests)
}

/// Counts a finished answer's tokens against the user's budget.
pub(super) fn charge(app: &App, user: Uuid, done: &Completion) {
    let n = done.usage.prompt_tokens.saturating_add(done.usage.completion_tokens);
    app.chat_tokens.charge(&user.simple().to_string(), n);
}

/// An optional count that also accepts `53.0`: JSON Schema (and pydantic) call that an integer.
pub(super) fn whole_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    Ok(whole(d)?.map(|v| u32::try_from(v.max(0)).unwrap_or(u32::MAX)))
}

/// An optional 64-bit integer (a sampling seed), also as a whole float.
pub(super) fn whole_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
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

fn non_empty(text: &str) -> Result<(), &'static str> {
    match text.trim().is_empty() {
        true => Err("must not be empty"),
        false => Ok(()),
    }
}

pub(super) fn check_max_tokens(v: Option<u32>) -> Result<(), &'static str> {
    match v {
        Some(n) if n == 0 || n > MAX_TOKENS => Err("must be between 1 and 32768"),
        _ => Ok(()),
    }
}

pub(super) fn check_temperature(v: Option<f32>) -> Result<(), &'static str> {
    match v {
        Some(t) if !(0.0..=2.0).contains(&t) => Err("must be between 0 and 2"),
        _ => Ok(()),
    }
}
