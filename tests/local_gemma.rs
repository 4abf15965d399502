//! A real model file from the wild: Google's Gemma-3-270M as Q4_K_M (`bash
//! models/fetch-gemma3.sh`). Its SentencePiece vocabulary, read from the GGUF alone, must
//! tokenize exactly as llama.cpp does (`tests/fixtures/tokenizer_gemma3.json`, written from
//! llama-server's /tokenize by `tests/fixtures/make_spm_fixture.py`), and the model must load
//! and answer through Gemma's turn format. Without the file these fail, naming the command that
//! fetches it.

use edgechat::local::{Engine, EngineOptions, GenerateRequest, Message, Role};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The Gemma file, or a failure that says how to get it.
fn gemma_model() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-Q4_K_M.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch-gemma3.sh` (CI does) to fetch Gemma-3-270M",
        path.display()
    );
    path
}

/// One engine for the whole file; a short context keeps its KV cache small.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let options = EngineOptions { context: Some(512), ..EngineOptions::default() };
        Engine::load(&gemma_model(), options).unwrap()
    })
}

fn fixture() -> Vec<(String, Vec<u32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_gemma3.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
    };
    let cases = json["cases"].as_array().unwrap();
    cases.iter().map(|c| (c["text"].as_str().unwrap().to_owned(), ids(&c["ids"]))).collect()
}

#[test]
fn the_tokenizer_matches_llama_cpp() {
    let tokenizer = engine().tokenizer();
    let cases = fixture();
    assert!(cases.len() >= 30);
    for (text, expected) in &cases {
        assert_eq!(&tokenizer.encode(text).unwrap(), expected, "text {text:?}");
    }
}

/// Decoding gives the text back, less the control tokens (turn markers, BOS/EOS, unused),
/// which are not text, and with a literal `▁` read as the space it stands for (as llama.cpp's
/// /detokenize does).
#[test]
fn decoding_gives_the_text_back() {
    const CONTROL: [&str; 7] =
        ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unused0>", "<unused42>"];
    let tokenizer = engine().tokenizer();
    for (text, _) in fixture() {
        let expected = CONTROL.iter().fold(text.clone(), |t, c| t.replace(c, ""));
        let expected = expected.replace('\u{2581}', " ");
        let decoded = tokenizer.decode(&tokenizer.encode(&text).unwrap()).unwrap();
        assert_eq!(decoded, expected, "text {text:?}");
    }
}

#[test]
fn the_prompt_is_in_gemma_turn_format_with_one_bos() {
    let messages = [Message::new(Role::System, "Be brief."), Message::new(Role::User, "Hi")];
    let prompt = engine().render_prompt(&messages).unwrap();
    assert_eq!(
        prompt,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let tokenizer = engine().tokenizer();
    let ids = tokenizer.encode(&prompt).unwrap();
    // <bos>, <start_of_turn>, "user", "\n" ... as llama.cpp splits it; no second BOS.
    assert_eq!(&ids[..4], [2, 105, 2364, 107]);
    assert_eq!(engine().prompt_tokens(&messages).unwrap(), ids.len());
    assert_eq!(engine().info().architecture, "gemma3");
}

/// llama.cpp's greedy answer to one question, from the fixture.
struct Greedy {
    prompt_tokens: usize,
    first_text: String,
    /// The answer up to llama.cpp's first near-tie, where every correct pass agrees.
    decisive_text: String,
}

fn greedy() -> Greedy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_gemma3.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let g = &json["greedy"];
    let first = g["ids"][0].as_u64().unwrap() as u32;
    Greedy {
        prompt_tokens: g["prompt_ids"].as_array().unwrap().len(),
        first_text: engine().tokenizer().decode(&[first]).unwrap(),
        decisive_text: g["decisive_text"].as_str().unwrap().to_owned(),
    }
}

fn question(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message::new(Role::User, "What is the capital of France?")],
        max_tokens,
        ..GenerateRequest::default()
    }
}

/// The pretrained (not instruction-tuned) 270M model answers a question with another
/// question; llama.cpp's first greedy token ("What") leads its runner-up by 1.5 nats.
#[tokio::test]
async fn loads_and_answers_greedily() {
    let expected = greedy();
    let (text, _reason, usage) =
        engine().generate(question(8)).unwrap().collect_text().await.unwrap();
    assert!(text.starts_with(&expected.first_text), "answer: {text:?}");
    assert_eq!(usage.prompt_tokens as usize, expected.prompt_tokens);
    assert!((1..=8).contains(&usage.completion_tokens));
}

/// The answer equals llama.cpp's up to its first near-tie ("What is the capital of France?").
/// candle-transformers 0.11's quantized gemma3, which gates its feed-forward with SiLU instead
/// of GELU, answered "What is the capital of the United States?": our pass runs gemma3.
#[tokio::test]
async fn answers_as_llama_cpp_does() {
    let expected = greedy();
    let (text, _, _) = engine().generate(question(12)).unwrap().collect_text().await.unwrap();
    assert!(text.starts_with(&expected.decisive_text), "answer: {text:?}");
}

/// A prompt longer than one prefill chunk (128 tokens) is answered: candle's gemma3 can only
/// mask a multi-token step that starts at position 0, so its prompt goes in one pass.
#[tokio::test]
async fn a_prompt_longer_than_one_prefill_chunk_is_answered() {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let request = GenerateRequest {
        messages: vec![Message::new(Role::User, text)],
        max_tokens: 2,
        ..GenerateRequest::default()
    };
    let (_, _, usage) = engine().generate(request).unwrap().collect_text().await.unwrap();
    assert!(usage.prompt_tokens > 300, "{}", usage.prompt_tokens);
    assert!(usage.completion_tokens >= 1);
}
