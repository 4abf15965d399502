//! The chat sections: the local model, the remote providers, which model names go where, and
//! the per-user limits on chat routes.

use super::{ConfigError, QuotaConfig};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The in-process model that answers offline and takes over when a provider fails.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub enabled: bool,
    /// A GGUF file; relative paths start from the working directory.
    pub model: PathBuf,
    /// The model name clients use; empty means the file name without `.gguf`.
    pub name: String,
    /// Compute threads; 0 means every core.
    pub threads: usize,
    pub max_batch: usize,
    pub max_queue: usize,
    /// Caps the context window (KV cache memory); 0 keeps the model's own.
    pub context: usize,
    /// MiB of finished sequences' KV caches kept for prompts that start the same way; 0: off.
    pub prompt_cache_mb: usize,
    /// A Jinja file used as `model`'s chat template instead of the one in the file; empty: the
    /// file's own.
    pub chat_template: PathBuf,
    /// More models beside `model` (which stays the fallback), each loaded on first use.
    pub models: Vec<LocalModelConfig>,
    /// Models kept loaded at once, `model` included; the least recently used idle one is
    /// unloaded to make room.
    pub max_loaded_models: usize,
    /// MiB the loaded models may take together (their files plus their KV caches); 0: no limit
    /// beyond `max_loaded_models`.
    pub max_memory_mb: usize,
}

/// One `[[local.models]]` entry; the settings it leaves out are `[local]`'s.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// A GGUF file; relative paths start from the working directory.
    pub file: PathBuf,
    /// The model name clients use; empty means the file name without `.gguf`.
    #[serde(default)]
    pub name: String,
    /// Only `local.threads` (or 0) is allowed: every local model computes on one shared pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_mb: Option<usize>,
    /// This model's chat template file (not inherited: a template belongs to its model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
}

impl LocalModelConfig {
    /// The entry for `file` answering as `name`, with `[local]`'s settings.
    pub fn new(file: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        LocalModelConfig {
            file: file.into(),
            name: name.into(),
            threads: None,
            max_batch: None,
            max_queue: None,
            context: None,
            prompt_cache_mb: None,
            chat_template: None,
        }
    }
}

/// A local model's file, name and engine settings, with `[local]`'s filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModelSettings {
    pub name: String,
    pub file: PathBuf,
    pub max_batch: usize,
    pub max_queue: usize,
    /// 0 keeps the model's own context window.
    pub context: usize,
    pub prompt_cache_mb: usize,
    /// Replaces the file's own chat template.
    pub chat_template: Option<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            enabled: true,
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            name: String::new(),
            threads: 0,
            max_batch: 4,
            max_queue: 32,
            context: 0,
            prompt_cache_mb: 256,
            chat_template: PathBuf::new(),
            models: Vec::new(),
            max_loaded_models: 3,
            max_memory_mb: 0,
        }
    }
}

impl LocalConfig {
    /// The name clients ask for: `name`, else the file name without its extension.
    pub fn model_name(&self) -> String {
        model_name(&self.name, &self.model)
    }

    /// Every local model, the fallback (`model`) first, each with its settings resolved.
    pub fn settings(&self) -> Vec<LocalModelSettings> {
        let main = LocalModelSettings {
            name: self.model_name(),
            file: self.model.clone(),
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            context: self.context,
            prompt_cache_mb: self.prompt_cache_mb,
            chat_template: Some(self.chat_template.clone()).filter(|p| !p.as_os_str().is_empty()),
        };
        let more = self.models.iter().map(|m| LocalModelSettings {
            name: model_name(&m.name, &m.file),
            file: m.file.clone(),
            max_batch: m.max_batch.unwrap_or(self.max_batch),
            max_queue: m.max_queue.unwrap_or(self.max_queue),
            context: m.context.unwrap_or(self.context),
            prompt_cache_mb: m.prompt_cache_mb.unwrap_or(self.prompt_cache_mb),
            chat_template: m.chat_template.clone(),
        });
        std::iter::once(main).chain(more).collect()
    }
}

fn model_name(name: &str, file: &std::path::Path) -> String {
    if !name.is_empty() {
        return name.to_owned();
    }
    let file = file.file_name().map(|f| f.to_string_lossy().into_owned());
    let file = file.unwrap_or_else(|| "local".into());
    file.strip_suffix(".gguf").map(str::to_owned).unwrap_or(file)
}

/// The remote providers: OpenAI and HuggingFace, which edgechat knows, and any number of named
/// OpenAI-compatible ones (`[providers.vllm]` with `kind = "openai"`: vLLM, OpenRouter,
/// llama-server, a gateway). Each is down until it has an API key. Keys given for one provider
/// are laid over its defaults (OpenAI's and HuggingFace's URLs stay unless changed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProvidersConfig {
    pub openai: ProviderConfig,
    pub huggingface: ProviderConfig,
    /// The named providers, by name.
    #[serde(flatten)]
    pub named: std::collections::BTreeMap<String, ProviderConfig>,
}

impl<'de> Deserialize<'de> for ProvidersConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let given = std::collections::BTreeMap::<String, toml::Table>::deserialize(d)?;
        let mut out = ProvidersConfig::default();
        for (name, table) in given {
            let at = |e: String| D::Error::custom(format!("providers.{name}: {e}"));
            match name.as_str() {
                "openai" => out.openai = over_defaults(table, out.openai.clone()).map_err(at)?,
                "huggingface" => {
                    out.huggingface = over_defaults(table, out.huggingface.clone()).map_err(at)?
                }
                _ => {
                    ProviderName::parse(&name).map_err(at)?;
                    let named = over_defaults(table, ProviderConfig::default()).map_err(at)?;
                    out.named.insert(name, named);
                }
            }
        }
        Ok(out)
    }
}

impl ProvidersConfig {
    /// Every remote provider with its name: OpenAI, HuggingFace, then the named ones.
    pub fn all(&self) -> Vec<(ProviderName, &ProviderConfig)> {
        let builtin =
            [(ProviderName::OPENAI, &self.openai), (ProviderName::HUGGINGFACE, &self.huggingface)];
        let named = self.named.iter().filter_map(|(n, c)| Some((ProviderName::parse(n).ok()?, c)));
        builtin.into_iter().chain(named).collect()
    }
}

/// `given` laid over `defaults`, as one provider's section.
fn over_defaults(given: toml::Table, defaults: ProviderConfig) -> Result<ProviderConfig, String> {
    let mut merged = toml::Table::try_from(&defaults).map_err(|e| e.to_string())?;
    merged.extend(given);
    ProviderConfig::deserialize(toml::Value::Table(merged)).map_err(|e| e.to_string())
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        ProvidersConfig {
            openai: ProviderConfig {
                base_url: "https://api.openai.com/v1".into(),
                models: vec!["gpt-4o-mini".into(), "gpt-4o".into(), "gpt-3.5-turbo".into()],
                ..ProviderConfig::default()
            },
            huggingface: ProviderConfig {
                base_url: "https://router.huggingface.co/v1".into(),
                text_generation_url: "https://api-inference.huggingface.co/models".into(),
                ..ProviderConfig::default()
            },
            named: Default::default(),
        }
    }
}

/// One remote provider: where it is, its key, its deadlines, retries and circuit breaker.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// A named provider's API: `openai` (OpenAI-compatible Chat Completions), the only kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<ProviderKind>,
    /// The OpenAI-compatible API root (`…/v1`); `/chat/completions` is appended.
    pub base_url: String,
    pub api_key: Option<Secret>,
    /// A file holding the key (trailing newline ignored).
    pub api_key_file: Option<PathBuf>,
    /// Models listed by `GET /v1/models` while the provider has a key.
    pub models: Vec<String>,
    /// HuggingFace only: model patterns served by the classic text-generation API.
    pub text_generation_models: Vec<String>,
    /// HuggingFace only: the classic API root; `/{model}` is appended.
    pub text_generation_url: String,
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub total_timeout_ms: u64,
    /// Attempts in all (the first included), only before the first byte.
    pub attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Consecutive failures that open the circuit.
    pub breaker_failures: u32,
    /// How long an open circuit skips the provider before one probe.
    pub breaker_cooldown_ms: u64,
    /// Prompt tokens the provider's models accept; history beyond is trimmed, oldest first.
    pub context_tokens: u32,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            kind: None,
            base_url: String::new(),
            api_key: None,
            api_key_file: None,
            models: Vec::new(),
            text_generation_models: Vec::new(),
            text_generation_url: String::new(),
            connect_timeout_ms: 3_000,
            first_byte_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            total_timeout_ms: 300_000,
            attempts: 3,
            retry_base_ms: 250,
            retry_max_ms: 4_000,
            breaker_failures: 3,
            breaker_cooldown_ms: 30_000,
            context_tokens: 16_384,
        }
    }
}

/// The API a named provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
}

/// A provider's name: `openai`, `huggingface`, `local`, or a named provider's. Names are
/// interned (a configuration has a handful), so the type is `Copy` and its text `'static`, as
/// metric labels and headers want.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderName(&'static str);

impl ProviderName {
    pub const OPENAI: ProviderName = ProviderName("openai");
    pub const HUGGINGFACE: ProviderName = ProviderName("huggingface");
    pub const LOCAL: ProviderName = ProviderName("local");

    /// `name` as a provider name: 1 to 32 lowercase letters, digits, `-` or `_`.
    pub fn parse(name: &str) -> Result<ProviderName, String> {
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if name.is_empty() || name.len() > 32 || !name.bytes().all(ok) {
            return Err(format!(
                "`{name}` is not a provider name (1 to 32 lowercase letters, digits, - or _)"
            ));
        }
        static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
        let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
        let known = [Self::OPENAI.0, Self::HUGGINGFACE.0, Self::LOCAL.0];
        if let Some(&n) = known.iter().chain(names.iter()).find(|&&n| n == name) {
            return Ok(ProviderName(n));
        }
        let interned: &'static str = Box::leak(name.to_owned().into_boxed_str());
        names.push(interned);
        Ok(ProviderName(interned))
    }

    /// The name used in answers, headers and logs.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for ProviderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::fmt::Debug for ProviderName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for ProviderName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for ProviderName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        ProviderName::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// Model names (or `*` patterns) → provider; the first matching rule wins.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    pub model: String,
    pub provider: ProviderName,
    /// With `provider = "local"`: which local model answers; empty means the fallback model.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_model: String,
    /// Remote providers asked in turn when `provider` cannot answer, before the local model
    /// (`routing.fallback`): the same model name is sent to each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<ProviderName>,
}

impl RouteRule {
    /// `model` (a name or `*` pattern) answered by `provider`, with no fallback providers.
    pub fn new(model: impl Into<String>, provider: ProviderName) -> Self {
        RouteRule {
            model: model.into(),
            provider,
            local_model: String::new(),
            fallback: Vec::new(),
        }
    }
}

/// Which provider answers a model, what to use when none is named, and whether to fall back.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Used when a request names no model; empty means the local model.
    pub default_model: String,
    /// Answer from the local model when the chosen provider cannot.
    pub fallback: bool,
    pub rules: Vec<RouteRule>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: u32,
    /// The most characters a chat request's messages may have together, whichever provider
    /// answers; checked before routing (a longer request: 422, or 400 on `/v1`).
    pub max_input_chars: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let openai = |model: &str| RouteRule::new(model, ProviderName::OPENAI);
        RoutingConfig {
            default_model: String::new(),
            fallback: true,
            rules: vec![
                openai("gpt-*"),
                openai("chatgpt-*"),
                openai("o1*"),
                openai("o3*"),
                openai("o4*"),
                RouteRule::new("*/*", ProviderName::HUGGINGFACE),
            ],
            default_max_tokens: 512,
            max_input_chars: 100_000,
        }
    }
}

/// Per-user limits on the chat routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatLimitsConfig {
    pub requests: QuotaConfig,
    /// Tokens (prompt + completion), counted when an answer completes.
    pub tokens: QuotaConfig,
}

impl Default for ChatLimitsConfig {
    fn default() -> Self {
        ChatLimitsConfig {
            requests: QuotaConfig { requests: 60, per_secs: 60, burst: 20 },
            tokens: QuotaConfig { requests: 200_000, per_secs: 60, burst: 200_000 },
        }
    }
}

/// Checks the chat sections; every message names its key.
pub(super) fn validate(
    local: &LocalConfig,
    providers: &ProvidersConfig,
    routing: &RoutingConfig,
) -> Result<(), ConfigError> {
    validate_local(local)?;
    for (name, p) in providers.all() {
        let key = |k: &str| format!("providers.{name}.{k}");
        let builtin = name == ProviderName::OPENAI || name == ProviderName::HUGGINGFACE;
        match (builtin, p.kind) {
            (true, Some(_)) => {
                return Err(ConfigError::invalid(&key("kind"), "only named providers take a kind"))
            }
            (false, None) => {
                let message = "give the provider's API: kind = \"openai\" (OpenAI-compatible)";
                return Err(ConfigError::invalid(&key("kind"), message));
            }
            _ => {}
        }
        for (k, url) in [("base_url", &p.base_url), ("text_generation_url", &p.text_generation_url)]
        {
            let ok = url.starts_with("http://") || url.starts_with("https://");
            if !(ok || url.is_empty() && k == "text_generation_url") {
                return Err(ConfigError::invalid(&key(k), "must be an http:// or https:// URL"));
            }
        }
        if p.api_key.is_some() && p.api_key_file.is_some() {
            return Err(ConfigError::invalid(&key("api_key"), "give api_key or api_key_file"));
        }
        if name != ProviderName::HUGGINGFACE && !p.text_generation_models.is_empty() {
            return Err(ConfigError::invalid(&key("text_generation_models"), "HuggingFace only"));
        }
        let durations = [
            ("connect_timeout_ms", p.connect_timeout_ms),
            ("first_byte_timeout_ms", p.first_byte_timeout_ms),
            ("idle_timeout_ms", p.idle_timeout_ms),
            ("total_timeout_ms", p.total_timeout_ms),
            ("attempts", p.attempts.into()),
            ("breaker_failures", p.breaker_failures.into()),
            ("context_tokens", p.context_tokens.into()),
        ];
        if let Some((k, _)) = durations.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::invalid(&key(k), "must be greater than 0"));
        }
    }
    if let Some(r) = routing.rules.iter().find(|r| r.model.trim().is_empty()) {
        let message = format!("a rule for provider {} has an empty model", r.provider.as_str());
        return Err(ConfigError::invalid("routing.rules", message));
    }
    validate_rule_providers(providers, routing)?;
    validate_local_rules(local, routing)?;
    if routing.default_max_tokens == 0 {
        return Err(ConfigError::invalid("routing.default_max_tokens", "must be greater than 0"));
    }
    if routing.max_input_chars == 0 {
        return Err(ConfigError::invalid("routing.max_input_chars", "must be greater than 0"));
    }
    Ok(())
}

/// Every provider a rule names, and every one it falls back to, is configured.
fn validate_rule_providers(
    providers: &ProvidersConfig,
    routing: &RoutingConfig,
) -> Result<(), ConfigError> {
    let known: Vec<ProviderName> = providers.all().into_iter().map(|(n, _)| n).collect();
    for (i, rule) in routing.rules.iter().enumerate() {
        let key = |k: &str| format!("routing.rules[{i}].{k}");
        if rule.provider != ProviderName::LOCAL && !known.contains(&rule.provider) {
            let message = format!("no provider is named {} (add [providers.{0}])", rule.provider);
            return Err(ConfigError::invalid(&key("provider"), message));
        }
        if let Some(bad) = rule.fallback.iter().find(|p| !known.contains(p) || **p == rule.provider)
        {
            let message = format!(
                "{bad} is not another configured remote provider (the local model comes last \
                 by itself, with routing.fallback)"
            );
            return Err(ConfigError::invalid(&key("fallback"), message));
        }
    }
    Ok(())
}

fn validate_local(local: &LocalConfig) -> Result<(), ConfigError> {
    if local.max_loaded_models == 0 {
        return Err(ConfigError::invalid("local.max_loaded_models", "must be greater than 0"));
    }
    let mut seen: Vec<String> = Vec::new();
    for (i, m) in local.settings().into_iter().enumerate() {
        let key = |k: &str| match i {
            0 => format!("local.{k}"),
            _ => format!("local.models[{}].{k}", i - 1),
        };
        if m.max_batch == 0 || m.max_queue == 0 {
            return Err(ConfigError::invalid(
                &key("max_batch"),
                "max_batch and max_queue must be > 0",
            ));
        }
        if i > 0 && m.file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(&key("file"), "give the model's GGUF file"));
        }
        let name = m.name.to_lowercase();
        if i > 0 && name == "local" {
            let why = "`local` is the fallback model's alias; choose another name";
            return Err(ConfigError::invalid(&key("name"), why));
        }
        if seen.contains(&name) {
            let why = format!("two local models are named `{}`; give each a distinct name", m.name);
            return Err(ConfigError::invalid(&key("name"), why));
        }
        seen.push(name);
    }
    for (i, m) in local.models.iter().enumerate() {
        if m.threads.is_some_and(|t| t != 0 && t != local.threads) {
            let why = "every local model computes on one shared pool of threads: set local.threads";
            return Err(ConfigError::invalid(&format!("local.models[{i}].threads"), why));
        }
    }
    Ok(())
}

/// A rule may send models to a named local model only if it is configured.
fn validate_local_rules(local: &LocalConfig, routing: &RoutingConfig) -> Result<(), ConfigError> {
    let names: Vec<String> = local.settings().into_iter().map(|m| m.name).collect();
    for (i, r) in routing.rules.iter().enumerate() {
        if r.local_model.is_empty() {
            continue;
        }
        let key = format!("routing.rules[{i}].local_model");
        if r.provider != ProviderName::LOCAL {
            return Err(ConfigError::invalid(
                &key,
                "only a rule with provider = \"local\" names a local model",
            ));
        }
        if !names.iter().any(|n| n.eq_ignore_ascii_case(&r.local_model)) {
            let why = format!(
                "no local model is named `{}` (configured: {})",
                r.local_model,
                names.join(", ")
            );
            return Err(ConfigError::invalid(&key, why));
        }
    }
    Ok(())
}
