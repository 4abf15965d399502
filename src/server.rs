//! Putting the parts together: open the store, resolve secrets, build the services and the
//! app, bind the listener (with TLS when asked) and serve until told to stop.

use crate::api::{self, App, Routes};
use crate::auth::{generate_jwt_secret, Auth, AuthSettings};
use crate::chat::{Chat, Keys};
use crate::config::{
    check_jwt_secret, Config, ConfigError, LocalConfig, ProviderConfig, ProviderName,
};
use crate::control;
use crate::http::{self, tls, Limits};
use crate::jobs::Jobs;
use crate::local::{EngineOptions, LoadLimits, LocalError, ModelSpec, Registry};
use crate::logmask;
use crate::secret::{write_private_file, Secret};
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// What the process environment adds to the config (passed in, so tests need not set it).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// systemd's `$STATE_DIRECTORY`.
    pub state_directory: Option<String>,
    /// systemd's `$CREDENTIALS_DIRECTORY` (secrets from `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
    /// `OPENAI_API_KEY`, the conventional last resort for the OpenAI key.
    pub openai_api_key: Option<Secret>,
    /// `HF_TOKEN`, the conventional last resort for the HuggingFace key.
    pub hf_token: Option<Secret>,
}

impl Environment {
    /// Reads the variables from this process.
    pub fn from_process() -> Environment {
        let secret = |name| std::env::var(name).ok().filter(|v| !v.is_empty()).map(Secret::new);
        Environment {
            state_directory: std::env::var("STATE_DIRECTORY").ok(),
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            openai_api_key: secret("OPENAI_API_KEY"),
            hf_token: secret("HF_TOKEN"),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot open the control socket {path}: {source}")]
    Control { path: PathBuf, source: std::io::Error },
    #[error("cannot read secret file {path}: {source}")]
    Secret { path: PathBuf, source: std::io::Error },
    #[error("storage.url makes replicas share one database, so they must sign tokens with one secret: set auth.jwt_secret_file (or the systemd credential jwt_secret, or EDGECHAT_AUTH__JWT_SECRET) to the same 32+ bytes on every replica; a single box's <data_dir>/jwt_secret keeps its sessions valid")]
    SecretNotShared,
    #[error("local model: {0}")]
    Local(#[from] crate::local::LocalError),
    #[error("provider client: {0}")]
    Provider(#[from] crate::llm::ProviderError),
}

/// A running server.
pub struct Running {
    /// The bound address (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    /// `https` when TLS is on.
    pub scheme: &'static str,
    /// The certificate in use and its SHA-256 fingerprint, when TLS is on.
    pub certificate: Option<(PathBuf, String)>,
    /// Where the data lives.
    pub data_dir: PathBuf,
    tls: Option<tls::Reloader>,
    store: Store,
    control: JoinHandle<()>,
    housekeeping: (Arc<Notify>, JoinHandle<()>),
    jobs: Arc<Jobs>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<usize>,
}

impl Running {
    /// Stops accepting, drains in-flight requests within the grace period, and closes the
    /// store. Returns how many connections had to be cut off.
    pub async fn shutdown(self) -> usize {
        let _ = self.stop.send(());
        let cut = self.task.await.unwrap_or(0);
        self.jobs.shutdown().await;
        // Told, not aborted: a purge in flight finishes its write before the store closes.
        self.housekeeping.0.notify_one();
        let _ = self.housekeeping.1.await;
        self.control.abort();
        // Awaiting the aborted task drops its handles on the store before we return.
        let _ = self.control.await;
        let _ = std::fs::remove_file(self.data_dir.join(control::SOCKET));
        cut
    }

    /// Reloads what can change without dropping a connection (`SIGHUP`): the TLS certificate
    /// and key. Says what it did in the log; a failed reload keeps what is in use.
    pub fn reload(&self) {
        let Some(tls) = &self.tls else {
            tracing::info!("reload: nothing to reload (no TLS); other settings need a restart");
            return;
        };
        let path = tls.cert_path().display();
        match tls.reload() {
            Ok(fingerprint) => tracing::info!(
                certificate = %path,
                sha256 = %fingerprint,
                "reload: TLS certificate and key reloaded; other settings need a restart"
            ),
            Err(e) => tracing::error!(
                certificate = %path,
                error = %e,
                "reload: TLS certificate NOT reloaded, the previous one stays in use"
            ),
        }
    }

    /// The server's store, for tests and embedders that write what the API only reads.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The services the CLI's `user` commands need, without a listener.
pub struct Services {
    pub store: Store,
    pub auth: Arc<Auth>,
    pub data_dir: PathBuf,
}

/// Opens the store in the data directory and builds the accounts service.
pub async fn services(config: &Config, env: &Environment) -> Result<Services, StartError> {
    let data_dir = config.data_dir(env.state_directory.as_deref());
    let store = open_store(config, env, &data_dir).await?;
    let secret = jwt_secret(config, &data_dir, env, store.is_shared())?;
    logmask::register("the JWT secret", &secret);
    let settings = AuthSettings::from_config(config, &secret);
    Ok(Services { auth: Arc::new(Auth::new(store.clone(), settings)), store, data_dir })
}

/// The PostgreSQL settings when `storage.url` (or the systemd credential `storage_url`, for a
/// URL that carries a password) selects it.
pub fn postgres(config: &Config, env: &Environment) -> Option<crate::store::PostgresOptions> {
    let s = &config.storage;
    let from_file = || {
        let path = env.credentials_directory.as_ref()?.join("storage_url");
        let text = std::fs::read_to_string(path).ok()?;
        Some(Secret::new(text.trim_end_matches(['\n', '\r'])))
    };
    Some(crate::store::PostgresOptions {
        url: s.url.clone().or_else(from_file)?,
        pool_size: s.pool_size,
        statement_timeout: Duration::from_millis(s.statement_timeout_ms),
        connect_timeout: Duration::from_millis(s.connect_timeout_ms),
        ca_file: s.ca_file.clone(),
    })
}

/// PostgreSQL when `storage.url` is set, else the redb file in `data_dir` (opened on the
/// blocking pool: it reads and writes the file).
async fn open_store(
    config: &Config,
    env: &Environment,
    data_dir: &Path,
) -> Result<Store, StoreError> {
    if let Some(options) = postgres(config, env) {
        if let Some(password) = options.password() {
            logmask::register("the database password", &password);
        }
        return Store::connect(&options).await;
    }
    let dir = data_dir.to_path_buf();
    let cache = config.storage.cache_mb << 20;
    tokio::task::spawn_blocking(move || Store::open_with_cache(&dir, cache))
        .await
        .map_err(|e| StoreError::Db(e.to_string()))?
}

/// Starts serving `routes` (normally `api::routes()`) as `config` says.
pub async fn start(
    config: Config,
    env: &Environment,
    routes: Routes,
) -> Result<Running, StartError> {
    let Services { store, auth, data_dir } = services(&config, env).await?;
    if let Some(token) = &config.metrics.token {
        logmask::register("metrics.token", token);
    }
    let tls = match (&config.tls.cert_file, &config.tls.key_file, config.tls.self_signed) {
        (Some(cert), Some(key), _) => Some(tls::from_pem(cert, key)?),
        (_, _, true) => Some(tls::self_signed(&data_dir)?),
        _ => None,
    };
    raise_open_file_limit(config.server.max_connections);
    let addr = config.server.listen;
    let listener =
        TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    if let Some(warning) = crate::auth::registration_warning(&config.auth, addr) {
        tracing::warn!("{warning}");
    }
    let s = &config.server;
    let limits = Limits {
        max_connections: s.max_connections,
        max_connections_per_address: s.max_connections_per_address,
        handshake_timeout: Duration::from_secs(s.handshake_timeout_secs),
        header_read_timeout: Duration::from_secs(s.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(s.idle_timeout_secs),
        http2_max_concurrent_streams: s.http2_max_concurrent_streams,
        shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
    };
    let certificate = tls.as_ref().map(|t| (t.cert_path.clone(), t.fingerprint.clone()));
    let reloader = tls.as_ref().map(|t| t.reloader.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let control = control::listen(&data_dir, store.clone(), auth.clone())
        .map_err(|source| StartError::Control { path: data_dir.join(control::SOCKET), source })?;
    let chat = Arc::new(chat_service(&config, env, store.clone()).await?);
    let jobs = Jobs::start(store.clone(), chat.clone(), config.jobs.clone()).await?;
    let stop_housekeeping = Arc::new(Notify::new());
    let housekeeping =
        (stop_housekeeping.clone(), tokio::spawn(purge_tokens(store.clone(), stop_housekeeping)));
    let app = App::new(config, store.clone(), auth, chat, jobs.clone(), routes);
    let (stop, stopped) = oneshot::channel::<()>();
    let (service, draining) = (app.service(), app.draining());
    let task = tokio::spawn(async move {
        let cut = http::serve(listener, tls.map(|t| t.acceptor), limits, service, async {
            let _ = stopped.await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
        })
        .await;
        drop(app);
        cut
    });
    Ok(Running {
        addr,
        scheme,
        certificate,
        data_dir,
        tls: reloader,
        store,
        control,
        housekeeping,
        jobs,
        stop,
        task,
    })
}

/// Raises the soft open-file limit to the hard one: every connection is a descriptor, and the
/// usual soft limit (1,024) is below what `server.max_connections` (with the refused
/// connections the transport holds) and the store and model need. Warns when even the hard
/// limit is too low.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let wanted = http::descriptors_needed(max_connections) + 256;
    if limit.rlim_cur < wanted {
        tracing::warn!(
            open_files = limit.rlim_cur,
            wanted,
            "the open-file limit is below 5 × server.max_connections + 256: raise LimitNOFILE \
             (systemd) or `ulimit -n`, or lower server.max_connections"
        );
    }
}

/// Deletes expired refresh tokens every ten minutes, a batch per transaction, and the shared
/// login counters that hold no state any more, until `stop`.
async fn purge_tokens(store: Store, stop: Arc<Notify>) {
    const BATCH: usize = 1000;
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.notified() => return,
        }
        loop {
            match store.purge_expired_refresh_tokens(crate::clock::now_ms(), BATCH).await {
                Ok(n) if n == BATCH => continue,
                Ok(n) => {
                    tracing::debug!(purged = n, "expired refresh tokens deleted");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "purging expired refresh tokens failed");
                    break;
                }
            }
        }
        if let Err(e) = store.purge_counters(crate::clock::now_ms()).await {
            tracing::warn!(error = %e, "purging spent login counters failed");
        }
    }
}

/// Starts the default routes.
pub async fn start_default(config: Config, env: &Environment) -> Result<Running, StartError> {
    start(config, env, api::routes()).await
}

/// The chat service: provider keys resolved, the local model loaded (when its file is there).
async fn chat_service(
    config: &Config,
    env: &Environment,
    store: Store,
) -> Result<Chat, StartError> {
    let keys = provider_keys(config, env)?;
    for (name, key) in &keys.0 {
        logmask::register(&format!("the {name} key"), key);
    }
    let local = load_local(&config.local).await?;
    Ok(Chat::new(store, config, keys, std::sync::Arc::new(local))?)
}

/// Every remote provider's key, where it has one.
fn provider_keys(config: &Config, env: &Environment) -> Result<Keys, StartError> {
    let mut keys = Keys::default();
    for (name, c) in config.providers.all() {
        let from_env = match name {
            ProviderName::OPENAI => env.openai_api_key.clone(),
            ProviderName::HUGGINGFACE => env.hf_token.clone(),
            _ => None,
        };
        if let Some(key) = provider_key(c, &format!("{name}_api_key"), from_env, env)? {
            keys.0.insert(name, key);
        }
    }
    Ok(keys)
}

/// A provider's key: config, then its key file, then systemd's credential `<name>_api_key`,
/// then the conventional environment variable (OpenAI's and HuggingFace's only).
fn provider_key(
    c: &ProviderConfig,
    credential: &str,
    from_env: Option<Secret>,
    env: &Environment,
) -> Result<Option<Secret>, StartError> {
    if let Some(key) = &c.api_key {
        return Ok(Some(key.clone()));
    }
    let read = |path: &Path| -> Result<Option<Secret>, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| StartError::Secret { path: path.into(), source })?;
        Ok(Some(Secret::new(text.trim().to_string())).filter(|s| !s.expose().is_empty()))
    };
    if let Some(path) = &c.api_key_file {
        return read(path);
    }
    if let Some(path) = env.credentials_directory.as_ref().map(|d| d.join(credential)) {
        if path.exists() {
            return read(&path);
        }
    }
    Ok(from_env)
}

/// The local models: every file's header (and chat template) is checked and the fallback model
/// (`local.model`) is loaded now, off the async threads; the others load on first use. A
/// missing file leaves that model out of service (and says how to fetch it); a broken file
/// stops the start.
async fn load_local(c: &LocalConfig) -> Result<Registry, StartError> {
    let (registry, _) = checked_registry(c).await?;
    match registry.fallback() {
        Some(name) => drop(registry.engine(name).await?),
        None if c.enabled => {
            tracing::warn!(path = %c.model.display(), "no local model file: chat has no offline fallback; fetch the default with `bash models/fetch-default.sh`")
        }
        None => {}
    }
    Ok(registry)
}

/// The configured local models, their files checked (none loaded); and a line for each model
/// whose file is missing.
async fn checked_registry(c: &LocalConfig) -> Result<(Registry, Vec<String>), StartError> {
    if !c.enabled {
        let none = LoadLimits { max_loaded: 1, max_bytes: None };
        return Ok((Registry::new(Vec::new(), None, none), Vec::new()));
    }
    let specs = c.settings().into_iter().map(|m| ModelSpec {
        name: m.name,
        path: m.file,
        options: EngineOptions {
            threads: Some(c.threads).filter(|&n| n > 0),
            max_batch: m.max_batch,
            max_queue: m.max_queue,
            context: Some(m.context).filter(|&n| n > 0),
            prompt_cache_mb: m.prompt_cache_mb,
            chat_template: m.chat_template,
        },
    });
    let max_bytes = Some(c.max_memory_mb as u64 * (1 << 20)).filter(|&b| b > 0);
    let limits = LoadLimits { max_loaded: c.max_loaded_models, max_bytes };
    let fallback = c.model.exists().then_some(0);
    let registry = Registry::new(specs.collect(), fallback, limits);
    let checked = tokio::task::spawn_blocking(move || {
        registry.check_files().map(|missing| (registry, missing))
    });
    let stopped = |e: tokio::task::JoinError| {
        LocalError::Generation(format!("checking the model files stopped: {e}"))
    };
    Ok(checked.await.map_err(stopped)??)
}

/// What `serve` would refuse at start, checked without starting: the TLS certificate and key
/// (readable, unencrypted, matching), the JWT secret and provider key files, the local model
/// files and chat templates. Returns warnings for what `serve` only warns of (a missing model
/// file, a secret it would generate).
pub async fn preflight(config: &Config, env: &Environment) -> Result<Vec<String>, StartError> {
    let data_dir = config.data_dir(env.state_directory.as_deref());
    let mut warnings = Vec::new();
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        tls::from_pem(cert, key)?;
    }
    let shared = postgres(config, env).is_some();
    match shared || jwt_secret_configured(config, env, &data_dir) {
        true => drop(jwt_secret(config, &data_dir, env, shared)?),
        false => warnings.push(format!(
            "no JWT secret is configured: one will be generated into {} at first start",
            data_dir.join("jwt_secret").display()
        )),
    }
    provider_keys(config, env)?;
    let (_, missing) = checked_registry(&config.local).await?;
    warnings.extend(missing);
    Ok(warnings)
}

/// Whether a JWT secret is there to be read at start (configured, a credential, or in the data
/// directory), rather than generated: a generated one signs everyone out.
pub fn jwt_secret_configured(config: &Config, env: &Environment, data_dir: &Path) -> bool {
    let credential =
        env.credentials_directory.as_ref().is_some_and(|d| d.join("jwt_secret").exists());
    config.auth.jwt_secret.is_some()
        || config.auth.jwt_secret_file.is_some()
        || credential
        || data_dir.join("jwt_secret").exists()
}

/// The JWT signing secret: config, then a configured file, then systemd's credential
/// `jwt_secret`, then `<data_dir>/jwt_secret`, generated (mode 0600) on first start. A shared
/// store (PostgreSQL) stops before the data directory: a secret there is one replica's own,
/// and a token it signed would be refused by the others.
fn jwt_secret(
    config: &Config,
    data_dir: &Path,
    env: &Environment,
    shared: bool,
) -> Result<Secret, StartError> {
    if let Some(s) = &config.auth.jwt_secret {
        return Ok(s.clone());
    }
    let read = |path: &Path, key: &str| -> Result<Secret, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| StartError::Secret { path: path.into(), source })?;
        let secret = text.trim_end_matches(['\n', '\r']).to_string();
        check_jwt_secret(key, &secret)?;
        Ok(Secret::new(secret))
    };
    if let Some(path) = &config.auth.jwt_secret_file {
        return read(path, "auth.jwt_secret_file");
    }
    if let Some(dir) = &env.credentials_directory {
        let path = dir.join("jwt_secret");
        if path.exists() {
            return read(&path, "credential jwt_secret");
        }
    }
    if shared {
        return Err(StartError::SecretNotShared);
    }
    let path = data_dir.join("jwt_secret");
    if path.exists() {
        return read(&path, "data dir jwt_secret");
    }
    let secret = generate_jwt_secret();
    write_private_file(&path, secret.expose().as_bytes())
        .map_err(|source| StartError::Secret { path: path.clone(), source })?;
    tracing::info!(path = %path.display(), "generated a JWT signing secret");
    Ok(secret)
}
