//! `edgechat model pull` against a loopback server that plays the Hugging Face hub, and
//! `edgechat model list` on what it fetched (and the CPU kernels it would use); both through
//! the real binary.

mod common_local;

use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Serves `body` at `/{repo}/resolve/main/{file}` with the headers hf-hub reads, honouring
/// `Range`; records each request's authorization header.
async fn fake_hub(path: String, body: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (body, seen2) = (Arc::new(body), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { return };
            let (body, seen, path) = (body.clone(), seen2.clone(), path.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(request)) = lines.next_line().await {
                    let (mut range, mut auth) = (None, String::new());
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.is_empty() {
                            break;
                        }
                        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "range" => {
                                range = Some(value.trim().trim_start_matches("bytes=").to_owned())
                            }
                            "authorization" => auth = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    seen.lock().unwrap().push(auth);
                    let response = respond(&request, range, &path, &body);
                    if write.write_all(&response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn respond(request: &str, range: Option<String>, path: &str, body: &[u8]) -> Vec<u8> {
    let target = request.split(' ').nth(1).unwrap_or("");
    if target != path {
        return b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec();
    }
    let last = body.len() - 1;
    let (start, end) = range
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?.min(last)))
        })
        .unwrap_or((0, last));
    let chunk = &body[start..=end];
    let mut out = format!(
        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {start}-{end}/{}\r\n\
         etag: \"0123abcd\"\r\nx-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\n\r\n",
        chunk.len(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(chunk);
    out
}

#[tokio::test]
async fn pull_fetches_through_hf_endpoint_and_list_shows_it() {
    let scratch = tempfile::tempdir().unwrap();
    let source = scratch.path().join("source.gguf");
    common_local::write_tiny_model(&source, &common_local::Tiny::default());
    let bytes = std::fs::read(&source).unwrap();
    let (endpoint, seen) =
        fake_hub("/someone/tiny-GGUF/resolve/main/tiny.Q4_1.gguf".into(), bytes.clone()).await;
    let models = scratch.path().join("models");

    let bin = env!("CARGO_BIN_EXE_edgechat");
    let pull = tokio::task::spawn_blocking({
        let models = models.clone();
        move || {
            Command::new(bin)
                .args(["model", "pull", "someone/tiny-GGUF", "tiny.Q4_1.gguf", "--dir"])
                .arg(&models)
                .env("HF_ENDPOINT", &endpoint)
                .env("HF_TOKEN", "hf_test_token")
                .env("HF_HOME", scratch_home(&models))
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&pull.stderr);
    assert!(pull.status.success(), "pull failed: {stderr}");
    assert_eq!(std::fs::read(models.join("tiny.Q4_1.gguf")).unwrap(), bytes);
    // Only the model is left behind, no cache directories.
    let left: Vec<_> =
        std::fs::read_dir(&models).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["tiny.Q4_1.gguf"]);
    let auth = seen.lock().unwrap().clone();
    assert!(!auth.is_empty() && auth.iter().all(|a| a == "Bearer hf_test_token"), "{auth:?}");

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
    let (endpoint, _) = fake_hub("/a/b/resolve/main/x.gguf".into(), vec![0; 8]).await;
    let models = scratch.path().join("models");
    let bin = env!("CARGO_BIN_EXE_edgechat");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["model", "pull", "a/b", "missing.gguf", "--dir"])
            .arg(&models)
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", scratch_home(&models))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.gguf") && stderr.contains("a/b"), "{stderr}");
}

/// A private HF_HOME so no token file of the machine's leaks in.
fn scratch_home(models: &std::path::Path) -> std::path::PathBuf {
    models.parent().unwrap().join("hf-home")
}
