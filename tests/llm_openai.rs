//! The remote client in its Chat Completions dialect against a stand-in that speaks the real
//! wire format on 127.0.0.1:0 and misbehaves on cue: every behaviour ends in an answer or a typed
//! error within the configured deadlines, never a hang.

mod common;

use common::remote::{breaker, client, drain, timeouts};
use common::upstream::{Act, Upstream};
use edgechat::llm::{
    Breaker, ChatRequest, Dialect, Event, FinishReason, Message, Phase, ProviderError, Remote,
    RetryPolicy, Role, Sampling, Usage,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OPENAI: Dialect = Dialect::ChatCompletions;

fn request() -> ChatRequest {
    ChatRequest {
        model: "gpt-4o-mini".into(),
        messages: vec![Message::new(Role::User, "Hello")],
        sampling: Sampling { max_tokens: Some(16), ..Default::default() },
        ..Default::default()
    }
}

fn answer(deltas: Vec<&'static str>, gap_ms: u64) -> Act {
    Act::Stream { deltas, gap: Duration::from_millis(gap_ms), finish: "stop" }
}

#[tokio::test]
async fn answers_stream_with_usage_and_finish_reason() {
    let s = Upstream::start(vec![Act::Stream {
        deltas: vec!["Hel", "lo", " 東京"],
        gap: Duration::ZERO,
        finish: "length",
    }])
    .await;
    let (text, last) =
        drain(client(OPENAI, &s.base, 1, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!(text, "Hello 東京");
    let usage = Some(Usage { prompt_tokens: 7, completion_tokens: 3, cached_tokens: 0 });
    assert_eq!(last, Some(Ok(Event::Finish { reason: FinishReason::Length, usage })));
    let seen = &s.seen()[0];
    assert_eq!(
        (seen.path.as_str(), seen.auth.as_str()),
        ("/v1/chat/completions", "Bearer sk-test")
    );
    assert_eq!(
        (seen.body["stream"].as_bool(), seen.body["max_tokens"].as_u64()),
        (Some(true), Some(16))
    );
}

#[tokio::test]
async fn a_slow_stream_within_the_idle_limit_completes() {
    let s = Upstream::start(vec![answer(vec!["a", "b", "c", "d"], 150)]).await;
    let (text, last) =
        drain(client(OPENAI, &s.base, 1, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!(text, "abcd");
    assert!(matches!(last, Some(Ok(Event::Finish { .. }))));
}

#[tokio::test]
async fn a_stall_before_the_first_byte_times_out_after_each_retry() {
    let s = Upstream::start(vec![Act::StallBeforeHead]).await;
    let t = Instant::now();
    let err = client(OPENAI, &s.base, 2, breaker()).chat(&request()).await.err().unwrap();
    assert_eq!(err, ProviderError::Timeout(Phase::FirstByte));
    assert_eq!(s.hits(), 2, "retried once");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_stall_or_a_drop_mid_stream_ends_the_stream_with_an_error() {
    let s = Upstream::start(vec![Act::StallAfterFirst]).await;
    let t = Instant::now();
    let (text, last) =
        drain(client(OPENAI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!(text, "first");
    assert_eq!(last, Some(Err(ProviderError::Timeout(Phase::Idle))));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(s.hits(), 1, "no retry after the first byte");

    let s = Upstream::start(vec![Act::DropAfterFirst]).await;
    let (text, last) =
        drain(client(OPENAI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!(text, "first");
    assert!(matches!(last, Some(Err(ProviderError::Protocol(_)))), "{last:?}");
}

#[tokio::test]
async fn malformed_sse_and_client_errors_are_not_retried() {
    let s = Upstream::start(vec![Act::Malformed]).await;
    let err = client(OPENAI, &s.base, 3, breaker()).chat(&request()).await.err().unwrap();
    assert!(matches!(err, ProviderError::Protocol(_)), "{err:?}");
    assert_eq!(s.hits(), 1);

    let s = Upstream::start(vec![Act::Status(401, None)]).await;
    let err = client(OPENAI, &s.base, 3, breaker()).chat(&request()).await.err().unwrap();
    assert_eq!(err, ProviderError::Status { status: 401, retry_after: None });
    assert!(!err.to_string().contains("sk-secret"), "the upstream body is never part of the error");
    assert_eq!(s.hits(), 1);
}

#[tokio::test]
async fn server_errors_and_429_are_retried_honouring_retry_after() {
    let s = Upstream::start(vec![
        Act::Status(500, None),
        Act::Status(503, None),
        answer(vec!["ok"], 0),
    ])
    .await;
    let (text, _) =
        drain(client(OPENAI, &s.base, 3, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!((text.as_str(), s.hits()), ("ok", 3));

    let s = Upstream::start(vec![Act::Status(429, Some(1)), answer(vec!["later"], 0)]).await;
    let t = Instant::now();
    let (text, _) =
        drain(client(OPENAI, &s.base, 2, breaker()).chat(&request()).await.unwrap()).await;
    assert_eq!(text, "later");
    assert!(t.elapsed() >= Duration::from_millis(950), "waited Retry-After: {:?}", t.elapsed());

    let s = Upstream::start(vec![Act::Status(503, None)]).await;
    let err = client(OPENAI, &s.base, 2, breaker()).chat(&request()).await.err().unwrap();
    assert_eq!(err.reason(), "upstream_error");
    assert_eq!(s.hits(), 2, "gives up after the attempts");
}

#[tokio::test]
async fn the_breaker_opens_and_skips_the_upstream() {
    let s = Upstream::start(vec![Act::Status(500, None)]).await;
    let c = client(OPENAI, &s.base, 1, Arc::new(Breaker::new(2, Duration::from_secs(60))));
    for _ in 0..2 {
        assert!(matches!(c.chat(&request()).await, Err(ProviderError::Status { status: 500, .. })));
    }
    let t = Instant::now();
    assert_eq!(c.chat(&request()).await.err(), Some(ProviderError::CircuitOpen));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(s.hits(), 2, "an open circuit sends nothing");
}

#[tokio::test]
async fn no_key_or_nothing_listening_fail_fast_with_their_reason() {
    let retry = RetryPolicy { attempts: 1, base_delay: Duration::ZERO, max_delay: Duration::ZERO };
    let c = Remote::new(
        "openai",
        "http://127.0.0.1:9/v1",
        Dialect::ChatCompletions,
        None,
        timeouts(),
        retry,
        breaker(),
    )
    .unwrap();
    assert_eq!(c.chat(&request()).await.err(), Some(ProviderError::NotConfigured));

    // Port 1 (tcpmux) is privileged and unused: nothing listens there.
    let c = client(OPENAI, "http://127.0.0.1:1/v1", 2, breaker());
    let err = c.chat(&request()).await.err().unwrap();
    assert!(matches!(err, ProviderError::Connect(_)), "{err:?}");
    assert_eq!(err.reason(), "unreachable");
}
