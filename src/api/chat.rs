//! `POST /chat`: the seed face's chat, JSON or SSE.

use super::error::rate_limit_headers;
use super::extract::Checks;
use super::frame::{
    admit, check_input_size, check_max_tokens, check_model, check_temperature, data, done_event,
    sse, stream_error, streamed, whole, with_answerer, Progress, SseStream,
};
use super::seed::{SeedAnswer, SeedRequest};
use super::{handler, ApiError, App, Doc, Face, Req, Routes};
use crate::chat::{ChatInput, Step};
use crate::http::json;
use futures_util::stream::{self, StreamExt};
use http::{Response, StatusCode};
use std::sync::Arc;
use uuid::Uuid;

type Answer = Result<Response<crate::http::Body>, ApiError>;

pub fn routes(r: &mut Routes) {
    r.add(
        http::Method::POST,
        "/chat",
        handler(chat),
        Doc::new("chat", "Chat with a model (JSON, or SSE with \"stream\": true)")
            .secured()
            .body::<SeedRequest>()
            .json::<SeedAnswer>(200)
            .streams()
            .errors(&[404, 429, 502, 503]),
    );
}

async fn chat(app: Arc<App>, mut req: Req) -> Answer {
    let principal = req.principal(&app).await?;
    let body: SeedRequest = req.json(&app).await?;
    let limit = admit(&app, principal.user.id)?;
    let input = input(&app, &body, principal.user.id)?;
    let (user, access) = (principal.user.id, req.access());
    let mut response = if body.stream {
        let (who, steps) = streamed(&app, user, &input, access).await?;
        with_answerer(sse(seed_events(steps)), &who)
    } else {
        let (who, done) = whole(&app, user, &input, &access).await?;
        with_answerer(json(StatusCode::OK, &SeedAnswer::new(&who, &done)), &who)
    };
    rate_limit_headers(response.headers_mut(), &limit, Face::Seed);
    Ok(response)
}

/// `data: {"delta": …}` per delta, the whole answer object, then `[DONE]`.
fn seed_events(steps: stream::BoxStream<'static, Progress>) -> SseStream {
    steps
        .map(move |Progress { who, step, .. }| match step {
            Ok(Step::Delta(d)) => vec![data(&serde_json::json!({ "delta": d }))],
            // The seed face offers no tools or log probabilities; a refusal has no event here.
            Ok(Step::ToolCall(_) | Step::Refusal(_) | Step::Logprobs(_)) => vec![],
            Ok(Step::Done(done)) => vec![data(&SeedAnswer::new(&who, &done)), done_event()],
            Err(e) => vec![data(&stream_error(&e))],
        })
        .flat_map(stream::iter)
        .boxed()
}

/// The seed request's values, checked the same way for `/chat` and `/chat/background`, as the
/// chat input of `user`.
pub(super) fn input(app: &App, body: &SeedRequest, user: Uuid) -> Result<ChatInput, ApiError> {
    let mut checks = Checks::default();
    checks
        .field("message", non_empty(&body.message))
        .field("model", check_model(body.model.as_deref()))
        .field("max_tokens", check_max_tokens(body.max_tokens))
        .field("temperature", check_temperature(body.temperature));
    let texts = std::iter::once(body.message.as_str()).chain(body.system.as_deref());
    check_input_size(&mut checks, app, "message", texts);
    let shape = body.shape(&mut checks);
    checks.finish()?;
    body.input(user, shape).ok_or(ApiError::NotFound("Conversation not found"))
}

fn non_empty(text: &str) -> Result<(), &'static str> {
    match text.trim().is_empty() {
        true => Err("must not be empty"),
        false => Ok(()),
    }
}
