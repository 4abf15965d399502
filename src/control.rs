//! Account administration for operators, whether or not the server is running.
//!
//! redb lets one process open the file, so while `edgechat serve` runs, `edgechat user …`
//! cannot open it. The server therefore listens on a Unix socket in the data directory
//! (mode 0600: only its own user and root can connect) and runs the same commands there —
//! which is also what makes `user disable` take effect at once on a live server.
//! The protocol is one JSON line each way.

use crate::auth::{check_password, Actor, Auth, AuthError, Registration};
use crate::clock::rfc3339;
use crate::secret::Secret;
use crate::store::{ApiKeyRecord, DeletedUser, Store, User};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

/// The socket's file name inside the data directory.
pub const SOCKET: &str = "control.sock";

/// Each side waits this long for the other (a command hashes one password at most).
const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// An administrative command.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    CreateUser {
        username: String,
        email: String,
        /// Crosses the socket in clear: it is only readable by the server's user and root.
        #[serde(serialize_with = "expose")]
        password: Secret,
        admin: bool,
    },
    ListUsers,
    SetDisabled {
        username: String,
        disabled: bool,
    },
    /// A consistent copy of the database, written by the server to `path` (absolute). Older
    /// clients send it; `edgechat backup` now asks for `BackupStream`.
    Backup {
        path: PathBuf,
    },
    /// A consistent copy of the database, sent over the socket after a
    /// `Reply::BackupStream` line, so that the caller writes it with its own rights (under
    /// systemd's sandbox the server may write only its state directory).
    BackupStream,
    /// A new password; the user's sessions (refresh tokens) end.
    ResetPassword {
        username: String,
        #[serde(serialize_with = "expose")]
        password: Secret,
    },
    /// The user and everything they own, in one transaction.
    DeleteUser {
        username: String,
    },
    SetAdmin {
        username: String,
        admin: bool,
    },
    ListKeys {
        username: String,
    },
    RevokeKey {
        username: String,
        key_id: String,
    },
}

impl Command {
    /// What the log says of it: the operation and what it acts on (never a password).
    fn describe(&self) -> (&'static str, String) {
        match self {
            Command::CreateUser { username, admin: true, .. } => ("create_admin", username.clone()),
            Command::CreateUser { username, .. } => ("create_user", username.clone()),
            Command::ListUsers => ("list_users", String::new()),
            Command::SetDisabled { username, disabled: true } => ("disable_user", username.clone()),
            Command::SetDisabled { username, .. } => ("enable_user", username.clone()),
            Command::Backup { path } => ("backup", path.display().to_string()),
            Command::BackupStream => ("backup", "(sent to the caller)".into()),
            Command::ResetPassword { username, .. } => ("reset_password", username.clone()),
            Command::DeleteUser { username } => ("delete_user", username.clone()),
            Command::SetAdmin { username, admin: true } => ("grant_admin", username.clone()),
            Command::SetAdmin { username, .. } => ("revoke_admin", username.clone()),
            Command::ListKeys { username } => ("list_keys", username.clone()),
            Command::RevokeKey { username, key_id } => {
                ("revoke_key", format!("{username} {key_id}"))
            }
        }
    }

    /// How long the client waits for the answer: a backup copies the whole file.
    fn timeout(&self) -> std::time::Duration {
        match self {
            Command::Backup { .. } | Command::BackupStream => std::time::Duration::from_secs(3600),
            _ => IO_TIMEOUT,
        }
    }
}

/// A user as the CLI prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct UserRow {
    pub id: String,
    pub username: String,
    pub email: String,
    pub is_admin: bool,
    pub disabled: bool,
    pub created_at: String,
}

/// An API key as the CLI prints it (never the key itself, which is not stored).
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyRow {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A deleted user and what went with them.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeletedRow {
    pub user: UserRow,
    pub conversations: u64,
    pub messages: u64,
    pub api_keys: u64,
    pub refresh_tokens: u64,
    pub jobs: u64,
}

/// What a command answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    User(UserRow),
    Users(Vec<UserRow>),
    /// The backup's size in bytes.
    Backup(u64),
    /// The backup's size in bytes; that many bytes of it follow this line.
    BackupStream(u64),
    Keys(Vec<KeyRow>),
    Deleted(DeletedRow),
    /// Done; the text says what was done.
    Done(String),
    Error(String),
}

impl Reply {
    /// What `edgechat user …` prints for this reply, or the error it exits with.
    pub fn render(self) -> Result<String, String> {
        let text = match self {
            Reply::Error(message) => return Err(message),
            Reply::Backup(bytes) | Reply::BackupStream(bytes) => format!("backed up ({bytes} bytes)"),
            Reply::User(u) => {
                let state = if u.disabled { "disabled" } else { "active" };
                let role = if u.is_admin { "admin" } else { "user" };
                format!("{} {} ({role}, {state})", u.username, u.id)
            }
            Reply::Users(users) => {
                let mut out = format!(
                    "{:<36}  {:<24}  {:<5}  {:<8}  email",
                    "id", "username", "admin", "disabled"
                );
                for u in users {
                    out += &format!(
                        "\n{:<36}  {:<24}  {:<5}  {:<8}  {}",
                        u.id, u.username, u.is_admin, u.disabled, u.email
                    );
                }
                out
            }
            Reply::Keys(keys) => {
                let mut out =
                    format!("{:<36}  {:<20}  {:<20}  name", "id", "created", "last used");
                for k in keys {
                    let used = k.last_used_at.as_deref().unwrap_or("never");
                    // Names from before they had to be printable may hold control characters.
                    let name = k.name.escape_debug();
                    out += &format!("\n{:<36}  {:<20}  {:<20}  {name}", k.id, k.created_at, used);
                }
                out
            }
            Reply::Deleted(d) => format!(
                "deleted {} {} with {} conversations ({} messages), {} API keys, {} sessions and {} background jobs",
                d.user.username, d.user.id, d.conversations, d.messages, d.api_keys,
                d.refresh_tokens, d.jobs
            ),
            Reply::Done(text) => text,
        };
        Ok(text)
    }
}

impl From<&User> for UserRow {
    fn from(u: &User) -> Self {
        UserRow {
            id: u.id.to_string(),
            username: u.username.clone(),
            email: u.email.clone(),
            is_admin: u.is_admin,
            disabled: u.disabled,
            created_at: rfc3339(u.created_at),
        }
    }
}

/// Runs a command against open services (in the CLI, or in the server for a socket client).
pub async fn execute(command: Command, store: &Store, auth: &Auth) -> Reply {
    let result = match command {
        Command::CreateUser { username, email, password, admin } => {
            create_user(auth, Registration { username, email, password }, admin).await
        }
        Command::ListUsers => auth
            .users()
            .await
            .map(|users| Reply::Users(users.iter().map(UserRow::from).collect()))
            .map_err(|e| e.to_string()),
        Command::SetDisabled { username, disabled } => {
            change_access(auth, &username, None, Some(disabled)).await
        }
        Command::Backup { path } => backup(store, path).await.map(Reply::Backup),
        Command::BackupStream => Err("a streamed backup is sent by the control socket".into()),
        Command::ResetPassword { username, password } => {
            reset_password(auth, &username, password).await
        }
        Command::DeleteUser { username } => delete_user(auth, &username).await,
        Command::SetAdmin { username, admin } => {
            change_access(auth, &username, Some(admin), None).await
        }
        Command::ListKeys { username } => list_keys(auth, &username).await,
        Command::RevokeKey { username, key_id } => revoke_key(auth, &username, &key_id).await,
    };
    result.unwrap_or_else(Reply::Error)
}

/// An operator's message for an auth failure, naming the user where it helps.
fn explain(e: AuthError, username: &str) -> String {
    match e {
        AuthError::UserNotFound => format!("no user named {username}"),
        AuthError::LastAdmin => format!(
            "{username} is the last active admin; grant admin to another account first \
             (edgechat user grant-admin NAME)"
        ),
        other => other.to_string(),
    }
}

/// The id of the account named `username`, or the operator's message.
async fn id_of(auth: &Auth, username: &str) -> Result<uuid::Uuid, String> {
    Ok(auth.user_named(username).await.map_err(|e| explain(e, username))?.id)
}

async fn reset_password(auth: &Auth, username: &str, password: Secret) -> Result<Reply, String> {
    check_password(password.expose())?;
    let id = id_of(auth, username).await?;
    let user = auth.reset_password(id, &password).await.map_err(|e| explain(e, username))?;
    Ok(Reply::User(UserRow::from(&user)))
}

async fn delete_user(auth: &Auth, username: &str) -> Result<Reply, String> {
    let id = id_of(auth, username).await?;
    let deleted = auth.delete_user(Actor::Operator, id).await.map_err(|e| explain(e, username))?;
    Ok(Reply::Deleted(DeletedRow::from(&deleted)))
}

/// Grants or revokes admin (`admin`), disables or enables (`disabled`); `None` keeps it.
async fn change_access(
    auth: &Auth,
    username: &str,
    admin: Option<bool>,
    disabled: Option<bool>,
) -> Result<Reply, String> {
    let id = id_of(auth, username).await?;
    let user = auth
        .change_access(Actor::Operator, id, admin, disabled)
        .await
        .map_err(|e| explain(e, username))?;
    Ok(Reply::User(UserRow::from(&user)))
}

async fn list_keys(auth: &Auth, username: &str) -> Result<Reply, String> {
    let id = id_of(auth, username).await?;
    let keys = auth.user_api_keys(id).await.map_err(|e| explain(e, username))?;
    Ok(Reply::Keys(keys.iter().map(KeyRow::from).collect()))
}

async fn revoke_key(auth: &Auth, username: &str, key_id: &str) -> Result<Reply, String> {
    let id = id_of(auth, username).await?;
    let not_found = || format!("{username} has no API key {key_id}");
    let key = uuid::Uuid::parse_str(key_id).map_err(|_| not_found())?;
    match auth.revoke_api_key(id, key).await {
        Ok(()) => Ok(Reply::Done(format!("revoked API key {key} of {username}"))),
        Err(AuthError::KeyNotFound) => Err(not_found()),
        Err(e) => Err(explain(e, username)),
    }
}

impl From<&ApiKeyRecord> for KeyRow {
    fn from(k: &ApiKeyRecord) -> Self {
        KeyRow {
            id: k.id.to_string(),
            name: k.name.clone(),
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
        }
    }
}

impl From<&DeletedUser> for DeletedRow {
    fn from(d: &DeletedUser) -> Self {
        DeletedRow {
            user: UserRow::from(&d.user),
            conversations: d.conversations,
            messages: d.messages,
            api_keys: d.api_keys,
            refresh_tokens: d.refresh_tokens,
            jobs: d.jobs,
        }
    }
}

/// Copies the database to `path` off the async threads.
pub async fn backup(store: &Store, path: PathBuf) -> Result<u64, String> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.backup(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn create_user(auth: &Auth, reg: Registration, admin: bool) -> Result<Reply, String> {
    if let Some((field, problem)) = reg.problems().first() {
        return Err(format!("{field}: {problem}"));
    }
    let user = auth.register(reg, admin).await.map_err(|e| e.to_string())?;
    Ok(Reply::User(UserRow::from(&user)))
}

/// Serves commands on `<data_dir>/control.sock` until the returned task is aborted.
pub fn listen(
    data_dir: &Path,
    store: Store,
    auth: Arc<Auth>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = data_dir.join(SOCKET);
    // We hold the database lock, so a socket file left here belongs to a dead process.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (store, auth) = (store.clone(), auth.clone());
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, &store, &auth).await {
                    tracing::warn!(error = %e, "control socket client failed");
                }
            });
        }
    }))
}

async fn serve_one(stream: UnixStream, store: &Store, auth: &Auth) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(64 * 1024));
    tokio::time::timeout(IO_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no command received"))??;
    let reply = match serde_json::from_str::<Command>(&line) {
        Ok(Command::BackupStream) => return send_backup(store, write).await,
        Ok(command) => {
            let (op, subject) = command.describe();
            let reply = execute(command, store, auth).await;
            log_outcome(op, &subject, &reply);
            reply
        }
        Err(e) => {
            // Not the error's text: it may quote the line, and a line may hold a password.
            tracing::warn!(kind = ?e.classify(), "control socket: unreadable command");
            Reply::Error(format!("bad control command: {e}"))
        }
    };
    let mut out = serde_json::to_vec(&reply).expect("replies serialize");
    out.push(b'\n');
    write.write_all(&out).await
}

/// `subject`, not `target`: JSON lines already have a `target` (the module).
fn log_outcome(op: &str, subject: &str, reply: &Reply) {
    match reply {
        Reply::Error(error) => {
            tracing::warn!(op, subject, outcome = "failed", error, "control command")
        }
        _ => tracing::info!(op, subject, outcome = "ok", "control command"),
    }
}

/// Writes a backup beside the database, sends its size and then its bytes, and removes it.
async fn send_backup(store: &Store, mut write: OwnedWriteHalf) -> std::io::Result<()> {
    let name = format!(".backup-{}.redb", uuid::Uuid::now_v7().simple());
    // PostgreSQL has no file: the store refuses the backup, saying to use pg_dump.
    let temp = store.file().map_or_else(|| PathBuf::from(&name), |f| f.with_file_name(&name));
    let made = backup(store, temp.clone()).await;
    let reply = made.map_or_else(Reply::Error, Reply::BackupStream);
    log_outcome("backup", "(sent to the caller)", &reply);
    let mut head = serde_json::to_vec(&reply).expect("replies serialize");
    head.push(b'\n');
    let sent = async {
        write.write_all(&head).await?;
        if let Reply::BackupStream(_) = reply {
            tokio::io::copy(&mut tokio::fs::File::open(&temp).await?, &mut write).await?;
        }
        write.flush().await
    }
    .await;
    let _ = tokio::fs::remove_file(&temp).await;
    sent
}

/// Asks the server running on `data_dir` for a backup and writes it to `dest` (which must not
/// exist) with the caller's rights: a partial file beside it, renamed once whole and synced.
/// Returns its size. A server too old to stream writes `dest` itself.
pub async fn receive_backup(data_dir: &Path, dest: &Path) -> Result<u64, String> {
    if dest.exists() {
        return Err(format!("{}: already exists; choose a new name", dest.display()));
    }
    let (mut reader, head) = request(data_dir, &Command::BackupStream).await?;
    let size = match head {
        Reply::BackupStream(size) => size,
        Reply::Error(e) if e.contains("unknown variant") => {
            return match send(data_dir, &Command::Backup { path: dest.to_path_buf() }).await? {
                Reply::Backup(size) => Ok(size),
                Reply::Error(message) => Err(message),
                _ => Err("unexpected reply from the server".into()),
            };
        }
        Reply::Error(message) => return Err(message),
        _ => return Err("unexpected reply from the server".into()),
    };
    let partial = PathBuf::from(format!("{}.partial", dest.display()));
    let name = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let written = async {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .await?;
        let copied = tokio::io::copy(&mut (&mut reader).take(size), &mut file).await?;
        file.sync_all().await?;
        Ok(copied)
    }
    .await
    .map_err(|e| name(&partial, e));
    let done = match written {
        Ok(n) if n == size => tokio::fs::rename(&partial, dest).await.map_err(|e| name(dest, e)),
        Ok(n) => Err(format!("the server sent {n} of the backup's {size} bytes")),
        Err(e) => Err(e),
    };
    if done.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    done.map(|()| size)
}

/// Sends one command to the server running on `data_dir`.
pub async fn send(data_dir: &Path, command: &Command) -> Result<Reply, String> {
    request(data_dir, command).await.map(|(_, reply)| reply)
}

/// Sends `command`; returns its reply line and the rest of the connection.
async fn request(
    data_dir: &Path,
    command: &Command,
) -> Result<(BufReader<OwnedReadHalf>, Reply), String> {
    let path: PathBuf = data_dir.join(SOCKET);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        format!("the database is in use by a running server, and its control socket {} does not answer: {e}", path.display())
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(command).map_err(|e| e.to_string())?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    let limit = command.timeout();
    let mut reader = BufReader::new(read);
    tokio::time::timeout(limit, reader.read_line(&mut answer))
        .await
        .map_err(|_| format!("the server did not answer within {limit:?}"))?
        .map_err(|e| e.to_string())?;
    let reply =
        serde_json::from_str(&answer).map_err(|e| format!("bad reply from the server: {e}"))?;
    Ok((reader, reply))
}

fn expose<S: serde::Serializer>(secret: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(secret.expose())
}
