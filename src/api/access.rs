//! The access line: one per request, written when its response ends (a stream's when its last
//! byte is sent, the client leaves, or the server shuts down), with what the handler learnt on
//! the way: who asked, which model and provider answered, why the local model stood in, the
//! tokens. Never content, never a credential.

use crate::chat::{Answerer, Completion};
use crate::http::{Body, BoxError};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing::Span;
use uuid::Uuid;

/// What handlers learn about a request, for its access line; shared through the request's
/// extensions (`Req::access`).
#[derive(Debug)]
pub struct Access {
    started: Instant,
    facts: Mutex<Facts>,
}

#[derive(Debug, Default)]
struct Facts {
    user: Option<Uuid>,
    model: Option<String>,
    provider: Option<&'static str>,
    fallback: Option<&'static str>,
    tokens: Option<(u32, u32)>,
    first_token: Option<Duration>,
    failed: bool,
}

impl Default for Access {
    fn default() -> Self {
        Access { started: Instant::now(), facts: Mutex::default() }
    }
}

impl Access {
    /// Time since the request began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The authenticated caller.
    pub fn user(&self, id: Uuid) {
        self.facts().user = Some(id);
    }

    /// Who answers: the model, its provider, and the reason when another provider stood in.
    pub fn answerer(&self, who: &Answerer) {
        let mut f = self.facts();
        f.model = Some(who.model.clone());
        f.provider = Some(who.provider.as_str());
        f.fallback = who.fallback.map(|f| f.reason);
    }

    /// The answer is complete: its token counts.
    pub fn answered(&self, done: &Completion) {
        self.facts().tokens = Some((done.usage.prompt_tokens, done.usage.completion_tokens));
    }

    /// A streamed answer sent its token now; the first call returns the time since the
    /// request began, later ones `None`.
    pub fn first_token(&self) -> Option<Duration> {
        let elapsed = self.started.elapsed();
        let mut f = self.facts();
        let first = f.first_token.is_none();
        f.first_token.get_or_insert(elapsed);
        first.then_some(elapsed)
    }

    /// A streamed answer broke after it started.
    pub fn failed(&self) {
        self.facts().failed = true;
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a streamed response ended.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Completed,
    UpstreamFailed,
    ClientLeft,
    Shutdown,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::ClientLeft => "client_left",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// A request's access line, ready to write once its response ends.
pub struct Line {
    pub method: http::Method,
    pub route: &'static str,
    pub status: u16,
    pub request_id: String,
    pub peer: IpAddr,
    pub access: Arc<Access>,
}

impl Line {
    /// Writes the line now, for a response whose body is whole.
    pub fn write(self) {
        self.write_with(None);
    }

    /// The response, with its line written now, or when its body ends if it is a stream.
    pub fn log(
        self,
        response: http::Response<Body>,
        span: Span,
        draining: Arc<AtomicBool>,
    ) -> http::Response<Body> {
        if hyper::body::Body::size_hint(response.body()).exact().is_some() {
            self.write();
            return response;
        }
        response.map(|inner| {
            let logged = Logged { inner, line: Some(self), span, draining };
            http_body_util::BodyExt::boxed_unsync(logged)
        })
    }

    fn write_with(&self, outcome: Option<Outcome>) {
        crate::metrics::in_flight(false);
        let f = self.access.facts();
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        let user = f.user.map(|u| u.simple().to_string());
        let (prompt_tokens, completion_tokens) = f.tokens.unzip();
        tracing::info!(
            target: "edgechat::access",
            method = %self.method,
            route = self.route,
            status = self.status,
            duration_ms = ms(self.access.started.elapsed()),
            ttft_ms = f.first_token.map(ms),
            outcome = outcome.map(Outcome::as_str),
            request_id = %self.request_id,
            peer = %self.peer,
            user = user.as_deref(),
            model = f.model.as_deref(),
            provider = f.provider,
            fallback = f.fallback,
            prompt_tokens,
            completion_tokens,
        );
    }
}

/// A streamed body that writes its access line when it ends, and runs inside its request's
/// span (lines logged while the stream is produced carry the request id).
struct Logged {
    inner: Body,
    line: Option<Line>,
    span: Span,
    draining: Arc<AtomicBool>,
}

impl Logged {
    fn end(&mut self, outcome: Outcome) {
        if let Some(line) = self.line.take() {
            let failed = line.access.facts().failed;
            let outcome = match outcome {
                Outcome::Completed if failed => Outcome::UpstreamFailed,
                other => other,
            };
            line.write_with(Some(outcome));
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = this.span.in_scope(|| Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Poll::Ready(None) => this.end(Outcome::Completed),
            Poll::Ready(Some(Err(_))) => this.end(Outcome::UpstreamFailed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let outcome = match self.draining.load(Ordering::Relaxed) {
            true => Outcome::Shutdown,
            false => Outcome::ClientLeft,
        };
        self.end(outcome);
    }
}
