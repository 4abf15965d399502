//! The frame both chat faces share: per-user request and token limits, the checks of the
//! fields they have in common, the answerer headers and SSE bodies.

use super::access::Access;
use super::extract::Checks;
use super::{ApiError, App};
use crate::chat::{Answerer, ChatInput, Completion, Step};
use crate::http::Body;
use crate::ratelimit::Decision;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use uuid::Uuid;

/// Largest accepted `max_tokens`; providers clamp further to what their model allows.
pub(super) const MAX_TOKENS: u32 = 32_768;

/// One step of a reply, with who answers and the upstream's fingerprint so far.
pub(super) struct Progress {
    pub who: Answerer,
    pub fingerprint: Option<String>,
    pub step: Result<Step, crate::chat::ChatError>,
}

/// Starts `user`'s streamed answer: who answers, and its steps, ending after `Done` or an
/// error. The finished answer is charged to the user; the access line learns who answered,
/// the first token's time, the tokens, or the failure.
pub(super) async fn streamed(
    app: &Arc<App>,
    user: Uuid,
    input: &ChatInput,
    access: Arc<Access>,
) -> Result<(Answerer, stream::BoxStream<'static, Progress>), ApiError> {
    let reply = app.chat.start(input).await?;
    let who = reply.answerer().clone();
    access.answerer(&who);
    let app = app.clone();
    let steps = stream::unfold(Some(reply), move |state| {
        let (app, access) = (app.clone(), access.clone());
        async move {
            let mut reply = state?;
            let step = reply.next().await?;
            match &step {
                Ok(Step::Done(done)) => {
                    charge(&app, user, done);
                    access.answered(done);
                }
                Ok(Step::Logprobs(_)) => {}
                Ok(_) => {
                    if let Some(elapsed) = access.first_token() {
                        crate::metrics::first_token(reply.answerer().provider.as_str(), elapsed);
                    }
                }
                Err(_) => access.failed(),
            }
            let who = reply.answerer().clone();
            let fingerprint = reply.fingerprint().map(str::to_owned);
            let more = step.as_ref().is_ok_and(|s| !matches!(s, Step::Done(_)));
            Some((Progress { who, fingerprint, step }, more.then_some(reply)))
        }
    });
    Ok((who, steps.boxed()))
}

/// `user`'s whole answer, charged to them and noted in the access line.
pub(super) async fn whole(
    app: &App,
    user: Uuid,
    input: &ChatInput,
    access: &Access,
) -> Result<(Answerer, Completion), ApiError> {
    let (who, done) = app.chat.complete(input).await?;
    charge(app, user, &done);
    access.answerer(&who);
    access.answered(&done);
    Ok((who, done))
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
        crate::metrics::rate_limited("chat_per_user.requests");
        return Err(ApiError::RateLimited(requests));
    }
    let tokens = app.chat_tokens.peek(&key);
    if !tokens.allowed {
        crate::metrics::rate_limited("chat_per_user.tokens");
        return Err(ApiError::TokensLimited(tokens));
    }
    Ok(requests)
}

/// Counts a finished answer's tokens against the user's budget.
fn charge(app: &App, user: Uuid, done: &Completion) {
    let n = done.usage.prompt_tokens.saturating_add(done.usage.completion_tokens);
    app.chat_tokens.charge(&user.simple().to_string(), n);
}

/// Longest model name accepted; real ones are far shorter (a HuggingFace id is at most 96
/// characters on each side of its `/`), and every name is routed, logged and stored.
pub(super) const MAX_MODEL_NAME: usize = 256;

/// A model name is at most `MAX_MODEL_NAME` characters.
pub(super) fn check_model(model: Option<&str>) -> Result<(), &'static str> {
    match model {
        Some(m) if m.chars().count() > MAX_MODEL_NAME => {
            const _: () = assert!(MAX_MODEL_NAME == 256, "the message below names the limit");
            Err("must be at most 256 characters")
        }
        _ => Ok(()),
    }
}

/// The one input limit, `routing.max_input_chars`: every message of the request together, for
/// every provider, checked before the model is routed. Reported against `field`.
pub(super) fn check_input_size<'a>(
    checks: &mut Checks,
    app: &App,
    field: &str,
    texts: impl IntoIterator<Item = &'a str>,
) {
    let limit = app.config.routing.max_input_chars;
    let chars: usize = texts.into_iter().map(|t| t.chars().count()).sum();
    if chars > limit {
        let msg =
            format!("the request's messages have {chars} characters; at most {limit} are accepted");
        checks.fail(field, "string_too_long", msg);
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
