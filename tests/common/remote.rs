//! What the `llm` client tests share: deadlines short enough to test, a client per dialect
//! (key `sk-test` for Chat Completions, `hf_test` for text generation), and draining a stream.
#![allow(dead_code)]

use edgechat::llm::{
    Breaker, Dialect, Event, EventStream, ProviderError, Remote, RetryPolicy, Timeouts,
};
use edgechat::secret::Secret;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

pub fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(2),
        first_byte: Duration::from_millis(800),
        idle: Duration::from_millis(800),
        total: Duration::from_secs(20),
    }
}

/// A breaker that stays closed for the length of a test.
pub fn breaker() -> Arc<Breaker> {
    Arc::new(Breaker::new(100, Duration::from_secs(60)))
}

/// A client of `dialect` at `base` making `attempts` attempts, 20 ms apart at first.
pub fn client(dialect: Dialect, base: &str, attempts: u32, breaker: Arc<Breaker>) -> Remote {
    let retry = RetryPolicy {
        attempts,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_secs(2),
    };
    let (name, key) = match dialect {
        Dialect::ChatCompletions => ("openai", "sk-test"),
        Dialect::TextGeneration => ("huggingface", "hf_test"),
    };
    Remote::new(name, base, dialect, Some(Secret::new(key)), timeouts(), retry, breaker).unwrap()
}

/// Drains a stream into its text and its last item.
pub async fn drain(mut s: EventStream) -> (String, Option<Result<Event, ProviderError>>) {
    let (mut text, mut last) = (String::new(), None);
    while let Some(item) = s.next().await {
        if let Ok(Event::Delta(d)) = &item {
            text.push_str(d);
        }
        last = Some(item);
    }
    (text, last)
}
