//! The `edgechat` command line: `serve`, `user …`, `config check`, `chat`, `model …`, `health`.

use crate::auth::{check_email, check_password, check_username};
use crate::config::{Config, LogFormat, Origins};
use crate::control::{self, Command};
use crate::local;
use crate::secret::Secret;
use crate::server::{self, Environment, StartError};
use crate::signals::{self, Signals};
use crate::store::{self, Store, StoreError};
use crate::systemd;
use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, IsTerminal};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// edgechat: a complete AI chat service in one binary.
///
/// Configuration comes from `config.toml` (see --config), then `EDGECHAT_SECTION__KEY`
/// environment variables (for example `EDGECHAT_SERVER__LISTEN=0.0.0.0:8443`), then the flags.
#[derive(Debug, Parser)]
#[command(name = "edgechat", version, about, long_about)]
pub struct Cli {
    /// Config file [default: ./config.toml when it exists, otherwise built-in defaults]
    #[arg(long, global = true, env = "EDGECHAT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Where the database and generated secrets live
    /// [default: storage.data_dir, else $STATE_DIRECTORY, else ./data]
    #[arg(long, global = true, env = "EDGECHAT_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the HTTP(S) server until SIGTERM or SIGINT
    Serve(ServeArgs),
    /// Manage accounts, with the server stopped or running (through its control socket)
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect the configuration
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Chat with the local model in the terminal (or answer one prompt with -p)
    Chat(ChatArgs),
    /// List and fetch local model files
    #[command(subcommand)]
    Model(ModelCommand),
    /// Write a consistent copy of the database to PATH, while the server runs or not
    Backup {
        /// Where the copy goes; must not exist yet
        path: PathBuf,
    },
    /// Replace the database with the backup at PATH (stop the server first); the replaced
    /// file is kept beside it
    Restore { path: PathBuf },
    /// Exit 0 when the server answers and its store can write: GET /ready, whose storage
    /// must be "ok" (chat providers do not count); for container health checks
    Health(HealthArgs),
    /// Move between storage backends
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a redb file (a stopped server's, or a backup of a running one) into an empty
    /// PostgreSQL database: every table, in one transaction, verified by counts
    Copy {
        /// The redb file, such as /var/lib/edgechat/edgechat.redb or a backup
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE); from the
        /// environment keeps the password out of the process list
        #[arg(long, value_name = "URL", env = "EDGECHAT_STORAGE__URL", hide_env_values = true)]
        to: String,
    },
}

#[derive(Debug, Args)]
struct HealthArgs {
    /// What to probe [default: /ready at server.listen over loopback, https when TLS is
    /// configured, its certificate not verified]
    #[arg(long, value_name = "URL")]
    url: Option<String>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    /// Answer this one prompt on stdout and exit
    #[arg(short, long)]
    prompt: Option<String>,
    /// GGUF model file
    #[arg(long, value_name = "FILE", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// A system message to start the conversation with
    #[arg(long)]
    system: Option<String>,
    /// Most tokens in one answer
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 answers greedily (the same every time) [default: the model's, as the server uses:
    /// its GGUF's general.sampling.temp, else 0.2]
    #[arg(long)]
    temperature: Option<f32>,
    /// Makes sampling at a temperature above 0 repeatable
    #[arg(long)]
    seed: Option<u64>,
    /// Compute threads [default: every core]
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Show the configured local models and their state, and the GGUF files in a directory
    List {
        /// [default: the directory of local.model, else models]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Download FILE from Hugging Face hub repository REPO (honours HF_ENDPOINT and HF_TOKEN)
    Pull {
        repo: String,
        file: String,
        #[arg(long, value_name = "DIR", default_value = "models")]
        dir: PathBuf,
        /// Seconds to wait for the hub's answer, and then for each piece of the file
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on, IP:PORT or HOST:PORT [default: server.listen, 127.0.0.1:8000]
    #[arg(long, value_name = "ADDR", value_parser = crate::config::resolve_listen)]
    listen: Option<SocketAddr>,
    /// Serve HTTPS with a certificate generated once and kept in the data directory
    #[arg(long)]
    tls_self_signed: bool,
    /// Write logs as JSON lines
    #[arg(long)]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account; the password is read from stdin (prompted on a terminal)
    Create {
        username: String,
        #[arg(long)]
        email: String,
        /// Make the account an administrator
        #[arg(long)]
        admin: bool,
    },
    /// List every account
    List,
    /// Disable an account: its tokens and API keys stop working at once
    Disable { username: String },
    /// Re-enable a disabled account
    Enable { username: String },
    /// Set a new password, read from stdin (prompted on a terminal); ends the account's sessions
    ResetPassword { username: String },
    /// Delete an account with its conversations, API keys, sessions and background jobs (not
    /// the last admin)
    Delete {
        username: String,
        /// Confirm: the account's data cannot be brought back (but from a backup)
        #[arg(long)]
        yes: bool,
    },
    /// Make an account an administrator
    GrantAdmin { username: String },
    /// Take administrator rights away (not from the last admin)
    RevokeAdmin { username: String },
    /// List an account's API keys (the keys themselves are never stored)
    Keys { username: String },
    /// Revoke one of an account's API keys at once
    RevokeKey { username: String, key_id: String },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the effective values, secrets redacted
    Check,
}

/// Runs the command line; the binary's `main` is just this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

/// Fixes glibc's mmap threshold, as the binary does before anything allocates.
///
/// glibc raises its mmap threshold each time a large block is freed, so after the first
/// password hash (19 MiB) every later one comes from a per-thread heap that keeps the memory:
/// under mixed load that held RSS at ~640 MB instead of ~260 MB (`cargo bench --bench soak`).
/// A fixed 4 MiB threshold keeps such blocks in mmap, returned to the system when freed, while
/// the model's smaller per-token buffers still come from the heap.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {}", crate::logmask::Secrets::global().mask_str(&message));
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> Result<(), String> {
    let env = Environment::from_process();
    let Cli { config, data_dir, command } = cli;
    let configured = || load_config(config.clone(), data_dir.clone());
    match command {
        Cmd::Serve(args) => serve(configured()?.0, args, &env).await,
        Cmd::User(cmd) => user(configured()?.0, cmd, &env).await,
        Cmd::Config(ConfigCommand::Check) => {
            let (config, source, origins) = configured()?;
            config_check(config, &source, &origins, &env).await
        }
        // The local model needs no configuration or data directory.
        Cmd::Chat(args) => chat(args).await,
        Cmd::Backup { path } => backup(configured()?.0, path, &env).await,
        Cmd::Restore { path } => {
            let config = configured()?.0;
            if server::postgres(&config, &env).is_some() {
                return Err(POSTGRES_BACKUP.into());
            }
            let data_dir = config.data_dir(env.state_directory.as_deref());
            let secret_dir = data_dir.clone();
            let replaced = tokio::task::spawn_blocking(move || store::restore(&path, &data_dir))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            match replaced {
                Some(old) => {
                    println!("restored; the previous database is kept at {}", old.display())
                }
                None => println!("restored"),
            }
            if !server::jwt_secret_configured(&config, &env, &secret_dir) {
                println!(
                    "note: {} has no jwt_secret and none is configured: the server will generate \
                     a new one, which signs everyone out. To keep sessions, copy the jwt_secret \
                     of the data directory the backup came from here first.",
                    secret_dir.display()
                );
            }
            Ok(())
        }
        Cmd::Model(ModelCommand::List { dir }) => {
            // A configuration that does not load still leaves the files to list.
            let local = configured().map(|(c, ..)| c.local).ok();
            let models = local.iter().filter(|l| l.enabled).flat_map(|l| l.settings());
            let models: Vec<_> = models.map(|m| (m.name, m.file)).collect();
            let beside =
                local.as_ref().and_then(|l| l.model.parent()).filter(|p| !p.as_os_str().is_empty());
            let dir = dir.or_else(|| beside.map(PathBuf::from)).unwrap_or_else(|| "models".into());
            local::cli::list(&models, &dir)
        }
        Cmd::Model(ModelCommand::Pull { repo, file, dir, timeout }) => {
            local::cli::pull(&repo, &file, &dir, timeout).await
        }
        Cmd::Health(args) => health(configured()?.0, args).await,
        Cmd::Store(StoreCommand::Copy { from, to }) => store_copy(&from, to).await,
    }
}

/// `store copy`: prints each table's rows once the copy has committed.
async fn store_copy(from: &std::path::Path, to: String) -> Result<(), String> {
    let options = store::PostgresOptions::new(Secret::new(to));
    let report = Store::copy(from, &options).await.map_err(|e| match e {
        StoreError::AlreadyInUse { .. } => format!(
            "{}: a running edgechat holds this file; stop it, or copy a backup (edgechat backup FILE)",
            from.display()
        ),
        other => other.to_string(),
    })?;
    for (table, rows) in &report {
        println!("{table:<16} {rows:>10} rows");
    }
    println!("copied {} into the database and verified every table's count", from.display());
    Ok(())
}

/// What `backup` and `restore` say when the store is PostgreSQL.
const POSTGRES_BACKUP: &str = "storage.url is set: the store is PostgreSQL, which edgechat does not back up or restore; use pg_dump --format=custom and pg_restore (or your provider's snapshots). edgechat backup and restore work on the redb file";

/// Backs up through the running server's control socket, or directly when none runs.
async fn backup(config: Config, path: PathBuf, env: &Environment) -> Result<(), String> {
    if server::postgres(&config, env).is_some() {
        return Err(POSTGRES_BACKUP.into());
    }
    let data_dir = config.data_dir(env.state_directory.as_deref());
    if !data_dir.join(store::FILE_NAME).exists() {
        return Err(format!("no database in {}", data_dir.display()));
    }
    // The server runs elsewhere: a relative path would land in its working directory.
    let path = std::path::absolute(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let dir = data_dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || Store::open(&dir)).await.map_err(|e| e.to_string())?;
    let bytes = match opened {
        Ok(store) => control::backup(&store, path.clone()).await?,
        Err(StoreError::AlreadyInUse { .. }) => control::receive_backup(&data_dir, &path).await?,
        Err(e) => return Err(e.to_string()),
    };
    println!("backed up to {} ({bytes} bytes)", path.display());
    Ok(())
}

/// `GET /ready` on the server this configuration describes (or on `--url`): healthy when it
/// answers 200, or 503 with `storage: "ok"` (no chat provider up: a restart would not bring one
/// back). A store that cannot write (a full disk) is unhealthy, so it shows in `docker ps`.
/// It asks whether our own server on loopback is alive, not who it is, so that probe skips
/// certificate checks.
async fn health(config: Config, args: HealthArgs) -> Result<(), String> {
    let own = args.url.is_none();
    let url = args.url.unwrap_or_else(|| {
        let mut addr = config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        let t = &config.tls;
        let tls = t.self_signed || (t.cert_file.is_some() && t.key_file.is_some());
        format!("{}://{addr}/ready", if tls { "https" } else { "http" })
    });
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .danger_accept_invalid_certs(own)
        .build()
        .map_err(|e| e.to_string())?;
    let answer = client.get(&url).send().await.map_err(|e| {
        // reqwest's message names the URL; the reason (refused, TLS…) is in its sources.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        message
    })?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    let reasons = body.get("reasons").map(|r| r.to_string()).unwrap_or_default();
    match (status.as_u16(), body["storage"].as_str()) {
        (200, _) | (503, Some("ok")) => println!("{url}: {status} {reasons}"),
        (_, Some(storage)) => {
            return Err(format!("{url} answered {status}: storage {storage} {reasons}"))
        }
        _ => return Err(format!("{url} answered {status}")),
    }
    Ok(())
}

async fn chat(args: ChatArgs) -> Result<(), String> {
    local::cli::chat(local::cli::ChatOptions {
        model: args.model,
        prompt: args.prompt,
        system: args.system,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        threads: args.threads,
    })
    .await
}

/// The config file (`--config`, else `./config.toml` if present), then the environment, then
/// `--data-dir`; returns it with a description of its source.
fn load_config(
    file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
) -> Result<(Config, String, Origins), String> {
    let path = file.or_else(|| {
        let local = PathBuf::from("config.toml");
        local.exists().then_some(local)
    });
    let (mut config, mut origins) =
        Config::load_with_origins(path.as_deref(), std::env::vars()).map_err(|e| e.to_string())?;
    if data_dir.is_some() {
        config.storage.data_dir = data_dir;
        origins.set_by("storage.data_dir", "--data-dir");
    }
    let source =
        path.map(|p| p.display().to_string()).unwrap_or_else(|| "built-in defaults".into());
    Ok((config, source, origins))
}

/// `config check`: what `serve` would refuse (the configuration, and the files it names),
/// then every effective value with where it came from, secrets redacted.
async fn config_check(
    config: Config,
    source: &str,
    origins: &Origins,
    env: &Environment,
) -> Result<(), String> {
    log_filter(&config)?;
    let warnings = server::preflight(&config, env).await.map_err(|e| e.to_string())?;
    let data_dir = config.data_dir(env.state_directory.as_deref());
    let mut out = format!("# config: {source}; data directory: {}\n", data_dir.display());
    out += "# each value, and where it came from: the file, an EDGECHAT_ variable, a flag or the default\n";
    let value = toml::Value::try_from(&config).map_err(|e| e.to_string())?;
    crate::config::leaves("", &value, &mut |key, value| {
        out += &format!("{key} = {value}  # {}\n", origins.of(&key));
    });
    for warning in warnings {
        out += &format!("# warning: {warning}\n");
    }
    // Written at once, a closed pipe (`| head`) ignored: the checks above decide the status.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

async fn serve(mut config: Config, args: ServeArgs, env: &Environment) -> Result<(), String> {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if args.tls_self_signed {
        config.tls.self_signed = true;
    }
    if args.log_json {
        config.log.format = LogFormat::Json;
    }
    config.validate().map_err(|e| e.to_string())?;
    init_logging(&config)?;
    let mut signals = Signals::install();
    let running = server::start_default(config, env).await.map_err(|e| e.to_string())?;
    println!("data directory: {}", running.data_dir.display());
    if let Some((path, fingerprint)) = &running.certificate {
        println!("tls certificate: {} (sha256 {fingerprint})", path.display());
    }
    // Last, so that whoever waits for this line has everything above it.
    let url = format!("{}://{}", running.scheme, running.addr);
    println!("edgechat {} listening on {url}", env!("CARGO_PKG_VERSION"));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        url,
        data_dir = %running.data_dir.display(),
        "listening"
    );
    // The store is open, the listener bound and the local model loaded: tell systemd.
    let notifier = systemd::Notifier::from_env().map(Arc::new);
    let watchdog = notifier.as_ref().map(|n| {
        n.notify(&format!("READY=1\nSTATUS=serving on {}://{}", running.scheme, running.addr));
        tokio::spawn(n.clone().keep_alive(running.store().clone()))
    });
    while signals.next().await == signals::Request::Reload {
        running.reload();
    }
    if let Some(n) = &notifier {
        n.notify("STOPPING=1\nSTATUS=draining connections");
    }
    // systemd stops watching once the unit is stopping.
    if let Some(w) = watchdog {
        w.abort();
        let _ = w.await;
    }
    tokio::select! {
        cut = running.shutdown() => tracing::info!(cut_off_connections = cut, "stopped"),
        // An operator who signals twice wants out now; committed data is safe either way.
        _ = signals.next_stop() => return Err("second signal: stopped without draining".into()),
    }
    Ok(())
}

/// The log filter: `RUST_LOG` when set (and not empty), else `log.level`; either is refused,
/// naming its source, when a directive has no known level (`inf0` would silence every line).
fn log_filter(config: &Config) -> Result<tracing_subscriber::EnvFilter, String> {
    let (source, spec) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => ("environment variable RUST_LOG".to_string(), v),
        _ => ("config key `log.level`".to_string(), config.log.level.clone()),
    };
    crate::config::log_filter(&spec).map_err(|e| format!("{source}: {e}"))
}

fn init_logging(config: &Config) -> Result<(), String> {
    let filter = log_filter(config)?;
    // Every line passes the masking writer: no configured secret reaches stderr. Colour only
    // for a person at a terminal: a journal or a file gets plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(crate::logmask::Masked::stderr());
    let _ = match config.log.format {
        // The request's span (its id) as one `span` object; the list of spans says no more.
        LogFormat::Json => builder.json().flatten_event(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A panic's message goes through the log (and its masking) instead of straight to stderr.
    std::panic::set_hook(Box::new(|info| tracing::error!(panic = %info, "panicked")));
    Ok(())
}

async fn user(config: Config, cmd: UserCommand, env: &Environment) -> Result<(), String> {
    let command = match cmd {
        UserCommand::Create { username, email, admin } => {
            check_username(&username)?;
            check_email(&email)?;
            let password = read_password()?;
            check_password(password.expose())?;
            Command::CreateUser { username, email, password, admin }
        }
        UserCommand::List => Command::ListUsers,
        UserCommand::Disable { username } => Command::SetDisabled { username, disabled: true },
        UserCommand::Enable { username } => Command::SetDisabled { username, disabled: false },
        UserCommand::ResetPassword { username } => {
            let password = read_password()?;
            check_password(password.expose())?;
            Command::ResetPassword { username, password }
        }
        UserCommand::Delete { username, yes } => match yes {
            true => Command::DeleteUser { username },
            false => return Err(format!("this deletes {username} and all their data; add --yes")),
        },
        UserCommand::GrantAdmin { username } => Command::SetAdmin { username, admin: true },
        UserCommand::RevokeAdmin { username } => Command::SetAdmin { username, admin: false },
        UserCommand::Keys { username } => Command::ListKeys { username },
        UserCommand::RevokeKey { username, key_id } => Command::RevokeKey { username, key_id },
    };
    let reply = match server::services(&config, env).await {
        Ok(s) => control::execute(command, &s.store, &s.auth).await,
        Err(StartError::Store(StoreError::AlreadyInUse { .. })) => {
            control::send(&config.data_dir(env.state_directory.as_deref()), &command).await?
        }
        Err(e) => return Err(e.to_string()),
    };
    println!("{}", reply.render()?);
    Ok(())
}

/// Prompts twice on a terminal; reads one line from a pipe (for scripts).
fn read_password() -> Result<Secret, String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        return Ok(Secret::new(first));
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| e.to_string())?;
    Ok(Secret::new(line.trim_end_matches(['\n', '\r'])))
}
