//! The remote providers as configured: one `Remote` client per wire dialect, one circuit
//! breaker per provider, and the model lists `/v1/models` shows.

use super::routing::glob;
use crate::config::{ProviderConfig, ProviderName, ProvidersConfig};
use crate::llm::{
    Breaker, BreakerState, ChatRequest, Dialect, EventStream, ProviderError, Remote, RetryPolicy,
    Timeouts,
};
use crate::secret::Secret;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The API keys resolved at start (config, key file, credential or environment), by provider.
#[derive(Debug, Clone, Default)]
pub struct Keys(pub std::collections::HashMap<ProviderName, Secret>);

/// One provider's state for `/ready`: `up`, `circuit_open`, `rejected` (it refuses our key),
/// `not_configured`, `not_loaded`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderStatus {
    pub provider: ProviderName,
    pub state: &'static str,
}

/// One configured provider.
pub(super) struct RemoteProvider {
    name: ProviderName,
    chat: Remote,
    /// HuggingFace's classic task API and the models that need it.
    text_generation: Option<(Remote, Vec<String>)>,
    breaker: Arc<Breaker>,
    configured: bool,
    /// It answered 401 or 403 last: our key is wrong or revoked.
    rejected: AtomicBool,
    models: Vec<String>,
    pub(super) context_tokens: u32,
}

impl RemoteProvider {
    fn new(
        name: ProviderName,
        c: &ProviderConfig,
        key: Option<Secret>,
    ) -> Result<Self, ProviderError> {
        let ms = Duration::from_millis;
        let timeouts = Timeouts {
            connect: ms(c.connect_timeout_ms),
            first_byte: ms(c.first_byte_timeout_ms),
            idle: ms(c.idle_timeout_ms),
            total: ms(c.total_timeout_ms),
        };
        let retry = RetryPolicy {
            attempts: c.attempts,
            base_delay: ms(c.retry_base_ms),
            max_delay: ms(c.retry_max_ms),
        };
        let breaker = Breaker::new(c.breaker_failures, ms(c.breaker_cooldown_ms));
        let breaker = Arc::new(breaker.named(name.as_str()));
        let client = |url: &str, dialect| {
            Remote::new(name.as_str(), url, dialect, key.clone(), timeouts, retry, breaker.clone())
        };
        let chat = client(&c.base_url, Dialect::ChatCompletions)?;
        let text_generation = match c.text_generation_models.is_empty() {
            true => None,
            false => Some((
                client(&c.text_generation_url, Dialect::TextGeneration)?,
                c.text_generation_models.clone(),
            )),
        };
        Ok(RemoteProvider {
            name,
            chat,
            text_generation,
            breaker,
            configured: key.is_some(),
            rejected: AtomicBool::new(false),
            models: c.models.clone(),
            context_tokens: c.context_tokens,
        })
    }

    /// Streams an answer through whichever API serves `req.model`.
    pub(super) async fn chat(&self, req: &ChatRequest) -> Result<EventStream, ProviderError> {
        let result = self.client(req).chat(req).await;
        match &result {
            Ok(_) => self.key_accepted(),
            Err(ProviderError::Status { status: status @ (401 | 403), .. }) => {
                self.key_refused(*status)
            }
            Err(_) => {}
        }
        result
    }

    /// Said once, when the provider starts refusing our key: every request falls back (or
    /// fails) until someone fixes the key, and a line per request would bury the cause.
    fn key_refused(&self, status: u16) {
        if !self.rejected.swap(true, Ordering::Relaxed) {
            let name = self.name.as_str();
            tracing::error!(
                provider = name,
                status,
                "the provider refuses our API key: check providers.{name}.api_key (or its key \
                 file or credential); until it accepts it, its requests fall back or fail"
            );
        }
    }

    fn key_accepted(&self) {
        if self.rejected.swap(false, Ordering::Relaxed) {
            tracing::info!(provider = self.name.as_str(), "the provider accepts our API key again");
        }
    }

    /// The first field of `req` the client for its model cannot honour.
    pub(super) fn refuses(&self, req: &ChatRequest) -> Option<crate::message::Unsupported> {
        self.client(req).refuses(req)
    }

    /// The text-generation client for the models that need it, else the chat client.
    fn client(&self, req: &ChatRequest) -> &Remote {
        match &self.text_generation {
            Some((client, models)) if models.iter().any(|m| glob(m, &req.model)) => client,
            _ => &self.chat,
        }
    }

    fn state(&self) -> &'static str {
        match (self.configured, self.breaker.state()) {
            (false, _) => "not_configured",
            _ if self.rejected.load(Ordering::Relaxed) => "rejected",
            (true, BreakerState::Open) => "circuit_open",
            (true, _) => "up",
        }
    }
}

/// Every remote provider, in configuration order (OpenAI, HuggingFace, the named ones).
pub(super) struct Remotes(Vec<RemoteProvider>);

impl Remotes {
    pub(super) fn new(c: &ProvidersConfig, keys: Keys) -> Result<Remotes, ProviderError> {
        let provider =
            |(name, config)| RemoteProvider::new(name, config, keys.0.get(&name).cloned());
        Ok(Remotes(c.all().into_iter().map(provider).collect::<Result<_, _>>()?))
    }

    /// The remote provider named; `None` for the local model or a name not configured.
    pub(super) fn get(&self, name: ProviderName) -> Option<&RemoteProvider> {
        self.0.iter().find(|p| p.name == name)
    }

    fn all(&self) -> impl Iterator<Item = &RemoteProvider> {
        self.0.iter()
    }

    /// Models of providers that have a key.
    pub(super) fn models(&self) -> Vec<(String, ProviderName)> {
        let configured = self.all().filter(|p| p.configured);
        configured.flat_map(|p| p.models.iter().map(move |m| (m.clone(), p.name))).collect()
    }

    pub(super) fn status(&self) -> Vec<ProviderStatus> {
        self.all().map(|p| ProviderStatus { provider: p.name, state: p.state() }).collect()
    }
}
