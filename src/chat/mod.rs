//! The one chat service that both HTTP faces (and, later, the job worker) call: it picks the
//! provider for a model, sends the conversation's context trimmed to fit, falls back to the
//! local model when a remote provider cannot answer, and stores the turn (the new messages and
//! the answer) in one transaction once the answer is complete. A failed or dropped answer
//! stores nothing.

mod context;
mod local_tools;
mod providers;
mod reply;
pub mod routing;

pub use providers::{Keys, ProviderStatus};
pub use reply::{turn, Completion, Reply, Step};

use crate::config::{Config, ProviderName, RoutingConfig};
use crate::llm::{ChatRequest, ProviderError, Sampling};
use crate::local::{LocalError, Registry};
use crate::message::{Message, Role, Shape, Unsupported};
use crate::store::{Store, StoreError};
use providers::Remotes;
use routing::Target;
use std::sync::Arc;
use uuid::Uuid;

/// Where this turn is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Thread {
    /// A new conversation, titled after the first user message.
    #[default]
    New,
    /// The user's existing conversation: its messages are the context, the turn is appended.
    Continue(Uuid),
    /// Not stored (`store: false` on the OpenAI face).
    Unstored,
}

/// One chat request, as both faces describe it.
#[derive(Debug, Clone, Default)]
pub struct ChatInput {
    pub user: Uuid,
    /// `None` means `routing.default_model`.
    pub model: Option<String>,
    pub thread: Thread,
    /// This turn's messages, sent after the conversation's earlier ones and stored with the
    /// answer.
    pub messages: Vec<Message>,
    /// `None` fields go to the provider's defaults (`max_tokens`: `routing.default_max_tokens`).
    pub params: Sampling,
    /// Tools and response format.
    pub shape: Shape,
    /// Other OpenAI fields, relayed to upstreams that speak Chat Completions.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Why the answer comes from another provider (a rule's fallback, or the local model) than
/// the one asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fallback {
    pub from: ProviderName,
    pub to: ProviderName,
    /// A stable word: `unreachable`, `timeout`, `rate_limited`, `not_configured`, …
    pub reason: &'static str,
}

impl Fallback {
    /// The `X-Edgechat-Fallback` header value, e.g. `openai->local`.
    pub fn header(&self) -> String {
        format!("{}->{}", self.from, self.to)
    }
}

/// Who is answering, known before the first delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answerer {
    /// The model that actually answers (the local model's name after a fallback).
    pub model: String,
    pub provider: ProviderName,
    pub fallback: Option<Fallback>,
}

/// Why a chat request got no answer; `api::error` maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A field the provider that would answer cannot honour.
    #[error("{}", .0.why)]
    Unsupported(Unsupported),
    #[error("no provider is configured for model `{0}`")]
    UnknownModel(String),
    #[error("conversation not found")]
    ConversationNotFound,
    /// The provider cannot be tried (no key, circuit open, no local model) and nothing else
    /// may answer.
    #[error("{provider} cannot answer: {why}")]
    Unavailable { provider: ProviderName, why: String },
    /// The provider was tried and failed, and the fallback was off or failed too.
    #[error("{provider} failed: {reason}")]
    Upstream { provider: ProviderName, reason: &'static str },
    #[error("the local model is busy; retry shortly")]
    Busy,
    #[error("the message has {prompt_tokens} tokens with its template, more than the model's context window of {context}; shorten it")]
    PromptTooLong { prompt_tokens: usize, context: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The chat service; cheap to share behind an `Arc`.
pub struct Chat {
    store: Store,
    remotes: Remotes,
    local: Arc<Registry>,
    routing: RoutingConfig,
}

impl Chat {
    /// The service over `store`, the providers in `config` with `keys`, and the local models.
    pub fn new(
        store: Store,
        config: &Config,
        keys: Keys,
        local: Arc<Registry>,
    ) -> Result<Chat, ProviderError> {
        let remotes = Remotes::new(&config.providers, keys)?;
        Ok(Chat { store, remotes, local, routing: config.routing.clone() })
    }

    /// Every model that can be asked for now, with the provider that owns it (local models
    /// whose file is missing are left out until it is there).
    pub fn models(&self) -> Vec<(String, ProviderName)> {
        let mut out: Vec<_> = self
            .local
            .available()
            .into_iter()
            .map(|n| (n.to_owned(), ProviderName::LOCAL))
            .collect();
        out.extend(self.remotes.models());
        out
    }

    /// Each provider's state, for `/ready`.
    pub fn status(&self) -> Vec<ProviderStatus> {
        let mut out = self.remotes.status();
        let local = match self.local.available().is_empty() {
            false => "up",
            true => "not_loaded",
        };
        out.push(ProviderStatus { provider: ProviderName::LOCAL, state: local });
        out
    }

    /// The local models, configured and loaded.
    pub fn local_models(&self) -> &Registry {
        &self.local
    }

    /// Starts answering: resolves the model, builds the context, and returns once the
    /// provider (or the fallback) has produced its first event.
    pub async fn start(&self, input: &ChatInput) -> Result<Reply, ChatError> {
        self.begin(input, true).await
    }

    /// Like `complete`, but stores nothing: the caller stores `turn(input, …)` itself (a
    /// background job, together with its final state).
    pub async fn complete_unsaved(
        &self,
        input: &ChatInput,
    ) -> Result<(Answerer, Completion), ChatError> {
        self.finish(input, false).await
    }

    /// What `start` refuses before any provider is asked — an unknown model, a conversation
    /// that is not the user's — so that a background job is refused when it is queued, with
    /// the answer `POST /chat` would give, instead of failing later.
    pub async fn check(&self, input: &ChatInput) -> Result<(), ChatError> {
        self.route(input)?;
        if let Thread::Continue(id) = input.thread {
            // The header says whose it is; the messages are read when the job runs.
            self.store
                .conversation_header(input.user, id)
                .await?
                .ok_or(ChatError::ConversationNotFound)?;
        }
        Ok(())
    }

    /// The model name the input resolves to, and who answers it.
    fn route(&self, input: &ChatInput) -> Result<(String, Target), ChatError> {
        let model = self.model_name(input);
        match routing::target_for(&model, self.local.names(), &self.routing.rules) {
            Some(target) => Ok((model, target)),
            None => Err(ChatError::UnknownModel(model)),
        }
    }

    async fn begin(&self, input: &ChatInput, save: bool) -> Result<Reply, ChatError> {
        let (model, target) = self.route(input)?;
        let history = self.history(input).await?;
        let persist = self.persist(input, save);
        let chain = match target {
            Target::Local(name) => {
                return self.start_local(input, history, &name, None, persist).await
            }
            Target::Remote(chain) => chain,
        };
        let asked = chain[0];
        let mut failed: Option<ProviderError> = None;
        for (i, provider) in chain.iter().copied().enumerate() {
            let Some(remote) = self.remotes.get(provider) else { continue };
            let request = self.remote_request(&model, remote, &history, input);
            if let Some(refused) = remote.refuses(&request) {
                match i {
                    0 => return Err(ChatError::Unsupported(refused)),
                    _ => continue,
                }
            }
            match remote.chat(&request).await {
                Ok(events) => {
                    let fallback =
                        failed.map(|e| Fallback { from: asked, to: provider, reason: e.reason() });
                    if let Some(f) = &fallback {
                        crate::metrics::fallback(f.from.as_str(), f.to.as_str(), f.reason);
                    }
                    let who = Answerer { model, provider, fallback };
                    return Ok(Reply::remote(persist, who, events, request.messages));
                }
                Err(e) => {
                    if i + 1 < chain.len() {
                        let reason = e.reason();
                        tracing::warn!(provider = provider.as_str(), reason, error = %e, "trying the next provider");
                    }
                    failed.get_or_insert(e);
                }
            }
        }
        let error = failed.unwrap_or(ProviderError::NotConfigured);
        self.fall_back(input, history, asked, error, persist).await
    }

    /// What `remote` is sent for `input`: the history trimmed to its context.
    fn remote_request(
        &self,
        model: &str,
        remote: &providers::RemoteProvider,
        history: &[Message],
        input: &ChatInput,
    ) -> ChatRequest {
        let max_tokens = self.max_tokens(input);
        let budget = (remote.context_tokens as usize).saturating_sub(max_tokens as usize);
        let messages =
            context::fit(history.to_vec(), &input.messages, budget, context::estimate_tokens);
        request(model, messages, max_tokens, input)
    }

    /// The whole answer. A remote stream that breaks before completing is answered again by
    /// the local model when fallback is on: nothing has reached the client yet.
    pub async fn complete(&self, input: &ChatInput) -> Result<(Answerer, Completion), ChatError> {
        self.finish(input, true).await
    }

    async fn finish(
        &self,
        input: &ChatInput,
        save: bool,
    ) -> Result<(Answerer, Completion), ChatError> {
        let mut reply = self.begin(input, save).await?;
        match reply.collect().await {
            Ok(done) => Ok((reply.answerer().clone(), done)),
            Err(ChatError::Upstream { provider, reason })
                if provider != ProviderName::LOCAL && self.can_fall_back_with(input) =>
            {
                tracing::warn!(provider = provider.as_str(), reason, "stream broke; local answers");
                let fallback = Some(Fallback { from: provider, to: ProviderName::LOCAL, reason });
                let persist = self.persist(input, save);
                let history = self.history(input).await?;
                let mut reply = match self.start_local(input, history, "", fallback, persist).await
                {
                    Err(ChatError::Unsupported(_)) => {
                        return Err(ChatError::Upstream { provider, reason })
                    }
                    other => other?,
                };
                let done = reply.collect().await?;
                Ok((reply.answerer().clone(), done))
            }
            Err(e) => Err(e),
        }
    }

    async fn fall_back(
        &self,
        input: &ChatInput,
        history: Vec<Message>,
        provider: ProviderName,
        error: ProviderError,
        persist: Option<reply::Persist>,
    ) -> Result<Reply, ChatError> {
        let reason = error.reason();
        let failed = match &error {
            ProviderError::NotConfigured | ProviderError::CircuitOpen => {
                ChatError::Unavailable { provider, why: error.to_string() }
            }
            _ => ChatError::Upstream { provider, reason },
        };
        if !self.can_fall_back_with(input) {
            return Err(failed);
        }
        tracing::warn!(provider = provider.as_str(), reason, error = %error, "falling back to the local model");
        let fallback = Some(Fallback { from: provider, to: ProviderName::LOCAL, reason });
        match self.start_local(input, history, "", fallback, persist).await {
            // The local model cannot serve these tools: the upstream's failure is the answer.
            Err(ChatError::Unsupported(_)) => Err(failed),
            other => other,
        }
    }

    /// Fallback is on, a local model is there, and it can honour everything `input` asks
    /// (else the upstream's failure is the answer: never one that ignores tools or a schema).
    fn can_fall_back_with(&self, input: &ChatInput) -> bool {
        self.routing.fallback && self.local.fallback().is_some() && local_refuses(input).is_none()
    }

    /// Answers from the local model `name` (empty: the fallback model), loading it first when
    /// it is not loaded.
    async fn start_local(
        &self,
        input: &ChatInput,
        history: Vec<Message>,
        name: &str,
        fallback: Option<Fallback>,
        persist: Option<reply::Persist>,
    ) -> Result<Reply, ChatError> {
        if let Some(refused) = local_refuses(input) {
            return Err(ChatError::Unsupported(refused));
        }
        if let Some(f) = &fallback {
            crate::metrics::fallback(f.from.as_str(), f.to.as_str(), f.reason);
        }
        let unavailable =
            |why: String| ChatError::Unavailable { provider: ProviderName::LOCAL, why };
        let name = match name {
            "" => self.local.fallback().ok_or_else(|| {
                unavailable(
                    "no local model is loaded (fetch one with `bash models/fetch-default.sh`)"
                        .into(),
                )
            })?,
            name => name,
        };
        let engine = self.local.engine(name).await.map_err(|e| unavailable(e.to_string()))?;
        let name = self.local.find(name).unwrap_or(name).to_owned();
        let knows_tools = engine.call_format().is_some();
        let plan = local_tools::Plan::of(&input.shape, engine.call_format())
            .map_err(ChatError::Unsupported)?;
        let max_tokens = self.max_tokens(input) as usize;
        let budget =
            engine.context_length().saturating_sub(max_tokens.min(engine.context_length() / 2));
        let mut turn = local_tools::with_format_hint(input.messages.clone(), &input.shape);
        plan.hint(&mut turn, knows_tools);
        let messages =
            context::fit(history, &turn, budget, |m| engine.prompt_tokens(m).unwrap_or(usize::MAX));
        let request = local_request(input, &engine, messages, max_tokens, &plan);
        if request.response_format.is_some() || request.calls.is_some() {
            engine.prepare_grammar().await;
        }
        let generation = engine.generate(request).map_err(local_error)?;
        let who = Answerer { model: name, provider: ProviderName::LOCAL, fallback };
        Ok(Reply::local(persist, who, generation, plan))
    }

    fn model_name(&self, input: &ChatInput) -> String {
        match input.model.as_deref().filter(|m| !m.is_empty()) {
            Some(m) => m.to_string(),
            None if !self.routing.default_model.is_empty() => self.routing.default_model.clone(),
            None => self.local.fallback().unwrap_or("local").to_string(),
        }
    }

    fn max_tokens(&self, input: &ChatInput) -> u32 {
        input.params.max_tokens.unwrap_or(self.routing.default_max_tokens)
    }

    /// The earlier messages of the conversation this turn continues.
    async fn history(&self, input: &ChatInput) -> Result<Vec<Message>, ChatError> {
        let Thread::Continue(id) = input.thread else { return Ok(Vec::new()) };
        let (_, messages) = self
            .store
            .conversation(input.user, id)
            .await?
            .ok_or(ChatError::ConversationNotFound)?;
        let said = |m: crate::store::Message| Message {
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            ..Message::new(m.role, m.content)
        };
        Ok(messages.into_iter().map(said).collect())
    }

    fn persist(&self, input: &ChatInput, save: bool) -> Option<reply::Persist> {
        save.then(|| reply::Persist::new(self.store.clone(), input)).flatten()
    }
}

fn request(model: &str, messages: Vec<Message>, max_tokens: u32, input: &ChatInput) -> ChatRequest {
    let sampling = Sampling { max_tokens: Some(max_tokens), ..input.params.clone() };
    ChatRequest {
        model: model.to_string(),
        messages,
        sampling,
        shape: input.shape.clone(),
        extra: input.extra.clone(),
    }
}

/// What the local model runs for `input`: the model's sampling defaults under the request's
/// own values, the tools and grammar of `plan`.
fn local_request(
    input: &ChatInput,
    engine: &crate::local::Engine,
    messages: Vec<Message>,
    max_tokens: usize,
    plan: &local_tools::Plan,
) -> crate::local::GenerateRequest {
    let (p, base) = (&input.params, engine.sampling());
    crate::local::GenerateRequest {
        temperature: p.temperature.unwrap_or(base.temperature),
        top_p: p.top_p.unwrap_or(base.top_p),
        seed: p.seed,
        stop: p.stop.clone(),
        response_format: plan.format().or_else(|| input.shape.response_format.clone()),
        tools: plan.rendered(engine.call_format().is_some()),
        calls: plan.calls(&input.shape),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
        logit_bias: p.logit_bias.clone(),
        logprobs: p.logprobs,
        ..base.request(messages, max_tokens)
    }
}

/// The first field of `input` the local models cannot honour.
fn local_refuses(input: &ChatInput) -> Option<Unsupported> {
    const WHY: &str = "is not supported by the local model";
    let field =
        input.extra.keys().find(|k| !crate::message::INFORMATIONAL_FIELDS.contains(&k.as_str()))?;
    Some(Unsupported::new(field, format!("{field} {WHY}")))
}

fn local_error(e: LocalError) -> ChatError {
    match e {
        LocalError::Busy { .. } => ChatError::Busy,
        LocalError::PromptTooLong { prompt_tokens, context } => {
            ChatError::PromptTooLong { prompt_tokens, context }
        }
        LocalError::InvalidRequest(m) => ChatError::Invalid(m),
        other => {
            tracing::error!(error = %other, "local generation failed");
            ChatError::Upstream { provider: ProviderName::LOCAL, reason: "local_error" }
        }
    }
}

/// A conversation's title: the start of its first user message, on one line.
fn title(messages: &[Message]) -> String {
    let first = messages.iter().find(|m| m.role == Role::User).or(messages.first());
    let text = first.map(|m| m.content.split_whitespace().collect::<Vec<_>>().join(" "));
    let text = text.unwrap_or_default();
    match text.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}
