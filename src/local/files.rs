//! Model files on disk: where they live, and fetching more from the Hugging Face hub.
//!
//! The transfer is ours, not hf-hub's: its client has no deadlines (a hub that accepts and
//! never answers would hold `model pull` forever) and checks no checksum. hf-hub still gives
//! the hub's conventions: the token saved by `huggingface-cli login` under `HF_HOME`.

use super::LocalError;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The model `models/fetch-default.sh` installs.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where models live unless configured otherwise: `models/` in the working directory.
pub fn default_dir() -> PathBuf {
    PathBuf::from("models")
}

/// The default model's path inside `dir`.
pub fn default_model(dir: &Path) -> PathBuf {
    dir.join(DEFAULT_MODEL)
}

/// How long a pull waits: for a connection, and for each piece of the answer.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    /// For the response head, and then between two pieces of the body.
    pub idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines { connect: Duration::from_secs(10), idle: Duration::from_secs(30) }
    }
}

/// What the hub says of a file before sending it.
struct Published {
    /// The SHA-256 of a file stored with Git LFS (`X-Linked-Etag`), which every GGUF is.
    sha256: Option<String>,
}

/// Downloads `file` from hub repository `repo` into `dir`, with a progress bar on a terminal.
/// Honours `HF_ENDPOINT` (a mirror, or a test server) and `HF_TOKEN` (else the token
/// `huggingface-cli login` saved). The file appears under its final name only once complete
/// and, when the hub publishes its SHA-256, verified. An interrupted pull leaves
/// `.<file>.partial` in `dir`, which the next pull of the same file resumes.
pub async fn pull(
    repo: &str,
    file: &str,
    dir: &Path,
    deadlines: Deadlines,
) -> Result<PathBuf, LocalError> {
    let fail = |message: String| LocalError::Download {
        repo: repo.to_owned(),
        file: file.to_owned(),
        message,
    };
    let name = Path::new(file).file_name().ok_or_else(|| fail("no file name".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    remove_stale_pulls(dir);
    let target = dir.join(name);
    let partial = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let url = format!("{}/{repo}/resolve/main/{file}", endpoint.trim_end_matches('/'));
    let hub = Hub::new(deadlines).map_err(&fail)?;
    let published = hub.published(&url).await.map_err(&fail)?;
    let sha256 = hub.fetch(&url, &partial).await.map_err(&fail)?;
    if let Some(expected) = published.sha256.filter(|e| !e.eq_ignore_ascii_case(&sha256)) {
        let _ = std::fs::remove_file(&partial);
        return Err(fail(format!(
            "the file's SHA-256 is {sha256}, the hub publishes {expected}: the download was \
             corrupted or altered and is deleted; run the pull again"
        )));
    }
    std::fs::rename(&partial, &target).map_err(|e| fail(format!("{}: {e}", target.display())))?;
    Ok(target)
}

/// Removes the `.pull-*` directories older builds (hf-hub's cache) left when killed.
fn remove_stale_pulls(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(".pull-");
        if stale && entry.path().is_dir() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A client for the hub with our deadlines and its token.
struct Hub {
    client: reqwest::Client,
    /// Does not follow redirects: the hub's own answer carries the checksum.
    first_hop: reqwest::Client,
    deadlines: Deadlines,
}

impl Hub {
    fn new(deadlines: Deadlines) -> Result<Hub, String> {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| hf_hub::Cache::from_env().token());
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "HF_TOKEN is not a valid header value")?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(deadlines.connect)
                .default_headers(headers.clone())
                .user_agent(concat!("edgechat/", env!("CARGO_PKG_VERSION")))
        };
        let first_hop = builder().redirect(reqwest::redirect::Policy::none()).build();
        Ok(Hub {
            client: builder().build().map_err(|e| e.to_string())?,
            first_hop: first_hop.map_err(|e| e.to_string())?,
            deadlines,
        })
    }

    /// The hub's word on `url` before the transfer: an error status, or the checksum.
    async fn published(&self, url: &str) -> Result<Published, String> {
        let head = self.first_hop.head(url).send();
        let response = tokio::time::timeout(self.deadlines.idle, head)
            .await
            .map_err(|_| self.silent(url))?
            .map_err(|e| describe(url, &e))?;
        let status = response.status();
        if !(status.is_success() || status.is_redirection()) {
            return Err(refusal(status));
        }
        let linked = response.headers().get("x-linked-etag").and_then(|v| v.to_str().ok());
        let sha256 = linked.map(|v| v.trim_matches('"').to_ascii_lowercase());
        let sha256 = sha256.filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(Published { sha256 })
    }

    /// Downloads `url` into `partial`, after what it already holds; returns the whole file's
    /// SHA-256.
    async fn fetch(&self, url: &str, partial: &Path) -> Result<String, String> {
        let have = std::fs::metadata(partial).map_or(0, |m| m.len());
        let mut request = self.client.get(url);
        if have > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let response = tokio::time::timeout(self.deadlines.idle, request.send())
            .await
            .map_err(|_| self.silent(url))?
            .map_err(|e| describe(url, &e))?;
        let status = response.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
            // The partial file is not a prefix of this one (the repository changed): start over.
            std::fs::remove_file(partial).map_err(|e| format!("{}: {e}", partial.display()))?;
            return Box::pin(self.fetch(url, partial)).await;
        }
        if !status.is_success() {
            return Err(refusal(status));
        }
        let resumed =
            status == reqwest::StatusCode::PARTIAL_CONTENT && starts_at(&response) == have;
        let from = if resumed { have } else { 0 };
        let hasher = match resumed {
            true => hash_of(partial).await?,
            false => Sha256::new(),
        };
        let hasher = self.receive(url, response, partial, from, hasher).await?;
        Ok(format!("{:x}", hasher.finalize()))
    }

    /// Writes `response`'s body to `partial` after its first `from` bytes, hashing it, with a
    /// progress bar; returns the whole file's hash once every announced byte is there.
    async fn receive(
        &self,
        url: &str,
        response: reqwest::Response,
        partial: &Path,
        from: u64,
        mut hasher: Sha256,
    ) -> Result<Sha256, String> {
        let total = response.content_length().map(|n| n + from);
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).write(true).append(from > 0).truncate(from == 0);
        let mut out =
            options.open(partial).await.map_err(|e| format!("{}: {e}", partial.display()))?;
        let progress = progress_bar(total, from);
        let mut got = from;
        let mut body = response.bytes_stream();
        loop {
            let piece =
                tokio::time::timeout(self.deadlines.idle, body.next()).await.map_err(|_| {
                    format!(
                        "no data for {} s: the transfer stalled; run the same pull again to resume",
                        self.deadlines.idle.as_secs()
                    )
                })?;
            let Some(piece) = piece else { break };
            let piece = piece.map_err(|e| describe(url, &e))?;
            hasher.update(&piece);
            out.write_all(&piece).await.map_err(|e| format!("{}: {e}", partial.display()))?;
            got += piece.len() as u64;
            progress.set_position(got);
        }
        out.sync_all().await.map_err(|e| format!("{}: {e}", partial.display()))?;
        progress.finish_and_clear();
        if let Some(total) = total.filter(|&t| t != got) {
            return Err(format!(
                "the transfer ended after {got} of {total} bytes; run the same pull again to resume"
            ));
        }
        Ok(hasher)
    }

    fn silent(&self, url: &str) -> String {
        let host = host(url);
        format!(
            "{host} accepted the connection but did not answer within {} s",
            self.deadlines.idle.as_secs()
        )
    }
}

/// The hash of what an interrupted pull left, read in pieces on the blocking pool (a model
/// file is gigabytes: neither in memory at once nor on an async thread).
async fn hash_of(partial: &Path) -> Result<Sha256, String> {
    let path = partial.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
        Ok::<_, std::io::Error>(hasher)
    });
    let named = |e: String| format!("{}: {e}", partial.display());
    hashed.await.map_err(|e| named(e.to_string()))?.map_err(|e| named(e.to_string()))
}

/// Where a `206` answer's body starts (`Content-Range: bytes START-END/TOTAL`).
fn starts_at(response: &reqwest::Response) -> u64 {
    let range = response.headers().get(reqwest::header::CONTENT_RANGE);
    let range = range.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("bytes "));
    range.and_then(|r| r.split('-').next()).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A bar on a terminal (hidden otherwise), from the first byte, resumed bytes counted done.
fn progress_bar(total: Option<u64>, done: u64) -> indicatif::ProgressBar {
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar.set_position(done);
    bar
}

/// An error status in words: what it means for a pull.
fn refusal(status: reqwest::StatusCode) -> String {
    match status.as_u16() {
        401 | 403 => format!(
            "the hub refused access (HTTP {status}): a gated or private repository needs \
             HF_TOKEN (or `huggingface-cli login`) with access to it"
        ),
        404 => {
            format!("the hub has no such file (HTTP {status}): check the repository and file names")
        }
        _ => format!("the hub answered HTTP {status}"),
    }
}

/// A transport error by its cause: the name did not resolve, the TLS handshake failed, the
/// connection was refused or timed out.
fn describe(url: &str, e: &reqwest::Error) -> String {
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    let host = host(url);
    let lower = chain.to_ascii_lowercase();
    let cause = if lower.contains("dns") || lower.contains("lookup address") {
        format!("cannot resolve {host} (DNS)")
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        format!("the TLS handshake with {host} failed")
    } else if lower.contains("refused") {
        format!("{host} refused the connection")
    } else if e.is_timeout() || lower.contains("timed out") {
        format!("no connection to {host} within the deadline")
    } else {
        format!("the transfer from {host} failed")
    };
    format!("{cause}: {chain}")
}

fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}
