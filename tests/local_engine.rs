//! The local engine end to end on a tiny random-weight GGUF written here: loading, tokenizing,
//! templating, generating, streaming, stopping, cancelling, and the errors.

mod common_local;

use candle_core::quantized::gguf_file::Value;
use common_local::{tiny_model, write_tiny_model, Tiny, CONTEXT};
use edgechat::local::{
    Engine, EngineOptions, Event, FinishReason, GenerateRequest, LocalError, Message, Role,
};
use futures_util::StreamExt;
use std::time::Duration;

fn load(path: &std::path::Path) -> Engine {
    Engine::load(path, EngineOptions { threads: Some(2), ..EngineOptions::default() }).unwrap()
}

fn ask(text: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message::new(Role::User, text)],
        max_tokens,
        ..GenerateRequest::default()
    }
}

async fn answer(engine: &Engine, request: GenerateRequest) -> (String, FinishReason, usize) {
    let (text, reason, usage) = engine.generate(request).unwrap().collect_text().await.unwrap();
    (text, reason, usage.completion_tokens as usize)
}

#[tokio::test]
async fn loads_and_describes_the_model() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let info = engine.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.name, "tiny test llama");
    assert_eq!(info.trained_context, CONTEXT as usize);
    assert_eq!(info.quantization, "Q4_1"); // the layers outweigh the Q8_0 embedding and head
    assert!(info.parameters > 50_000, "{info:?}");
    assert_eq!(engine.context_length(), CONTEXT as usize);
}

#[test]
fn sampling_defaults_come_from_the_file_where_it_has_them() {
    let (_dir, path) = tiny_model();
    let ours = edgechat::local::SamplingDefaults::default();
    assert_eq!(load(&path).sampling(), ours);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tuned.gguf");
    let extra = vec![
        ("general.sampling.temp", Value::F32(0.7)),
        ("general.sampling.top_p", Value::F32(0.8)),
        ("general.sampling.top_k", Value::I32(20)),
        ("general.sampling.penalty_repeat", Value::F32(f32::NAN)), // invalid: ours stays
    ];
    write_tiny_model(&path, &Tiny { extra, ..Tiny::default() });
    let tuned = load(&path).sampling();
    let expected = edgechat::local::SamplingDefaults {
        temperature: 0.7,
        top_p: 0.8,
        top_k: 20,
        repetition_penalty: ours.repetition_penalty,
    };
    assert_eq!(tuned, expected);
    let request = tuned.request(vec![Message::new(Role::User, "hi")], 5);
    assert_eq!((request.temperature, request.top_k, request.max_tokens), (0.7, 20, 5));
}

#[tokio::test]
async fn tokenizes_with_merges_bytes_and_special_tokens() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let t = engine.tokenizer();
    // 3 specials, then byte b is id 3 + b, then the merges from id 259 ("hell" is 261).
    let byte = |c: char| 3 + c as u32;
    assert_eq!(t.encode("hello").unwrap(), [261, byte('o')]);
    assert_eq!(t.encode(" world").unwrap(), [264, byte('l'), byte('d')]); // "Ġwor" l d
    assert_eq!(t.encode("<|im_start|>hi<|im_end|>").unwrap(), [1, byte('h'), byte('i'), 2]);
    // Digits are split one by one, as SmolLM2's pre-tokenizer does.
    assert_eq!(t.encode("12").unwrap(), [byte('1'), byte('2')]);
    for text in ["café 東京 🚀  spaces\n\nnew", "tabs\t\tand\r\n", "<|im_start|>user"] {
        let ids = t.encode(text).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text.replace("<|im_start|>", ""));
    }
}

#[tokio::test]
async fn renders_the_files_chat_template() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let prompt = engine
        .render_prompt(&[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "  Hi  "),
        ])
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[tokio::test]
async fn greedy_generation_is_deterministic_and_counts_usage() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let (a, reason, n) = answer(&engine, ask("hello", 12)).await;
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(n, 12);
    assert!(!a.is_empty());
    assert_eq!(answer(&engine, ask("hello", 12)).await.0, a);
    let usage = engine.generate(ask("hello", 3)).unwrap().collect_text().await.unwrap().2;
    let prompt = engine.render_prompt(&ask("hello", 3).messages).unwrap();
    assert_eq!(usage.prompt_tokens as usize, engine.tokenizer().encode(&prompt).unwrap().len());
    assert_eq!(usage.completion_tokens, 3);
}

#[tokio::test]
async fn a_seed_makes_sampling_reproducible() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let sampled = |seed| GenerateRequest {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        repetition_penalty: 1.1,
        seed: Some(seed),
        ..ask("hello", 16)
    };
    let first = answer(&engine, sampled(1)).await.0;
    assert_eq!(answer(&engine, sampled(1)).await.0, first);
    let others: Vec<String> = futures_util::future::join_all((2..5).map(|s| {
        let engine = engine.clone();
        async move { answer(&engine, sampled(s)).await.0 }
    }))
    .await;
    assert!(others.iter().any(|o| *o != first), "different seeds all gave {first:?}");
}

#[tokio::test]
async fn streams_deltas_then_one_done() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let mut stream = engine.generate(ask("hello", 10)).unwrap();
    let mut deltas = Vec::new();
    let mut done = None;
    while let Some(event) = stream.next().await {
        assert!(done.is_none(), "an event after Finish");
        match event.unwrap() {
            Event::Delta(d) => deltas.push(d),
            Event::Finish { reason, usage } => done = Some((reason, usage.unwrap())),
            other => panic!("the local model sends no {other:?}"),
        }
    }
    assert!(deltas.iter().all(|d| !d.is_empty()));
    assert_eq!(done.unwrap().0, FinishReason::Length);
    assert_eq!(deltas.concat(), answer(&engine, ask("hello", 10)).await.0);
}

#[tokio::test]
async fn a_stop_string_ends_generation_and_is_never_shown() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let (full, _, _) = answer(&engine, ask("hello", 24)).await;
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    let stop: String = chars[3..5].iter().collect();
    let before = &full[..full.find(&stop).unwrap()];
    let request = GenerateRequest { stop: vec![stop.clone()], ..ask("hello", 24) };
    let mut stream = engine.generate(request).unwrap();
    let mut shown = String::new();
    let mut reason = None;
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            Event::Delta(d) => shown.push_str(&d),
            Event::Finish { reason: why, .. } => reason = Some(why),
            other => panic!("the local model sends no {other:?}"),
        }
    }
    assert_eq!(shown, before);
    assert!(!shown.contains(&stop));
    assert_eq!(reason, Some(FinishReason::Stop));
}

#[tokio::test]
async fn dropping_the_stream_frees_the_engine_at_once() {
    let (_dir, path) = tiny_model();
    let options = EngineOptions { max_batch: 1, max_queue: 1, ..EngineOptions::default() };
    let engine = Engine::load(&path, options).unwrap();
    let long = ask("hello", CONTEXT as usize);
    let mut first = engine.generate(long.clone()).unwrap();
    first.next().await.unwrap().unwrap();
    drop(first);
    // With one slot, the next request runs only once the dropped one has stopped.
    let next = tokio::time::timeout(Duration::from_secs(20), answer(&engine, ask("hello", 2)));
    assert_eq!(next.await.unwrap().2, 2);
}

#[tokio::test]
async fn a_full_queue_is_busy() {
    let (_dir, path) = tiny_model();
    let options = EngineOptions { max_batch: 1, max_queue: 1, ..EngineOptions::default() };
    let engine = Engine::load(&path, options).unwrap();
    let long = ask("hello", 80);
    let mut running = engine.generate(long.clone()).unwrap();
    running.next().await.unwrap().unwrap(); // now it is active, not waiting
                                            // One runs and one waits; the next is refused. A tiny model can finish the running one
                                            // between two calls (letting the waiting one in), so keep asking, a bounded number of times.
    let mut held = vec![running];
    for _ in 0..50 {
        match engine.generate(long.clone()) {
            Ok(stream) => held.push(stream),
            Err(e @ LocalError::Busy { queued: 1 }) => {
                assert!(e.to_string().contains("busy"), "{e}");
                return;
            }
            Err(e) => panic!("expected busy, got {e}"),
        }
    }
    panic!("50 requests were all accepted with room for 1 running and 1 waiting");
}

#[tokio::test]
async fn concurrent_requests_all_finish() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let answers = futures_util::future::join_all((0..8).map(|_| {
        let e = engine.clone();
        async move { answer(&e, ask("hello", 6)).await }
    }))
    .await;
    let first = &answers[0].0;
    assert!(answers.iter().all(|(text, _, n)| text == first && *n == 6));
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_is_refused() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let long = "x ".repeat(CONTEXT as usize);
    match engine.generate(ask(&long, 4)) {
        Err(e @ LocalError::PromptTooLong { context, .. }) => {
            assert_eq!(context, CONTEXT as usize);
            assert!(e.to_string().contains("context window"), "{e}");
        }
        Err(e) => panic!("expected too long, got {e}"),
        Ok(_) => panic!("expected too long, got a stream"),
    }
}

#[tokio::test]
async fn generation_stops_at_the_context_window() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    let (_, reason, n) = answer(&engine, ask("hello", 10_000)).await;
    let prompt = engine.render_prompt(&ask("hello", 1).messages).unwrap();
    let prompt_tokens = engine.tokenizer().encode(&prompt).unwrap().len();
    assert_eq!((reason, n), (FinishReason::Length, CONTEXT as usize - prompt_tokens));
}

#[tokio::test]
async fn invalid_parameters_are_refused() {
    let (_dir, path) = tiny_model();
    let engine = load(&path);
    for bad in [
        GenerateRequest { max_tokens: 0, ..ask("hi", 1) },
        GenerateRequest { temperature: -1.0, ..ask("hi", 1) },
        GenerateRequest { top_p: 0.0, ..ask("hi", 1) },
        GenerateRequest { messages: vec![], ..ask("hi", 1) },
    ] {
        assert!(matches!(engine.generate(bad), Err(LocalError::InvalidRequest(_))));
    }
}

#[test]
fn a_corrupt_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let e = Engine::load(&garbage, EngineOptions::default()).err().unwrap();
    assert!(matches!(e, LocalError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("garbage.gguf"), "{e}");

    let whole = dir.path().join("whole.gguf");
    write_tiny_model(&whole, &Tiny::default());
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = Engine::load(&cut, EngineOptions::default()).err().unwrap();
    assert!(matches!(e, LocalError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("cut.gguf"), "{e}");

    let missing = dir.path().join("missing.gguf");
    let e = Engine::load(&missing, EngineOptions::default()).err().unwrap();
    assert!(matches!(e, LocalError::Io { .. }) && e.to_string().contains("missing.gguf"), "{e}");

    let no_template = EngineOptions {
        chat_template: Some(dir.path().join("missing.jinja")),
        ..EngineOptions::default()
    };
    let e = Engine::load(&whole, no_template).err().unwrap();
    assert!(matches!(e, LocalError::Template(_)) && e.to_string().contains("missing.jinja"), "{e}");
    let broken = dir.path().join("broken.jinja");
    std::fs::write(&broken, "{% for %}").unwrap();
    let e = Engine::load(
        &whole,
        EngineOptions { chat_template: Some(broken), ..EngineOptions::default() },
    );
    assert!(matches!(e.err().unwrap(), LocalError::Template(_)));
}

#[test]
fn an_unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    write_tiny_model(&path, &Tiny { architecture: "mamba9", ..Tiny::default() });
    let e = Engine::load(&path, EngineOptions::default()).err().unwrap();
    let text = e.to_string();
    assert!(matches!(e, LocalError::UnsupportedArchitecture { .. }), "{text}");
    assert!(
        text.contains("mamba9") && text.contains("odd.gguf") && text.contains("llama"),
        "{text}"
    );
}

#[test]
fn a_tokenizer_json_beside_the_model_wins() {
    let (dir, path) = tiny_model();
    // A word-level tokenizer that knows one word, to tell it apart from the GGUF's BPE.
    let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"hello":5},"unk_token":"[UNK]"}}"#;
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    let engine = load(&path);
    assert_eq!(engine.tokenizer().encode("hello there").unwrap(), [5, 0]);
}

#[tokio::test]
async fn qwen2_qwen3_and_gemma3_files_load_and_generate_deterministically() {
    for architecture in ["qwen2", "qwen3", "gemma3"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{architecture}.gguf"));
        write_tiny_model(&path, &Tiny { architecture, ..Tiny::default() });
        let engine = load(&path);
        assert_eq!(engine.info().architecture, architecture);
        let (a, reason, n) = answer(&engine, ask("hello", 8)).await;
        assert_eq!((reason, n), (FinishReason::Length, 8), "{architecture}");
        // Two at once (qwen2 runs them one after the other: one shared KV cache) still give
        // the same greedy answer each.
        let (b, c) =
            tokio::join!(answer(&engine, ask("hello", 8)), answer(&engine, ask("hello", 8)));
        assert_eq!((b.0.as_str(), c.0.as_str()), (a.as_str(), a.as_str()), "{architecture}");
    }
}

/// More engines than candle's pool has threads, all loaded at once: each still answers. An
/// idle engine holds no pool thread (it once held one for its whole life, and the engine
/// after the pool's last thread waited forever).
#[tokio::test]
async fn more_engines_than_pool_threads_all_answer() {
    let (_dir, path) = tiny_model();
    let engines: Vec<Engine> =
        (0..candle_core::utils::get_num_threads() + 1).map(|_| load(&path)).collect();
    for engine in &engines {
        let answered = tokio::time::timeout(Duration::from_secs(60), answer(engine, ask("hi", 2)));
        assert_eq!(answered.await.expect("an engine was starved").2, 2);
    }
}
