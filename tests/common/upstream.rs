//! A stand-in for OpenAI's Chat Completions API on 127.0.0.1:0: it speaks the real wire format
//! (JSON errors, SSE chunks, `[DONE]`), records what it was sent, and misbehaves on cue.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// What the stand-in does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// Streams these deltas `gap` apart, a finish chunk, a usage chunk and `[DONE]`.
    Stream { deltas: Vec<&'static str>, gap: Duration, finish: &'static str },
    /// Never sends the response head.
    StallBeforeHead,
    /// Sends the first delta, then nothing while keeping the connection open.
    StallAfterFirst,
    /// Sends the first delta, then breaks the connection.
    DropAfterFirst,
    /// Sends a chunk that is not JSON.
    Malformed,
    /// Streams these chunks as written (tool calls, refusals, log probabilities…), then
    /// `[DONE]`.
    Chunks(Vec<Value>),
    /// Answers with an error status, a JSON error body, and `Retry-After` seconds.
    Status(u16, Option<u64>),
    /// Answers with an error status and OpenAI's error body, echoing the key it was sent and
    /// the model asked for, as providers do ("Incorrect API key provided: sk-…").
    Echo(u16),
}

/// An answer streamed at once.
pub fn answer(deltas: Vec<&'static str>) -> Act {
    Act::Stream { deltas, gap: Duration::ZERO, finish: "stop" }
}

type Body = BoxBody<Bytes, std::io::Error>;

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub auth: String,
    pub body: Value,
}

/// A running stand-in.
pub struct Upstream {
    /// The API root to configure as `base_url` (ends in `/v1`).
    pub base: String,
    requests: Arc<Mutex<Vec<Seen>>>,
    /// Signalled when a client went away while a stream was being sent.
    pub client_gone: Arc<Notify>,
}

impl Upstream {
    /// Plays `script` in order, repeating its last act.
    pub async fn start(script: Vec<Act>) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let client_gone = Arc::new(Notify::new());
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let shared = (script, requests.clone(), client_gone.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Without it Nagle holds each frame after the first until the client's
                // delayed ACK (~40 ms an answer).
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(req, shared).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Upstream { base, requests, client_gone }
    }

    /// The JSON bodies received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.seen().into_iter().map(|s| s.body).collect()
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests arrived.
    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

type Shared = (Arc<Mutex<VecDeque<Act>>>, Arc<Mutex<Vec<Seen>>>, Arc<Notify>);

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    shared: Shared,
) -> hyper::Response<Body> {
    let (script, requests, gone) = shared;
    let path = req.uri().path().to_string();
    let auth =
        req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let echoed = format!(
        "Incorrect API key provided: {}. The model `{}` does not exist.",
        auth.strip_prefix("Bearer ").unwrap_or(&auth),
        body["model"].as_str().unwrap_or_default()
    );
    requests.lock().unwrap().push(Seen { path, auth, body });
    let act = {
        let mut s = script.lock().unwrap();
        if s.len() > 1 {
            s.pop_front().unwrap()
        } else {
            s[0].clone()
        }
    };
    let mut builder = hyper::Response::builder();
    let body = match act {
        Act::StallBeforeHead => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!()
        }
        Act::Status(status, retry_after) => {
            builder = builder.status(status).header("content-type", "application/json");
            if let Some(s) = retry_after {
                builder = builder.header("retry-after", s.to_string());
            }
            let text = r#"{"error": {"message": "key sk-secretsecretsecretsecret rejected", "type": "x"}}"#;
            Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
        }
        Act::Echo(status) => {
            builder = builder.status(status).header("content-type", "application/json");
            let error = json!({"error": {"message": echoed, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
            Full::new(Bytes::from(error.to_string())).map_err(|never| match never {}).boxed()
        }
        other => {
            builder = builder.header("content-type", "text/event-stream");
            stream_body(other, gone)
        }
    };
    builder.body(body).unwrap()
}

fn chunk(delta: &str) -> String {
    let c = json!({"id": "chatcmpl-x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}]});
    format!("data: {c}\n\n")
}

fn stream_body(act: Act, gone: Arc<Notify>) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        let send = |s: String| tx.send(Ok(Frame::data(Bytes::from(s))));
        match act {
            Act::Stream { deltas, gap, finish } => {
                for d in deltas {
                    if send(chunk(d)).await.is_err() {
                        gone.notify_one();
                        return;
                    }
                    // Even a zero sleep waits for the timer's next tick.
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
                let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]});
                let usage = json!({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}});
                let _ = send(format!("data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n")).await;
            }
            Act::StallAfterFirst => {
                let _ = send(chunk("first")).await;
                tx.closed().await;
                gone.notify_one();
            }
            Act::DropAfterFirst => {
                let _ = send(chunk("first")).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            }
            Act::Malformed => {
                let _ = send("data: {not json\n\n".into()).await;
            }
            Act::Chunks(chunks) => {
                for c in chunks {
                    let _ = send(format!("data: {c}\n\n")).await;
                }
                let _ = send("data: [DONE]\n\n".into()).await;
            }
            Act::StallBeforeHead | Act::Status(..) | Act::Echo(_) => {
                unreachable!("no stream for these")
            }
        }
    });
    BodyExt::boxed(StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}
