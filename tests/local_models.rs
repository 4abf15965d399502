//! `edgechat model pull` against a loopback server that plays the Hugging Face hub, and
//! `edgechat model list` on what it fetched (and the CPU kernels it would use); both through
//! the real binary.

mod common_local;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// How the stand-in hub behaves; tests change it between pulls.
#[derive(Clone, Default)]
struct Behaviour {
    /// The SHA-256 it publishes (`X-Linked-Etag`), if any.
    sha256: Option<String>,
    /// Sends this many bytes of the body, then holds the connection without a word.
    stall_after: Option<usize>,
    /// Accepts connections and reads requests, and never answers.
    silent: bool,
}

/// What the stand-in saw of each request: its authorization and range headers.
#[derive(Clone, Debug, Default)]
struct Seen {
    auth: String,
    range: Option<String>,
}

type Shared<T> = Arc<Mutex<T>>;

/// Serves `body` at `/{repo}/resolve/main/{file}` as the hub does: `HEAD` with the published
/// checksum, `GET` whole or from a `Range`.
async fn fake_hub(path: String, body: Vec<u8>) -> (String, Shared<Vec<Seen>>, Shared<Behaviour>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let behaviour = Arc::new(Mutex::new(Behaviour::default()));
    let (body, seen2, behaviour2) = (Arc::new(body), seen.clone(), behaviour.clone());
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let (body, seen, path) = (body.clone(), seen2.clone(), path.clone());
            let behaviour = behaviour2.lock().unwrap().clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(request)) = lines.next_line().await {
                    let mut got = Seen::default();
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.is_empty() {
                            break;
                        }
                        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "range" => {
                                got.range =
                                    Some(value.trim().trim_start_matches("bytes=").to_owned())
                            }
                            "authorization" => got.auth = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    seen.lock().unwrap().push(got.clone());
                    if behaviour.silent {
                        std::future::pending::<()>().await;
                    }
                    let (head, chunk) = respond(&request, got.range, &path, &body, &behaviour);
                    if write.write_all(&head).await.is_err() {
                        return;
                    }
                    let cut = behaviour.stall_after.unwrap_or(chunk.len()).min(chunk.len());
                    if write.write_all(&chunk[..cut]).await.is_err() {
                        return;
                    }
                    if cut < chunk.len() {
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), seen, behaviour)
}

/// The head and body of the answer to `request`.
fn respond(
    request: &str,
    range: Option<String>,
    path: &str,
    body: &[u8],
    behaviour: &Behaviour,
) -> (Vec<u8>, Vec<u8>) {
    let mut words = request.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if target != path {
        return (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(), Vec::new());
    }
    let linked =
        behaviour.sha256.as_ref().map_or(String::new(), |s| format!("x-linked-etag: \"{s}\"\r\n"));
    if method == "HEAD" {
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{linked}\r\n", body.len());
        return (head.into_bytes(), Vec::new());
    }
    let start = range.and_then(|r| r.split('-').next()?.parse::<usize>().ok());
    let head = match start {
        Some(start) => format!(
            "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{}/{}\r\n{linked}\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        ),
        None => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{linked}\r\n", body.len()),
    };
    (head.into_bytes(), body[start.unwrap_or(0)..].to_vec())
}

/// `edgechat model pull REPO FILE --dir models` with `HF_ENDPOINT` at the stand-in and a
/// one-second deadline.
async fn pull(endpoint: &str, models: &Path, repo: &str, file: &str) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_edgechat");
    let mut cmd = Command::new(bin);
    cmd.args(["model", "pull", repo, file, "--timeout", "1", "--dir"])
        .arg(models)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", "hf_test_token")
        .env("HF_HOME", scratch_home(models));
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

#[tokio::test]
async fn pull_fetches_through_hf_endpoint_and_list_shows_it() {
    let scratch = tempfile::tempdir().unwrap();
    let source = scratch.path().join("source.gguf");
    common_local::write_tiny_model(&source, &common_local::Tiny::default());
    let bytes = std::fs::read(&source).unwrap();
    let (endpoint, seen, behaviour) =
        fake_hub("/someone/tiny-GGUF/resolve/main/tiny.Q4_1.gguf".into(), bytes.clone()).await;
    behaviour.lock().unwrap().sha256 = Some(sha256(&bytes));
    let models = scratch.path().join("models");
    // A directory an older build's killed pull left behind.
    std::fs::create_dir_all(models.join(".pull-0123/blobs")).unwrap();

    let out = pull(&endpoint, &models, "someone/tiny-GGUF", "tiny.Q4_1.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pull failed: {stderr}");
    assert!(stderr.starts_with("fetching tiny.Q4_1.gguf from someone/tiny-GGUF"), "{stderr}");
    assert_eq!(std::fs::read(models.join("tiny.Q4_1.gguf")).unwrap(), bytes);
    // Only the model is left behind, no cache directories.
    let left: Vec<_> =
        std::fs::read_dir(&models).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["tiny.Q4_1.gguf"]);
    let auth: Vec<String> = seen.lock().unwrap().iter().map(|s| s.auth.clone()).collect();
    assert!(!auth.is_empty() && auth.iter().all(|a| a == "Bearer hf_test_token"), "{auth:?}");

    let bin = env!("CARGO_BIN_EXE_edgechat");
    // The configured models with their state, and the files beside the first.
    let config = scratch.path().join("c.toml");
    let tiny = models.join("tiny.Q4_1.gguf");
    let text = format!(
        "[local]\nmodel = {:?}\nname = \"tiny\"\n[[local.models]]\nfile = \"nowhere/qwen.gguf\"\nname = \"qwen\"\n",
        tiny.to_str().unwrap()
    );
    std::fs::write(&config, text).unwrap();
    let list =
        Command::new(bin).arg("--config").arg(&config).args(["model", "list"]).output().unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    let row = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("{out}"))
            .to_owned()
    };
    assert!(row("tiny ").ends_with("llama Q4_1 108K"), "{out}");
    assert!(row("qwen ").contains("missing"), "{out}");
    assert!(out.contains(&format!("files in {}", models.display())), "{out}");

    let list = Command::new(bin).args(["model", "list", "--dir"]).arg(&models).output().unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let row =
        out.lines().find(|l| l.starts_with("tiny.Q4_1.gguf")).unwrap_or_else(|| panic!("{out}"));
    for column in ["llama", "Q4_1", "96", "K"] {
        assert!(row.contains(column), "{row}");
    }
    // The CPU kernels it would run with, as detected; EDGECHAT_ISA narrows them.
    let kernels = format!("kernels: {} ", edgechat_llama::Isa::get().name());
    assert!(out.lines().any(|l| l.starts_with(&kernels)), "{out}");
    let list = Command::new(bin)
        .args(["model", "list", "--dir"])
        .arg(&models)
        .env("EDGECHAT_ISA", "portable")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(out.lines().any(|l| l.starts_with("kernels: portable ")), "{out}");
}

#[tokio::test]
async fn pull_reports_a_missing_file() {
    let scratch = tempfile::tempdir().unwrap();
    let (endpoint, _, _) = fake_hub("/a/b/resolve/main/x.gguf".into(), vec![0; 8]).await;
    let models = scratch.path().join("models");
    let out = pull(&endpoint, &models, "a/b", "missing.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.gguf") && stderr.contains("a/b"), "{stderr}");
    assert!(stderr.contains("HTTP 404"), "{stderr}");
}

/// A hub that stalls mid-file: the pull gives up after its deadline and keeps what it got; the
/// next pull asks for the rest only, and the whole file matches the published checksum.
#[tokio::test]
async fn an_interrupted_pull_resumes_and_the_checksum_is_checked() {
    let scratch = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (endpoint, seen, behaviour) =
        fake_hub("/a/b/resolve/main/m.gguf".into(), bytes.clone()).await;
    *behaviour.lock().unwrap() =
        Behaviour { sha256: Some(sha256(&bytes)), stall_after: Some(80_000), silent: false };
    let models = scratch.path().join("models");
    let out = pull(&endpoint, &models, "a/b", "m.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("stalled"), "{stderr}");
    let partial = models.join(".m.gguf.partial");
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 80_000);

    behaviour.lock().unwrap().stall_after = None;
    let out = pull(&endpoint, &models, "a/b", "m.gguf").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(models.join("m.gguf")).unwrap(), bytes);
    assert!(!partial.exists());
    let ranges: Vec<_> = seen.lock().unwrap().iter().filter_map(|s| s.range.clone()).collect();
    assert_eq!(ranges, ["80000-"], "only the rest was asked for");

    // A checksum that does not match: nothing is kept under either name.
    behaviour.lock().unwrap().sha256 = Some("0".repeat(64));
    let out = pull(&endpoint, &models, "a/b", "m.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("SHA-256"), "{stderr}");
    assert!(!partial.exists());
}

#[tokio::test]
async fn a_hub_that_never_answers_is_given_up_on_with_a_reason() {
    let scratch = tempfile::tempdir().unwrap();
    let (endpoint, _, behaviour) = fake_hub("/a/b/resolve/main/m.gguf".into(), vec![0; 8]).await;
    behaviour.lock().unwrap().silent = true;
    let models = scratch.path().join("models");
    let out = pull(&endpoint, &models, "a/b", "m.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("did not answer within 1 s"), "{stderr}");
    // Nothing listens here: the cause is named.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let out = pull(&format!("http://{closed}"), &models, "a/b", "m.gguf").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("refused the connection"), "{stderr}");
}

/// A private HF_HOME so no token file of the machine's leaks in.
fn scratch_home(models: &std::path::Path) -> std::path::PathBuf {
    models.parent().unwrap().join("hf-home")
}
