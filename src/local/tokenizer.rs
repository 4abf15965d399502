//! The tokenizer: `tokenizer.json` beside the model when present, otherwise built from the GGUF's
//! own `tokenizer.ggml.*` metadata (byte-level BPE, as llama.cpp reads it).

use super::gguf::{value_u32, GgufFile};
use super::LocalError;
use candle_core::quantized::gguf_file::Value;
use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's `llama_token_type`: 3 is a control token, 4 a user-defined one; both are matched
/// whole in text (`parse_special`) and never split by BPE.
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Names that end a turn in the chat templates we know, used when the metadata names only one
/// end-of-sequence token (llama.cpp does the same).
const END_OF_TURN_NAMES: [&str; 5] =
    ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>"];

/// A tokenizer plus the special tokens generation needs.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Prepended to every prompt when the model asks for it and the template did not.
    bos: Option<u32>,
    add_bos: bool,
    /// Any of these ends generation with `finish_reason = stop`.
    pub(crate) eos: Vec<u32>,
    pub(crate) bos_text: String,
    pub(crate) eos_text: String,
}

impl TextTokenizer {
    /// `tokenizer.json` beside `gguf.path` wins; otherwise the GGUF metadata.
    pub(crate) fn load(gguf: &GgufFile) -> Result<Self, LocalError> {
        let fail = |message: String| LocalError::Tokenizer { path: gguf.path.clone(), message };
        let inner = match sidecar(&gguf.path) {
            Some(json) => {
                Tokenizer::from_file(&json).map_err(|e| fail(format!("{}: {e}", json.display())))?
            }
            None => from_metadata(gguf).map_err(fail)?,
        };
        let bos = gguf.u32("tokenizer.ggml.bos_token_id");
        let add_bos = metadata_bool(gguf, "tokenizer.ggml.add_bos_token").unwrap_or(false);
        let mut eos: Vec<u32> = ["eos", "eot", "eom"]
            .iter()
            .filter_map(|k| gguf.u32(&format!("tokenizer.ggml.{k}_token_id")))
            .collect();
        eos.extend(END_OF_TURN_NAMES.iter().filter_map(|n| inner.token_to_id(n)));
        eos.sort_unstable();
        eos.dedup();
        let text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let bos_text = text(bos);
        let eos_text = text(gguf.u32("tokenizer.ggml.eos_token_id"));
        Ok(TextTokenizer { inner, bos, add_bos, eos, bos_text, eos_text })
    }

    /// Token ids of `text`, with special tokens such as `<|im_start|>` recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| LocalError::InvalidRequest(format!("cannot tokenize: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The prompt's ids: `encode` plus the BOS token when the model wants one.
    pub(crate) fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, LocalError> {
        let mut ids = self.encode(prompt)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out. Invalid UTF-8 (a character cut in half) shows as
    /// U+FFFD, which the streaming decoder relies on to wait for the rest.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LocalError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| LocalError::Generation(format!("cannot decode tokens: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn sidecar(model: &Path) -> Option<PathBuf> {
    let json = model.with_file_name("tokenizer.json");
    json.is_file().then_some(json)
}

fn metadata_bool(gguf: &GgufFile, key: &str) -> Option<bool> {
    gguf.content.metadata.get(key).and_then(|v| v.to_bool().ok())
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Vec<String>, String> {
    let value = gguf.content.metadata.get(key).ok_or(format!("no `{key}` metadata"))?;
    let array = value.to_vec().map_err(|_| format!("`{key}` is not an array"))?;
    array
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| format!("`{key}` holds a non-string")))
        .collect()
}

/// Builds the same tokenizer llama.cpp builds for `tokenizer.ggml.model = gpt2`.
fn from_metadata(gguf: &GgufFile) -> Result<Tokenizer, String> {
    let model = gguf.string("tokenizer.ggml.model").ok_or("no `tokenizer.ggml.model` metadata")?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer type `{model}` is not supported from GGUF metadata; \
             put the model's tokenizer.json beside the file"
        ));
    }
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let merges = strings(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => Err(format!("merge `{m}` has no space")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = gguf.string("tokenizer.ggml.pre").unwrap_or("default");
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let specials = special_tokens(gguf, &tokens);
    tokenizer.add_special_tokens(specials).map_err(|e| e.to_string())?;
    Ok(tokenizer)
}

/// The pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` names; each mirrors the regexes in
/// llama.cpp's `llama_vocab` for that name.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, String> {
    // GPT-2's regex, run by ByteLevel itself.
    let gpt2 = || ByteLevel::new(false, true, true);
    let split_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper, String> {
        let split =
            Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| e.to_string())?;
        Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "default" | "gpt2" | "gpt-2" => Ok(gpt2().into()),
        // Digits one by one, then GPT-2's regex: SmolLM, StarCoder and kin.
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into())
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => split_then_bytes(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2),
        other => Err(format!("pre-tokenizer `{other}` is not supported")),
    }
}

/// Control and user-defined tokens are matched whole, as llama.cpp does with `parse_special`.
fn special_tokens(gguf: &GgufFile, tokens: &[String]) -> Vec<AddedToken> {
    let Some(Value::Array(types)) = gguf.content.metadata.get("tokenizer.ggml.token_type") else {
        return Vec::new();
    };
    types
        .iter()
        .zip(tokens)
        .filter(|(t, _)| {
            matches!(value_u32(t), Some(TOKEN_TYPE_CONTROL) | Some(TOKEN_TYPE_USER_DEFINED))
        })
        .map(|(_, tok)| AddedToken::from(tok.clone(), true))
        .collect()
}
