//! The remote client in its text-generation dialect (HuggingFace's classic task, TGI's wire
//! format) against a stand-in on 127.0.0.1:0 that streams like TGI and misbehaves on cue: every
//! behaviour ends in an answer or a typed error within the configured deadlines, never a hang.

use bytes::Bytes;
use edgechat::llm::{
    Breaker, ChatRequest, Dialect, Event, FinishReason, Message, Phase, ProviderError, Remote,
    RetryPolicy, Role, Sampling, Usage,
};
use edgechat::secret::Secret;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::remote::{breaker, client, drain, timeouts};

const TGI: Dialect = Dialect::TextGeneration;

const MODEL: &str = "HuggingFaceH4/zephyr-7b-beta";

/// What the stand-in does with one request.
#[derive(Clone)]
enum Act {
    /// Streams these tokens (text, special), the last one with the generated text and details.
    Stream { tokens: Vec<(&'static str, bool)>, gap: Duration, finish: &'static str },
    /// Sends the first token, then nothing more while keeping the connection open.
    StallAfterFirst,
    /// Sends the first token, then breaks the connection.
    DropAfterFirst,
    /// Sends the first token, then an error event.
    ErrorAfterFirst,
    /// Sends the first token, then closes cleanly without the final event.
    EndWithoutFinal,
    /// Answers with an error status (and `Retry-After` seconds).
    Status(u16, Option<u64>),
}

type Body = BoxBody<Bytes, std::io::Error>;

/// What the stand-in saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    auth: String,
    body: Value,
}

struct StandIn {
    base: String,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// One TGI stream event, as TGI writes it (`data:` without a space).
fn event(id: usize, text: &str, special: bool, end: Option<(&str, &str, usize)>) -> String {
    let token = json!({"id": id, "text": text, "logprob": -0.1, "special": special});
    // Three prompt tokens, as TGI lists them when asked for decoder input details.
    let prefill =
        json!([{"id": 1, "text": "<s>"}, {"id": 2, "text": "User"}, {"id": 3, "text": ":"}]);
    let (generated_text, details) = match end {
        Some((all, finish, n)) => (
            json!(all),
            json!({"finish_reason": finish, "generated_tokens": n, "seed": null, "prefill": prefill}),
        ),
        None => (Value::Null, Value::Null),
    };
    let e =
        json!({"index": id, "token": token, "generated_text": generated_text, "details": details});
    format!("data:{e}\n\n")
}

async fn play(act: Act, tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>) {
    let send = |s: String| tx.send(Ok(Frame::data(Bytes::from(s))));
    if let Act::Stream { tokens, gap, finish } = act {
        let all: String = tokens.iter().filter(|t| !t.1).map(|t| t.0).collect();
        for (i, (text, special)) in tokens.iter().enumerate() {
            let end = (i + 1 == tokens.len()).then_some((all.as_str(), finish, tokens.len()));
            if send(event(i, text, *special, end)).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
        return;
    }
    let _ = send(event(0, "first", false, None)).await;
    match act {
        Act::StallAfterFirst => tokio::time::sleep(Duration::from_secs(3600)).await,
        Act::DropAfterFirst => {
            // The upstream dies a little later (hyper would otherwise abort before flushing).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = tx.send(Err(std::io::Error::other("cut"))).await;
        }
        Act::ErrorAfterFirst => {
            let e = json!({"error": "CUDA OOM for key hf_secretsecretsecretsecret", "error_type": "generation"});
            let _ = send(format!("data:{e}\n\n")).await;
        }
        _ => {}
    }
}

fn stream_body(act: Act) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(play(act, tx));
    BodyExt::boxed(StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}

/// Starts a stand-in that plays `script` in order, repeating its last act.
async fn stand_in(script: Vec<Act>) -> StandIn {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/models", listener.local_addr().unwrap());
    let (hits, seen) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let (counter, log) = (hits.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (script, counter, log) = (script.clone(), counter.clone(), log.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (script, counter, log) = (script.clone(), counter.clone(), log.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let auth = req.headers()["authorization"].to_str().unwrap().to_string();
                        let bytes = req.into_body().collect().await.unwrap().to_bytes();
                        let body = serde_json::from_slice(&bytes).unwrap();
                        log.lock().unwrap().push(Seen { path, auth, body });
                        counter.fetch_add(1, Ordering::SeqCst);
                        let act = {
                            let mut s = script.lock().unwrap();
                            if s.len() > 1 {
                                s.pop_front().unwrap()
                            } else {
                                s[0].clone()
                            }
                        };
                        Ok::<_, Infallible>(respond(act))
                    }
                });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    StandIn { base, hits, seen }
}

fn respond(act: Act) -> hyper::Response<Body> {
    let mut builder = hyper::Response::builder();
    let body = match act {
        Act::Status(status, retry_after) => {
            builder = builder.status(status);
            if let Some(s) = retry_after {
                builder = builder.header("retry-after", s.to_string());
            }
            let text = r#"{"error": "Model HuggingFaceH4/zephyr-7b-beta is currently loading", "estimated_time": 20.0}"#;
            Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
        }
        other => {
            builder = builder.header("content-type", "text/event-stream");
            stream_body(other)
        }
    };
    builder.body(body).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![Message::new(Role::User, "Hello")],
        sampling: Sampling { max_tokens: Some(16), ..Default::default() },
        ..Default::default()
    }
}

fn answer(tokens: Vec<(&'static str, bool)>, finish: &'static str) -> Act {
    Act::Stream { tokens, gap: Duration::ZERO, finish }
}

/// Fails the test instead of hanging it.
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("the test hung")
}

#[tokio::test]
async fn answers_stream_with_finish_and_usage_skipping_special_tokens() {
    within(async {
        let tokens = vec![("Hel", false), ("lo", false), (" 東京", false), ("</s>", true)];
        let s = stand_in(vec![answer(tokens, "eos_token")]).await;
        let stream = client(TGI, &s.base, 1, breaker()).chat(&request()).await.unwrap();
        let (text, last) = drain(stream).await;
        assert_eq!(text, "Hello 東京");
        let usage = Some(Usage { prompt_tokens: 3, completion_tokens: 4, cached_tokens: 0 });
        assert_eq!(last, Some(Ok(Event::Finish { reason: FinishReason::Stop, usage })));
    })
    .await
}

#[tokio::test]
async fn the_request_carries_the_transcript_and_only_set_parameters() {
    within(async {
        let s = stand_in(vec![answer(vec![("ok", false)], "stop_sequence")]).await;
        let c = client(TGI, &s.base, 1, breaker());
        let req = ChatRequest {
            messages: vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "Hi"),
                Message::new(Role::Assistant, "Hello."),
                Message::new(Role::User, "Name a city."),
            ],
            sampling: Sampling {
                max_tokens: Some(16),
                temperature: Some(0.0),
                top_p: Some(0.5),
                seed: Some(42),
                stop: vec!["\nUser:".into()],
                ..Default::default()
            },
            ..request()
        };
        drain(c.chat(&req).await.unwrap()).await;
        drain(c.chat(&ChatRequest { sampling: Sampling::default(), ..request() }).await.unwrap()).await;
        let seen = s.seen.lock().unwrap().clone();
        assert_eq!(seen[0].path, format!("/models/{MODEL}"));
        assert_eq!(seen[0].auth, "Bearer hf_test");
        let inputs = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Name a city.\n\nAssistant:";
        let parameters = json!({"max_new_tokens": 16, "do_sample": false, "top_p": 0.5, "seed": 42,
            "stop": ["\nUser:"], "return_full_text": false, "details": true});
        assert_eq!(seen[0].body, json!({"inputs": inputs, "parameters": parameters, "stream": true}));
        let bare = json!({"return_full_text": false, "details": true});
        assert_eq!(seen[1].body["parameters"], bare, "nothing unset is sent");
    })
    .await
}

#[tokio::test]
async fn a_length_finish_is_reported_as_length() {
    within(async {
        let s = stand_in(vec![answer(vec![("a", false), ("b", false)], "length")]).await;
        let (text, last) =
            drain(client(TGI, &s.base, 1, breaker()).chat(&request()).await.unwrap()).await;
        assert_eq!(text, "ab");
        let usage = Some(Usage { prompt_tokens: 3, completion_tokens: 2, cached_tokens: 0 });
        assert_eq!(last, Some(Ok(Event::Finish { reason: FinishReason::Length, usage })));
    })
    .await
}

#[tokio::test]
async fn a_loading_model_s_503_is_retried_after_retry_after() {
    within(async {
        let s = stand_in(vec![Act::Status(503, Some(0)), answer(vec![("ok", false)], "eos_token")])
            .await;
        let (text, last) =
            drain(client(TGI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
        assert_eq!((text.as_str(), s.hits.load(Ordering::SeqCst)), ("ok", 2));
        assert!(matches!(last, Some(Ok(Event::Finish { reason: FinishReason::Stop, .. }))));
    })
    .await
}

#[tokio::test]
async fn an_error_event_mid_stream_is_a_protocol_error_without_its_body() {
    within(async {
        let s = stand_in(vec![Act::ErrorAfterFirst]).await;
        let (text, last) =
            drain(client(TGI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
        assert_eq!(text, "first");
        let Some(Err(ProviderError::Protocol(why))) = last else { panic!("{last:?}") };
        assert!(!why.contains("hf_secret") && !why.contains("CUDA"), "{why}");
        assert_eq!(s.hits.load(Ordering::SeqCst), 1, "no retry after the first byte");
    })
    .await
}

#[tokio::test]
async fn a_stall_mid_stream_times_out_within_the_idle_limit() {
    within(async {
        let s = stand_in(vec![Act::StallAfterFirst]).await;
        let t = Instant::now();
        let (text, last) =
            drain(client(TGI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
        assert_eq!(text, "first");
        assert_eq!(last, Some(Err(ProviderError::Timeout(Phase::Idle))));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    })
    .await
}

#[tokio::test]
async fn a_dropped_or_unfinished_connection_ends_in_an_error() {
    within(async {
        for act in [Act::DropAfterFirst, Act::EndWithoutFinal] {
            let s = stand_in(vec![act]).await;
            let stream = client(TGI, &s.base, 3, breaker()).chat(&request()).await.unwrap();
            let (text, last) = drain(stream).await;
            assert_eq!(text, "first");
            assert!(matches!(last, Some(Err(ProviderError::Protocol(_)))), "{last:?}");
        }
    })
    .await
}

#[tokio::test]
async fn a_model_id_that_is_not_a_repository_path_is_refused_unsent() {
    within(async {
        let s = stand_in(vec![answer(vec![("ok", false)], "eos_token")]).await;
        let req = ChatRequest { model: "../../v1/chat/completions".into(), ..request() };
        let err = client(TGI, &s.base, 3, breaker()).chat(&req).await.err().unwrap();
        assert_eq!(err, ProviderError::Status { status: 400, retry_after: None });
        assert_eq!(s.hits.load(Ordering::SeqCst), 0);
    })
    .await
}

#[tokio::test]
async fn two_clients_of_one_provider_share_its_breaker() {
    within(async {
        let s = stand_in(vec![Act::Status(500, None)]).await;
        let shared = Arc::new(Breaker::new(2, Duration::from_secs(60)));
        let classic = client(TGI, &s.base, 1, shared.clone());
        for _ in 0..2 {
            let err = classic.chat(&request()).await.err();
            assert!(matches!(err, Some(ProviderError::Status { status: 500, .. })), "{err:?}");
        }
        let retry =
            RetryPolicy { attempts: 1, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
        let key = Some(Secret::new("hf_test"));
        let router = Remote::new(
            "huggingface",
            "http://127.0.0.1:9/v1",
            Dialect::ChatCompletions,
            key,
            timeouts(),
            retry,
            shared,
        )
        .unwrap();
        assert_eq!(router.chat(&request()).await.err(), Some(ProviderError::CircuitOpen));
        assert_eq!(s.hits.load(Ordering::SeqCst), 2);
    })
    .await
}
