//! The tokenizer: `tokenizer.json` beside the model when present, otherwise built from the GGUF's
//! own `tokenizer.ggml.*` metadata as llama.cpp reads it: byte-level BPE (`gpt2`: SmolLM, Llama 3,
//! Qwen) with the `tokenizers` crate, SentencePiece (`llama`: Gemma, Llama 2, Mistral) with
//! [`super::spm`].

use super::gguf::{value_u32, GgufFile};
use super::spm::{Kind, Spm};
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
    inner: Backend,
    /// Prepended to every prompt when the model asks for it and the template did not.
    bos: Option<u32>,
    add_bos: bool,
    /// Appended to every prompt when the model asks for it (`add_eos_token`).
    eos_appended: Option<u32>,
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
            Some(json) => Backend::Hf(Box::new(
                Tokenizer::from_file(&json)
                    .map_err(|e| fail(format!("{}: {e}", json.display())))?,
            )),
            None => from_metadata(gguf).map_err(fail)?,
        };
        // llama.cpp's defaults for SentencePiece vocabularies: BOS 1, EOS 2, BOS added.
        let spm = gguf.string("tokenizer.ggml.model") == Some("llama");
        let id_or = |key: &str, spm_default: u32| {
            gguf.u32(&format!("tokenizer.ggml.{key}_token_id")).or(spm.then_some(spm_default))
        };
        let bos = id_or("bos", 1);
        let add_bos = metadata_bool(gguf, "tokenizer.ggml.add_bos_token").unwrap_or(spm);
        let eos_id = id_or("eos", 2);
        let add_eos = metadata_bool(gguf, "tokenizer.ggml.add_eos_token").unwrap_or(false);
        let eos_appended = eos_id.filter(|_| add_eos);
        let mut eos: Vec<u32> = ["eot", "eom"]
            .iter()
            .filter_map(|k| gguf.u32(&format!("tokenizer.ggml.{k}_token_id")))
            .chain(eos_id)
            .collect();
        eos.extend(END_OF_TURN_NAMES.iter().filter_map(|n| inner.token_to_id(n)));
        eos.sort_unstable();
        eos.dedup();
        let text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let bos_text = text(bos);
        let eos_text = text(eos_id);
        Ok(TextTokenizer { inner, bos, add_bos, eos_appended, eos, bos_text, eos_text })
    }

    /// Token ids of `text`, with special tokens such as `<|im_start|>` recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LocalError> {
        match &self.inner {
            Backend::Hf(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| LocalError::InvalidRequest(format!("cannot tokenize: {e}"))),
            Backend::Spm(t) => Ok(t.encode(text)),
        }
    }

    /// The prompt's ids: `encode` plus the BOS (and EOS) token when the model wants one.
    pub(crate) fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, LocalError> {
        let mut ids = self.encode(prompt)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if let Some(eos) = self.eos_appended {
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, control tokens left out. Invalid UTF-8 (a character cut in half) shows
    /// as U+FFFD, which the streaming decoder relies on to wait for the rest.
    pub fn decode(&self, ids: &[u32]) -> Result<String, LocalError> {
        match &self.inner {
            Backend::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| LocalError::Generation(format!("cannot decode tokens: {e}"))),
            Backend::Spm(t) => Ok(t.decode(ids)),
        }
    }

    /// Whether `token` is one entry of the vocabulary (to recognise a model family's markers).
    pub fn has_token(&self, token: &str) -> bool {
        self.inner.token_to_id(token).is_some()
    }

    /// Every token's bytes, and whether it is a special token (then its text, as written in
    /// prompts), by id. For constrained decoding.
    pub(crate) fn vocabulary_bytes(&self) -> Vec<(Vec<u8>, bool)> {
        self.spell(0..self.vocab_size() as u32)
    }

    /// `ids`' bytes each, as [`Self::vocabulary_bytes`] gives them: a token may be part of a
    /// character, which its decoded text cannot show.
    pub(crate) fn spell(&self, ids: impl Iterator<Item = u32>) -> Vec<(Vec<u8>, bool)> {
        match &self.inner {
            Backend::Spm(t) => ids.map(|id| t.token_bytes(id).unwrap_or_default()).collect(),
            Backend::Hf(t) => {
                let specials = t.get_added_tokens_decoder();
                let spell = Speller::of(t);
                ids.map(|id| {
                    let text = t.id_to_token(id).unwrap_or_default();
                    match specials.get(&id).is_some_and(|a| a.special) {
                        true => (text.into_bytes(), true),
                        false => (spell.bytes(&text), false),
                    }
                })
                .collect()
            }
        }
    }

    /// Tokens in the vocabulary, special ones included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm(t) => t.vocab_size(),
        }
    }
}

/// The two tokenizer families a GGUF's metadata can describe.
enum Backend {
    /// `tokenizer.json`, or byte-level BPE (`gpt2`) built with the `tokenizers` crate.
    Hf(Box<Tokenizer>),
    /// SentencePiece (`llama`), our own, matching llama.cpp.
    Spm(Box<Spm>),
}

impl Backend {
    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Backend::Hf(t) => t.token_to_id(token),
            Backend::Spm(t) => t.token_to_id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(t) => t.id_to_token(id).map(str::to_owned),
        }
    }
}

/// How a `tokenizers` vocabulary spells bytes: byte-level BPE as one character of GPT-2's
/// table per byte; SentencePiece style with `▁` for spaces and `<0xNN>` for odd bytes.
enum Speller {
    ByteLevel(std::collections::HashMap<char, u8>),
    Pieces,
}

impl Speller {
    fn of(t: &Tokenizer) -> Speller {
        use tokenizers::DecoderWrapper;
        let byte_level = match t.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(s)) => {
                s.get_decoders().iter().any(|d| matches!(d, DecoderWrapper::ByteLevel(_)))
            }
            _ => false,
        };
        match byte_level {
            true => Speller::ByteLevel(gpt2_chars()),
            false => Speller::Pieces,
        }
    }

    /// The bytes `piece` spells (a character outside the table stands for its own UTF-8).
    fn bytes(&self, piece: &str) -> Vec<u8> {
        match self {
            Speller::ByteLevel(table) => piece
                .chars()
                .flat_map(|c| match table.get(&c) {
                    Some(&b) => vec![b],
                    None => c.to_string().into_bytes(),
                })
                .collect(),
            Speller::Pieces => {
                let hex = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'));
                match hex.filter(|h| h.len() == 2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => piece.replace('\u{2581}', " ").into_bytes(),
                }
            }
        }
    }
}

/// GPT-2's table: printable bytes stand for themselves, the other 68 are spelled U+0100
/// onwards, in byte order.
fn gpt2_chars() -> std::collections::HashMap<char, u8> {
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| match matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            true => (b as char, b),
            false => {
                next += 1;
                (char::from_u32(next - 1).unwrap_or('\0'), b)
            }
        })
        .collect()
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

/// Builds the tokenizer llama.cpp builds for the file's `tokenizer.ggml.model`.
fn from_metadata(gguf: &GgufFile) -> Result<Backend, String> {
    let model = gguf.string("tokenizer.ggml.model").ok_or("no `tokenizer.ggml.model` metadata")?;
    match model {
        "gpt2" => Ok(Backend::Hf(Box::new(byte_level_bpe(gguf)?))),
        "llama" => Ok(Backend::Spm(Box::new(sentencepiece(gguf)?))),
        _ => Err(format!(
            "tokenizer type `{model}` is not supported from GGUF metadata (gpt2 and llama are); \
             put the model's tokenizer.json beside the file"
        )),
    }
}

/// `tokenizer.ggml.model = llama`: pieces, scores and token types; `add_space_prefix` defaults
/// to true as in llama.cpp (Gemma sets it false).
fn sentencepiece(gguf: &GgufFile) -> Result<Spm, String> {
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let scores = match gguf.content.metadata.get("tokenizer.ggml.scores") {
        None => None,
        Some(value) => Some(
            value
                .to_vec()
                .map_err(|_| "`tokenizer.ggml.scores` is not an array".to_owned())?
                .iter()
                .map(|v| {
                    v.to_f32().map_err(|_| "`tokenizer.ggml.scores` holds a non-f32".to_owned())
                })
                .collect::<Result<Vec<f32>, String>>()?,
        ),
    };
    let kinds = match gguf.content.metadata.get("tokenizer.ggml.token_type") {
        None => None,
        Some(value) => Some(
            value
                .to_vec()
                .map_err(|_| "`tokenizer.ggml.token_type` is not an array".to_owned())?
                .iter()
                .map(|v| value_u32(v).map(Kind::from_gguf).ok_or("a token type is not an integer"))
                .collect::<Result<Vec<Kind>, &str>>()?,
        ),
    };
    let unk = gguf.u32("tokenizer.ggml.unknown_token_id").or(Some(0));
    let add_space_prefix = metadata_bool(gguf, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    Spm::new(tokens, scores, kinds, unk, add_space_prefix)
}

/// `tokenizer.ggml.model = gpt2`: vocabulary, merges and the pre-tokenizer `tokenizer.ggml.pre`
/// names.
fn byte_level_bpe(gguf: &GgufFile) -> Result<Tokenizer, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// Piece, score and `token_type` of a tiny SentencePiece vocabulary; byte tokens follow.
    const VOCAB: [(&str, f32, i32); 11] = [
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<start_of_turn>", 0.0, 3),
        ("<end_of_turn>", 0.0, 3),
        ("\n", 0.0, 4),
        ("▁", -1.0, 1),
        ("h", -1.0, 1),
        ("i", -1.0, 1),
        // "hi" outscores "▁h", so "▁hi" becomes "▁" + "hi", not "▁h" + "i".
        ("▁h", -3.0, 1),
        ("hi", -2.0, 1),
    ];

    fn id(piece: &str) -> u32 {
        if let Some(hex) = piece.strip_prefix("<0x") {
            return VOCAB.len() as u32 + u32::from_str_radix(&hex[..2], 16).unwrap();
        }
        VOCAB.iter().position(|v| v.0 == piece).unwrap() as u32
    }

    /// A GGUF with no tensors, only `tokenizer.ggml.*` metadata of type `llama`, plus `extra`.
    fn load(extra: Vec<(&str, Value)>) -> TextTokenizer {
        let mut pieces: Vec<Value> = VOCAB.iter().map(|v| Value::String(v.0.into())).collect();
        let mut scores: Vec<Value> = VOCAB.iter().map(|v| Value::F32(v.1)).collect();
        let mut types: Vec<Value> = VOCAB.iter().map(|v| Value::I32(v.2)).collect();
        for b in 0..=255u8 {
            pieces.push(Value::String(format!("<0x{b:02X}>")));
            scores.push(Value::F32(0.0));
            types.push(Value::I32(6));
        }
        let mut metadata = vec![
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::Array(pieces)),
            ("tokenizer.ggml.scores", Value::Array(scores)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
        ];
        metadata.extend(extra);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spm.gguf");
        let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        TextTokenizer::load(&GgufFile::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn a_sentencepiece_vocabulary_loads_with_llama_cpp_defaults() {
        let t = load(Vec::new());
        // add_space_prefix and add_bos_token default to true; BOS is 1, EOS 2.
        assert_eq!(t.encode("hi").unwrap(), [id("▁"), id("hi")]);
        assert_eq!(t.encode_prompt("hi").unwrap(), [id("<s>"), id("▁"), id("hi")]);
        assert_eq!(
            t.encode("<start_of_turn>hi\n<end_of_turn>").unwrap(),
            [id("<start_of_turn>"), id("▁"), id("hi"), id("\n"), id("<end_of_turn>")]
        );
        // "é" has no token: its two UTF-8 bytes.
        assert_eq!(t.encode("é").unwrap(), [id("▁"), id("<0xC3>"), id("<0xA9>")]);
        // (A special token in the middle gets a space after it, as in llama.cpp.)
        for text in ["hi", "hi é hi", " hi  i", ""] {
            assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text, "{text:?}");
        }
        assert_eq!(t.decode(&[id("<s>"), id("h"), id("<end_of_turn>")]).unwrap(), "h");
        assert_eq!(t.eos, [id("</s>"), id("<end_of_turn>")]);
        assert_eq!((t.bos_text.as_str(), t.eos_text.as_str()), ("<s>", "</s>"));
        assert!(t.has_token("<start_of_turn>"));
        assert_eq!(t.vocab_size(), VOCAB.len() + 256);
    }

    #[test]
    fn gemma_style_metadata_turns_the_space_prefix_off() {
        let t = load(vec![
            ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.ggml.eos_token_id", Value::U32(id("<end_of_turn>"))),
        ]);
        assert_eq!(t.encode("hi").unwrap(), [id("hi")]);
        assert_eq!(t.encode(" hi").unwrap(), [id("▁"), id("hi")]);
        assert_eq!(t.encode_prompt("hi").unwrap(), [id("hi")]);
        for text in [" hi", "hi\nhi", "é"] {
            assert_eq!(t.decode(&t.encode(text).unwrap()).unwrap(), text, "{text:?}");
        }
        assert_eq!(t.eos, [id("<end_of_turn>")]);
    }

    #[test]
    fn other_tokenizer_types_name_the_supported_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bert.gguf");
        let model = Value::String("bert".into());
        let refs = [("tokenizer.ggml.model", &model)];
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &refs, &[]).unwrap();
        let err = TextTokenizer::load(&GgufFile::open(&path).unwrap()).err().unwrap();
        assert!(err.to_string().contains("gpt2 and llama are"), "{err}");
    }
}
