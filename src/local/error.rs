//! The one error type of the local engine; every variant names what went wrong in words a
//! person running `edgechat` can act on.

use std::path::PathBuf;

/// Errors from loading a model, starting a generation, or managing model files.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The file could not be opened or read.
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The file is not a GGUF candle can read, or its contents are inconsistent.
    #[error("model file {path} is not a usable GGUF file: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// `general.architecture` names a model family the engine does not implement.
    #[error("model file {path} has architecture `{architecture}`, which edgechat cannot run (supported: {supported})")]
    UnsupportedArchitecture { path: PathBuf, architecture: String, supported: &'static str },
    /// Neither a `tokenizer.json` beside the model nor the GGUF metadata gave a tokenizer.
    #[error("model file {path}: no usable tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// The request itself is invalid (bad sampling parameter, no messages).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The rendered prompt does not leave room for even one generated token.
    #[error("the prompt has {prompt_tokens} tokens, more than the model's context window of {context} allows")]
    PromptTooLong { prompt_tokens: usize, context: usize },
    /// The wait queue is full; the caller should retry later (HTTP 503).
    #[error("the local model is busy: {queued} requests are already waiting")]
    Busy { queued: usize },
    /// No local model has this name.
    #[error("no local model is named `{0}`")]
    UnknownModel(String),
    /// The model cannot be loaded now without going beyond `local.max_loaded_models` or
    /// `local.max_memory_mb` (HTTP 503); the message says which.
    #[error("{0}")]
    NoRoom(String),
    /// The generation thread has stopped (it panicked, or the engine is shutting down).
    #[error("the local model is not running")]
    Stopped,
    /// The model failed while computing a token.
    #[error("generation failed: {0}")]
    Generation(String),
    /// Fetching a model from the hub failed.
    #[error("cannot download {file} from {repo}: {message}")]
    Download { repo: String, file: String, message: String },
}

impl LocalError {
    pub(crate) fn corrupt(path: &std::path::Path, message: impl ToString) -> Self {
        LocalError::Corrupt { path: path.to_path_buf(), message: message.to_string() }
    }
}
