//! The local engine on the default model, SmolLM2-135M-Instruct Q4_1: real language ability,
//! and our tokenizer and template against fixtures from independent implementations
//! (`scripts/make_fixtures.py`). Without the model these fail, naming the command that fetches it.

mod common_local;

use common_local::default_model;
use edgechat::local::{Engine, EngineOptions, FinishReason, GenerateRequest, Message, Role};
use std::sync::OnceLock;

/// One engine for the whole file: loading is the slow part.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(&default_model(), EngineOptions::default()).unwrap())
}

fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ask(text: &str, max_tokens: usize) -> GenerateRequest {
    chat(&[(Role::User, text)], max_tokens)
}

#[test]
fn the_tokenizer_matches_the_reference() {
    let tokenizer = engine().tokenizer();
    let cases = fixture("tokenizer_smollm2.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tokenizer.encode(text).unwrap(), expected, "text {text:?}");
    }
}

#[test]
fn the_llama_cpp_pair_matches() {
    let ids = engine().tokenizer().encode("café 東京 🚀  spaces\n\nnew <|im_start|>user").unwrap();
    let expected = [
        83, 1939, 2756, 17097, 247, 126, 16736, 122, 15107, 244, 218, 216, 5600, 198, 198, 2241,
        216, 1, 4093,
    ];
    assert_eq!(ids, expected);
}

#[test]
fn the_template_matches_the_reference() {
    let cases = fixture("template_smollm2.json");
    for case in cases["cases"].as_array().unwrap() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let prompt = engine().render_prompt(&messages).unwrap();
        assert_eq!(prompt, case["prompt"].as_str().unwrap());
    }
}

#[test]
fn the_model_is_described() {
    let info = engine().info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.quantization, "Q4_1");
    assert_eq!(info.trained_context, 8192);
    assert_eq!(info.file_size, 98_362_432);
    assert!((130_000_000..140_000_000).contains(&info.parameters), "{}", info.parameters);
}

/// With the template's default system line, greedy SmolLM2-135M Q4_1 wanders off into French
/// landmarks ("L'Étoile, la Marseillaise, …"), and so it does with "You are a helpful
/// assistant." alone once every block's integer sum is exact (as llama.cpp's are): asked to
/// answer in English it answers "The capital of France is Paris." The other tests that check
/// this answer use the same system line.
#[tokio::test]
async fn knows_the_capital_of_france() {
    let mut request = ask("What is the capital of France?", 24);
    request
        .messages
        .insert(0, Message::new(Role::System, "You are a helpful assistant. Answer in English."));
    let (text, reason, usage) = engine().generate(request).unwrap().collect_text().await.unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert!(usage.completion_tokens <= 24 && usage.prompt_tokens > 20);
    if reason == FinishReason::Stop {
        assert!(usage.completion_tokens < 24);
    }
}

#[tokio::test]
async fn eight_concurrent_requests_all_complete() {
    let questions = [
        "Name a colour.",
        "What is 2 + 2?",
        "Say hello.",
        "Name a fruit.",
        "What is the capital of Italy?",
        "Name an animal.",
        "What day comes after Monday?",
        "Name a planet.",
    ];
    let started = std::time::Instant::now();
    let tasks = questions.map(|q| {
        tokio::spawn(async move {
            let stream = engine().generate(ask(q, 12)).unwrap();
            let (text, _, usage) = stream.collect_text().await.unwrap();
            (text, usage.completion_tokens, started.elapsed())
        })
    });
    for task in tasks {
        let (text, tokens, _elapsed) = task.await.unwrap();
        assert!(tokens >= 1 && !text.trim().is_empty(), "empty answer");
    }
}

fn with_options(prompt_cache_mb: usize, max_batch: usize) -> Engine {
    let options = EngineOptions { prompt_cache_mb, max_batch, ..EngineOptions::default() };
    Engine::load(&default_model(), options).unwrap()
}

fn chat(messages: &[(Role, &str)], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: messages.iter().map(|(r, t)| Message::new(*r, *t)).collect(),
        max_tokens,
        ..GenerateRequest::default()
    }
}

/// The second turn of a conversation starts from the first turn's KV cache (the prompt
/// cache) and computes only the rest, and the tokens it generates are the very ones an
/// engine without the cache generates at temperature 0.
#[tokio::test]
async fn the_next_turn_reuses_the_prompt_cache_and_answers_the_same() {
    let (cached, plain) = (with_options(64, 4), with_options(0, 4));
    let system = (Role::System, "You are a helpful assistant. Answer in English.");
    let first = [system, (Role::User, "Name three colours of the rainbow.")];
    let (reply, _, usage) =
        cached.generate(chat(&first, 24)).unwrap().collect_text().await.unwrap();
    assert_eq!(usage.cached_tokens, 0, "nothing to reuse yet");
    let second = [first[0], first[1], (Role::Assistant, &reply), (Role::User, "And two more?")];
    let with = cached.generate(chat(&second, 24)).unwrap().collect_text().await.unwrap();
    let without = plain.generate(chat(&second, 24)).unwrap().collect_text().await.unwrap();
    assert_eq!(with.0, without.0, "the cache changed the answer");
    assert_eq!(without.2.cached_tokens, 0);
    // At least the first turn's whole prompt came from the cache.
    assert!(with.2.cached_tokens >= usage.prompt_tokens, "{:?} after {usage:?}", with.2);
    assert!(with.2.cached_tokens < with.2.prompt_tokens, "{:?}", with.2);
}

/// A cancelled request's cache is dropped, not kept: the same prompt again starts from
/// nothing; once a request with it finishes, the next one reuses all but its last token.
#[tokio::test]
async fn a_cancelled_request_leaves_nothing_in_the_prompt_cache() {
    use futures_util::StreamExt;
    let engine = with_options(64, 1);
    let request = ask("Write a long poem about the sea.", 200);
    let mut stream = engine.generate(request.clone()).unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let (_, _, usage) = engine.generate(request.clone()).unwrap().collect_text().await.unwrap();
    assert_eq!(usage.cached_tokens, 0, "{usage:?}");
    let (_, _, again) = engine.generate(request).unwrap().collect_text().await.unwrap();
    assert_eq!(again.cached_tokens, again.prompt_tokens - 1, "{again:?}");
}

/// Four requests generated together, one forward pass per token for all of them, give each
/// the tokens it gets alone.
#[tokio::test]
async fn a_batch_answers_each_request_as_it_would_be_answered_alone() {
    let questions = [
        "What is the capital of France?",
        "Count from one to five.",
        "Hi!",
        "Why is the sky blue?",
    ];
    let alone = with_options(0, 1);
    let mut expected = Vec::new();
    for q in questions {
        expected.push(alone.generate(ask(q, 20)).unwrap().collect_text().await.unwrap().0);
    }
    let together = with_options(0, 4);
    let answers = futures_util::future::join_all(questions.iter().map(|q| {
        let e = together.clone();
        async move { e.generate(ask(q, 20)).unwrap().collect_text().await.unwrap().0 }
    }))
    .await;
    assert_eq!(answers, expected);
}
