//! Configuration: `config.toml`, then `EDGECHAT_SECTION__KEY` environment overrides, then a
//! validation pass. Every key has a default, so an empty file (or none) is a valid config.
//!
//! Sources are passed in explicitly (a file's text and an iterator of variables) so that tests
//! feed a map instead of mutating the process environment.

mod chat;

pub use chat::{
    ChatLimitsConfig, LocalConfig, LocalModelConfig, LocalModelSettings, ProviderConfig,
    ProviderKind, ProviderName, ProvidersConfig, RouteRule, RoutingConfig,
};

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The prefix of environment variables that override config keys (`EDGECHAT_SERVER__LISTEN`).
pub const ENV_PREFIX: &str = "EDGECHAT_";

/// Everything `edgechat serve` can be told; see the repository's `config.toml` for each key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub cors: CorsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub local: LocalConfig,
    pub providers: ProvidersConfig,
    pub routing: RoutingConfig,
    pub jobs: JobsConfig,
}

/// Background chat jobs: workers, retries, leases, queue caps and retention.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs run at once (local-model jobs also wait in the engine's own queue).
    pub workers: usize,
    /// Attempts in all before a job that keeps failing is `failed`.
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A running job's claim; renewed while it runs, rescued by another worker once expired.
    pub lease_secs: u64,
    pub max_queued_per_user: u32,
    pub max_queued: u64,
    /// Finished jobs older than this are deleted, a batch at a time.
    pub retention_secs: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            workers: 2,
            max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 60_000,
            lease_secs: 60,
            max_queued_per_user: 100,
            max_queued: 10_000,
            retention_secs: 7 * 24 * 3600,
        }
    }
}

/// The listener and the limits every connection and request keeps.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `IP:port`, or `host:port` resolved once at start (`localhost:8080`).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Per IPv4 address or IPv6 /64, so that one client cannot take every slot.
    pub max_connections_per_address: usize,
    /// From a request head's first byte to its last.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout_secs: u64,
    pub handshake_timeout_secs: u64,
    pub body_read_timeout_secs: u64,
    pub max_body_bytes: usize,
    pub shutdown_grace_secs: u64,
    pub http2_max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_connections: 1024,
            max_connections_per_address: 256,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
            body_read_timeout_secs: 30,
            max_body_bytes: 1024 * 1024,
            shutdown_grace_secs: 20,
            http2_max_concurrent_streams: 128,
        }
    }
}

/// HTTPS: PEM files, or a self-signed certificate kept in the data directory.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub self_signed: bool,
}

/// Where the data lives: the redb file in `data_dir` (the default), or PostgreSQL at `url`,
/// shared by several replicas.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: Option<PathBuf>,
    /// redb's page cache; its own default (1 GiB) would let RSS grow with the file.
    pub cache_mb: usize,
    /// `postgres://…`: PostgreSQL instead of the redb file.
    pub url: Option<Secret>,
    /// PostgreSQL connections this process keeps at most.
    pub pool_size: usize,
    /// The longest one SQL statement (or a wait for a row lock) may take.
    pub statement_timeout_ms: u64,
    /// The longest a new database connection may take.
    pub connect_timeout_ms: u64,
    /// PEM CA certificates trusted for the database's TLS, besides the web's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: None,
            cache_mb: 64,
            url: None,
            pool_size: 16,
            statement_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            ca_file: None,
        }
    }
}

/// Token lifetimes, JWT claims, password hashing concurrency and who may sign up.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether `POST /auth/register` creates accounts (`open`) or answers 403 (`closed`).
    pub registration: RegistrationMode,
    pub jwt_secret: Option<Secret>,
    pub jwt_secret_file: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    pub max_concurrent_hashes: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            registration: RegistrationMode::Open,
            jwt_secret: None,
            jwt_secret_file: None,
            issuer: "edgechat".into(),
            audience: "edgechat".into(),
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            max_concurrent_hashes: 2,
        }
    }
}

/// Who may create an account over HTTP. Closed: only `edgechat user create` and admins
/// (`POST /admin/users`) make accounts, so a reachable port cannot spend the provider keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    #[default]
    Open,
    Closed,
}

/// One GCRA quota: `requests` per `per_secs` on average, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub requests: u32,
    pub per_secs: u64,
    pub burst: u32,
}

/// Limits on `/auth/*` per client address and on failed logins (see `auth::limits`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub auth_per_address: QuotaConfig,
    /// Failed logins for one username from one address; beyond it that pair answers 429.
    pub failed_logins_per_address_and_username: QuotaConfig,
    /// Failed logins from one address for any usernames; beyond it the address answers 429.
    pub failed_logins_per_address: QuotaConfig,
    /// Failed logins for one username from anywhere; beyond it its logins are slowed by
    /// `login_slowdown_ms`, never refused (refusing would let anyone lock the user out).
    pub failed_logins_per_username: QuotaConfig,
    pub login_slowdown_ms: u64,
    /// Per user on `/chat` and `/v1/chat/completions`.
    pub chat_per_user: ChatLimitsConfig,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            auth_per_address: QuotaConfig { requests: 60, per_secs: 60, burst: 20 },
            failed_logins_per_address_and_username: QuotaConfig {
                requests: 10,
                per_secs: 900,
                burst: 5,
            },
            failed_logins_per_address: QuotaConfig { requests: 30, per_secs: 900, burst: 20 },
            failed_logins_per_username: QuotaConfig { requests: 10, per_secs: 900, burst: 5 },
            login_slowdown_ms: 1_000,
            chat_per_user: ChatLimitsConfig::default(),
        }
    }
}

/// Cross-origin access for browser clients; none allowed by default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    pub max_age_secs: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig { allowed_origins: Vec::new(), max_age_secs: 600 }
    }
}

/// `GET /metrics`: on by default for loopback scrapers; a token opens it to others.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// When set, scrapers from any address must send `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true, token: None }
    }
}

/// Log verbosity (a `tracing` filter) and line format.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

/// How log lines are written: for people (`text`) or for collectors (`json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Why a configuration was refused; every message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

impl Config {
    /// Reads `path` (when given) and applies `EDGECHAT_*__*` overrides from `env`, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        Self::load_with_origins(path, env).map(|(config, _)| config)
    }

    /// `load`, and where each value came from.
    pub fn load_with_origins(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Origins), ConfigError> {
        let shown = path.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("<defaults>"));
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?,
            None => String::new(),
        };
        let mut root: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::Syntax { path: shown.clone(), message: e.to_string() })?;
        let mut origins = Origins::default();
        leaves("", &toml::Value::Table(root.clone()), &mut |key, _| {
            origins.file.insert(key);
        });
        let mut overrides =
            env.into_iter().filter_map(env_override).collect::<Result<Vec<_>, _>>()?;
        overrides.sort();
        for o in overrides {
            origins.set_by(&o.keys.join("."), &o.var);
            set_path(&mut root, &o.keys, parse_env_value(&o.raw))?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| ConfigError::invalid(&e.path().to_string(), e.inner().message()))?;
        config.validate()?;
        Ok((config, origins))
    }

    /// The second pass: values that parse but make no sense. Run again after flags change it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let positive = [
            ("server.max_connections", s.max_connections as u64),
            ("server.max_connections_per_address", s.max_connections_per_address as u64),
            ("server.header_read_timeout_secs", s.header_read_timeout_secs),
            ("server.idle_timeout_secs", s.idle_timeout_secs),
            ("server.handshake_timeout_secs", s.handshake_timeout_secs),
            ("server.body_read_timeout_secs", s.body_read_timeout_secs),
            ("server.max_body_bytes", s.max_body_bytes as u64),
            ("server.http2_max_concurrent_streams", s.http2_max_concurrent_streams as u64),
            ("auth.access_token_ttl_secs", self.auth.access_token_ttl_secs),
            ("auth.refresh_token_ttl_secs", self.auth.refresh_token_ttl_secs),
            ("auth.max_concurrent_hashes", self.auth.max_concurrent_hashes as u64),
            ("jobs.workers", self.jobs.workers as u64),
            ("jobs.max_attempts", self.jobs.max_attempts.into()),
            ("jobs.lease_secs", self.jobs.lease_secs),
            ("jobs.max_queued_per_user", self.jobs.max_queued_per_user.into()),
            ("jobs.max_queued", self.jobs.max_queued),
            ("jobs.retention_secs", self.jobs.retention_secs),
            ("storage.pool_size", self.storage.pool_size as u64),
            ("storage.statement_timeout_ms", self.storage.statement_timeout_ms),
            ("storage.connect_timeout_ms", self.storage.connect_timeout_ms),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be greater than 0"));
            }
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::invalid(
                "tls.cert_file",
                "tls.cert_file and tls.key_file must be given together",
            ));
        }
        if self.tls.self_signed && self.tls.cert_file.is_some() {
            return Err(ConfigError::invalid(
                "tls.self_signed",
                "cannot be combined with tls.cert_file; choose one",
            ));
        }
        for (key, value) in
            [("auth.issuer", &self.auth.issuer), ("auth.audience", &self.auth.audience)]
        {
            if value.trim().is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
        }
        if let Some(secret) = &self.auth.jwt_secret {
            check_jwt_secret("auth.jwt_secret", secret.expose())?;
        }
        let limits = &self.rate_limit;
        for (key, q) in [
            ("rate_limit.auth_per_address", limits.auth_per_address),
            (
                "rate_limit.failed_logins_per_address_and_username",
                limits.failed_logins_per_address_and_username,
            ),
            ("rate_limit.failed_logins_per_address", limits.failed_logins_per_address),
            ("rate_limit.failed_logins_per_username", limits.failed_logins_per_username),
            ("rate_limit.chat_per_user.requests", limits.chat_per_user.requests),
            ("rate_limit.chat_per_user.tokens", limits.chat_per_user.tokens),
        ] {
            if q.requests == 0 || q.per_secs == 0 || q.burst == 0 {
                return Err(ConfigError::invalid(key, "requests, per_secs and burst must be > 0"));
            }
        }
        if limits.login_slowdown_ms > MAX_LOGIN_SLOWDOWN_MS {
            let message = format!("must be at most {MAX_LOGIN_SLOWDOWN_MS} (clients time out)");
            return Err(ConfigError::invalid("rate_limit.login_slowdown_ms", message));
        }
        for origin in &self.cors.allowed_origins {
            let ok =
                origin == "*" || origin.starts_with("http://") || origin.starts_with("https://");
            if !ok || origin.ends_with('/') {
                return Err(ConfigError::invalid(
                    "cors.allowed_origins",
                    format!("`{origin}` is not an origin like https://example.com (or \"*\")"),
                ));
            }
        }
        log_filter(&self.log.level).map_err(|e| ConfigError::invalid("log.level", e))?;
        self.validate_storage()?;
        chat::validate(&self.local, &self.providers, &self.routing)
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.storage.url {
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::invalid(
                    "storage.url",
                    "must be a PostgreSQL URL: postgres://USER:PASSWORD@HOST:PORT/DATABASE (leave it unset for the redb file)",
                ));
            }
        }
        Ok(())
    }

    /// The data directory: config (or `--data-dir`), then systemd's `$STATE_DIRECTORY`, then `./data`.
    pub fn data_dir(&self, state_directory: Option<&str>) -> PathBuf {
        if let Some(dir) = &self.storage.data_dir {
            return dir.clone();
        }
        match state_directory.and_then(|s| s.split(':').next()).filter(|s| !s.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from("data"),
        }
    }
}

/// A login slowed longer than this looks like a hung server to most clients.
const MAX_LOGIN_SLOWDOWN_MS: u64 = 10_000;

/// A JWT secret shorter than 32 bytes is guessable offline from any token it signed.
pub fn check_jwt_secret(key: &str, secret: &str) -> Result<(), ConfigError> {
    if secret.len() < 32 {
        return Err(ConfigError::invalid(key, "must be at least 32 bytes long"));
    }
    Ok(())
}

/// Parses a `tracing` filter (`log.level` or `RUST_LOG`), stricter than `EnvFilter` itself:
/// every directive must end in a level — `info`, `edgechat=debug` — because `EnvFilter` reads a
/// bare word that is not a level (`inf0`) as a target name, which silences every other line.
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::filter::LevelFilter;
    let levels = "error, warn, info, debug, trace or off";
    let directives: Vec<&str> = spec.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    if directives.is_empty() {
        return Err(format!("must name a level: {levels}"));
    }
    for d in directives {
        let level = d.rsplit_once('=').map_or(d, |(_, level)| level).trim();
        if level.is_empty() || level.parse::<LevelFilter>().is_err() {
            return Err(format!("`{spec}`: `{d}` is not a level; write {levels}, or TARGET=LEVEL"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| format!("`{spec}`: {e}"))
}

/// Variables of the command line's own flags, not config keys.
const CLI_VARIABLES: [&str; 2] = ["EDGECHAT_CONFIG", "EDGECHAT_DATA_DIR"];

/// `EDGECHAT_SERVER__MAX_BODY_BYTES` → (["server", "max_body_bytes"], value). Any other
/// `EDGECHAT_*` name is a typo that would otherwise be silently ignored.
/// `text` as a socket address: an `IP:port`, or a `host:port` resolved now (the first address
/// the resolver gives).
pub fn resolve_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if text.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
        return Err(format!("`{text}` is not HOST:PORT (like 127.0.0.1:8000 or localhost:8000)"));
    }
    use std::net::ToSocketAddrs;
    let mut found = text.to_socket_addrs().map_err(|e| format!("cannot resolve `{text}`: {e}"))?;
    found.next().ok_or_else(|| format!("`{text}` resolves to no address"))
}

fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    resolve_listen(&text).map_err(serde::de::Error::custom)
}

/// Where each configuration value came from: `config check` says it for every key, since a
/// unit's `Environment=` silently wins over the file.
#[derive(Debug, Default)]
pub struct Origins {
    /// Keys the file sets (leaves, dotted).
    file: std::collections::BTreeSet<String>,
    /// Keys the environment or a flag sets, and the variable or flag that set each.
    env: std::collections::BTreeMap<String, String>,
}

impl Origins {
    /// Records that `by` (a variable or a command-line flag) set `key`.
    pub fn set_by(&mut self, key: &str, by: &str) {
        self.env.insert(key.to_owned(), by.to_owned());
    }

    /// Where `key`'s value came from: `EDGECHAT_…` (saying when it overrides the file), the
    /// file, or the default.
    pub fn of(&self, key: &str) -> String {
        let covers = |k: &str| key == k || key.starts_with(&format!("{k}."));
        let in_file = self.file.iter().any(|k| covers(k) || k.starts_with(&format!("{key}.")));
        match self.env.iter().find(|(k, _)| covers(k)) {
            Some((_, var)) if in_file => format!("{var} (overrides the file)"),
            Some((_, var)) => var.clone(),
            None if in_file => "file".into(),
            None => "default".into(),
        }
    }
}

/// Calls `each` with every leaf of `value` under `prefix`: its dotted key and its value.
pub fn leaves(prefix: &str, value: &toml::Value, each: &mut impl FnMut(String, &toml::Value)) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(&key, v, each);
            }
        }
        _ => each(prefix.to_owned(), value),
    }
}

/// One `EDGECHAT_SECTION__KEY` variable: the key's path, its raw value, and its name.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Override {
    keys: Vec<String>,
    raw: String,
    var: String,
}

fn env_override((name, value): (String, String)) -> Option<Result<Override, ConfigError>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if CLI_VARIABLES.contains(&name.as_str()) {
        return None;
    }
    if !rest.contains("__") {
        let message = "is not a config key; overrides are named EDGECHAT_<SECTION>__<KEY>";
        return Some(Err(ConfigError::invalid(&name, message)));
    }
    let keys = rest.split("__").map(str::to_ascii_lowercase).collect();
    Some(Ok(Override { keys, raw: value, var: name }))
}

/// Environment values are TOML scalars or arrays when they parse as such, strings otherwise.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(
    root: &mut toml::Table,
    keys: &[String],
    value: toml::Value,
) -> Result<(), ConfigError> {
    let (last, parents) = keys.split_last().expect("split on `__` yields at least one key");
    let mut table = root;
    for (i, key) in parents.iter().enumerate() {
        let entry =
            table.entry(key.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry.as_table_mut().ok_or_else(|| {
            ConfigError::invalid(&keys[..=i].join("."), "is a value, not a section")
        })?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn load_text(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), env(vars))
    }

    #[test]
    fn the_documented_file_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        assert_eq!(Config::load(Some(&path), []).unwrap(), Config::default());
    }

    #[test]
    fn env_overrides_file_and_parses_types() {
        let c = load_text(
            "[server]\nmax_body_bytes = 10\n",
            &[
                ("EDGECHAT_SERVER__MAX_BODY_BYTES", "2048"),
                ("EDGECHAT_CORS__ALLOWED_ORIGINS", r#"["https://a.example"]"#),
                ("EDGECHAT_LOG__FORMAT", "json"),
                ("EDGECHAT_CONFIG", "ignored.toml"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.max_body_bytes, 2048);
        assert_eq!(c.cors.allowed_origins, vec!["https://a.example".to_string()]);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = load_text("[server]\nlisen = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("server") && e.contains("lisen"), "{e}");
        let e = load_text("", &[("EDGECHAT_SERVER__LISTEN", "nowhere")]).unwrap_err().to_string();
        assert!(e.contains("server.listen"), "{e}");
        let e = load_text("", &[("EDGECHAT_AUTH__JWT_SECRET", "short")]).unwrap_err().to_string();
        assert!(e.contains("auth.jwt_secret") && !e.contains("short"), "{e}");
        let e = load_text("[server]\nmax_body_bytes = 0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("server.max_body_bytes"), "{e}");
        let e = load_text("", &[("EDGECHAT_NOPE__X", "1")]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = load_text("", &[("EDGECHAT_SERVER_LISTEN", "0.0.0.0:1")]).unwrap_err().to_string();
        assert!(e.contains("EDGECHAT_SERVER_LISTEN"), "a typo is named, not ignored: {e}");
        let e = load_text("[log]\nlevel = \"=[\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("log.level"), "{e}");
        let e = load_text("[auth]\nregistration = \"maybe\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("auth.registration"), "{e}");
        let c = load_text("", &[("EDGECHAT_AUTH__REGISTRATION", "closed")]).unwrap();
        assert_eq!(c.auth.registration, RegistrationMode::Closed);
        let e = load_text("[rate_limit]\nlogin_slowdown_ms = 60000\n", &[]).unwrap_err();
        assert!(e.to_string().contains("rate_limit.login_slowdown_ms"), "{e}");
        for bad in ["inf0", "info,hyper", "edgechat=loud", " , "] {
            let text = format!("[log]\nlevel = \"{bad}\"\n");
            let e = load_text(&text, &[]).unwrap_err().to_string();
            assert!(e.contains("log.level"), "{bad}: {e}");
        }
        for good in ["info", "WARN,edgechat=debug", "edgechat::access=off, info", "3"] {
            assert!(log_filter(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn named_providers_are_openai_compatible_and_rules_name_configured_ones() {
        let vllm = "[providers.vllm]\nkind = \"openai\"\nbase_url = \"http://10.0.0.5:8000/v1\"\n\
            models = [\"llama-3\"]\nattempts = 1\n";
        let rule = "[routing]\nrules = [{ model = \"llama-*\", provider = \"vllm\", fallback = [\"openai\"] }]\n";
        let c = load_text(&format!("{vllm}{rule}"), &[]).unwrap();
        let p = &c.providers.named["vllm"];
        assert_eq!(
            (p.base_url.as_str(), p.attempts, p.first_byte_timeout_ms),
            ("http://10.0.0.5:8000/v1", 1, 30_000)
        );
        assert_eq!(c.routing.rules[0].fallback, [ProviderName::OPENAI]);
        let names: Vec<&str> = c.providers.all().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["openai", "huggingface", "vllm"]);
        // `config check` writes it back the way it reads.
        let again = toml::to_string(&c).unwrap();
        assert_eq!(load_text(&again, &[]).unwrap().providers, c.providers);
        for (text, words) in [
            (vllm.replace("kind = \"openai\"\n", ""), "providers.vllm.kind"),
            (vllm.replace("\"openai\"", "\"grpc\""), "providers"),
            (vllm.replace("http://10.0.0.5:8000/v1", ""), "providers.vllm.base_url"),
            (format!("{vllm}[providers.openai]\nkind = \"openai\"\n"), "providers.openai.kind"),
            ("[providers.Bad_Name]\nkind = \"openai\"\n".into(), "Bad_Name"),
            (rule.into(), "routing.rules[0].provider"),
            (format!("{vllm}{}", rule.replace("openai", "nowhere")), "routing.rules[0].fallback"),
        ] {
            let e = load_text(&text, &[]).unwrap_err().to_string();
            assert!(e.contains(words), "{text}: {e}");
        }
    }

    #[test]
    fn local_models_inherit_local_settings_and_are_checked() {
        let models =
            "[local]\nmax_batch = 2\n[[local.models]]\nfile = \"m/Qwen.gguf\"\ncontext = 512\n";
        let c = load_text(models, &[]).unwrap();
        let [main, qwen] = &c.local.settings()[..] else { panic!("two models") };
        assert_eq!((main.name.as_str(), main.max_batch), ("SmolLM2-135M-Instruct.Q4_1", 2));
        assert_eq!((qwen.name.as_str(), qwen.max_batch, qwen.context), ("Qwen", 2, 512));
        let rule = "[routing]\nrules = [{ model = \"fast-*\", provider = \"local\", local_model = \"qwen\" }]\n";
        assert!(load_text(&format!("{models}{rule}"), &[]).is_ok());
        let bad = [
            (format!("{models}[[local.models]]\nfile = \"x/qwen.gguf\"\n"), "local.models[1].name"),
            (
                format!("{models}[[local.models]]\nfile = \"\"\nname = \"y\"\n"),
                "local.models[1].file",
            ),
            (
                format!("{models}[[local.models]]\nfile = \"a\"\nname = \"local\"\n"),
                "local.models[1].name",
            ),
            (
                format!("{models}[[local.models]]\nfile = \"a\"\nthreads = 3\n"),
                "local.models[1].threads",
            ),
            (
                format!("{models}[[local.models]]\nfile = \"a\"\nmax_batch = 0\n"),
                "local.models[1].max_batch",
            ),
            (format!("{models}[[local.models]]\nfile = \"a\"\nbatch = 2\n"), "batch"),
            ("[local]\nmax_loaded_models = 0\n".into(), "local.max_loaded_models"),
            (rule.replace("qwen", "llama"), "routing.rules[0].local_model"),
            (rule.replace("\"local\"", "\"openai\""), "routing.rules[0].local_model"),
        ];
        for (text, key) in bad {
            let e = load_text(&text, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_provider_key_keeps_that_provider_s_other_defaults() {
        let c = load_text(
            "[providers.huggingface]\nmodels = [\"org/m\"]\n",
            &[("EDGECHAT_PROVIDERS__OPENAI__API_KEY", "sk-x")],
        )
        .unwrap();
        assert_eq!(c.providers.openai.base_url, "https://api.openai.com/v1");
        assert_eq!(c.providers.openai.api_key.as_ref().map(|k| k.expose()), Some("sk-x"));
        assert_eq!(c.providers.huggingface.base_url, "https://router.huggingface.co/v1");
        assert_eq!(c.providers.huggingface.models, ["org/m"]);
        let e = load_text("[providers.openai]\nbase_ur = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("providers.openai") && e.contains("base_ur"), "{e}");
    }

    #[test]
    fn data_dir_prefers_config_then_systemd_then_default() {
        let mut c = Config::default();
        assert_eq!(c.data_dir(None), PathBuf::from("data"));
        assert_eq!(c.data_dir(Some("/var/lib/edgechat")), PathBuf::from("/var/lib/edgechat"));
        c.storage.data_dir = Some("/srv/x".into());
        assert_eq!(c.data_dir(Some("/var/lib/edgechat")), PathBuf::from("/srv/x"));
    }
}
