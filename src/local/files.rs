//! Model files on disk: where they live, and fetching more from the Hugging Face hub.

use super::LocalError;
use hf_hub::api::tokio::ApiBuilder;
use std::path::{Path, PathBuf};

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

/// Downloads `file` from hub repository `repo` into `dir`, with a progress bar on a terminal.
/// Honours `HF_ENDPOINT` (a mirror, or a test server) and `HF_TOKEN` (gated repositories).
/// The file appears under its final name only once complete.
pub async fn pull(repo: &str, file: &str, dir: &Path) -> Result<PathBuf, LocalError> {
    let fail = |message: String| LocalError::Download {
        repo: repo.to_owned(),
        file: file.to_owned(),
        message,
    };
    let name = Path::new(file).file_name().ok_or_else(|| fail("no file name".into()))?;
    let target = dir.join(name);
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // hf-hub writes into a cache; one inside `dir` keeps the final rename on one filesystem.
    let cache = tempfile_dir(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    let result = async {
        // HF_TOKEN wins over the token file hf-hub reads from HF_HOME.
        let mut builder = ApiBuilder::from_env().with_cache_dir(cache.clone());
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
            builder = builder.with_token(Some(token));
        }
        let api = builder.build().map_err(|e| fail(e.to_string()))?;
        let progress = indicatif::ProgressBar::new(0);
        let pointer = api
            .model(repo.to_owned())
            .download_with_progress(file, progress)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let blob = std::fs::canonicalize(&pointer).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&blob, &target).map_err(|e| fail(format!("{}: {e}", target.display())))?;
        Ok(target.clone())
    }
    .await;
    let _ = std::fs::remove_dir_all(&cache);
    result
}

/// A fresh hidden directory inside `dir` for one download.
fn tempfile_dir(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!(".pull-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir(&path)?;
    Ok(path)
}
