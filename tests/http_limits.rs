//! The limits and the frame every route keeps: body caps, bad bodies, unknown routes and
//! methods, stalled clients, handler panics, CORS, request ids, and HTTP/2 without TLS.

mod common;

use common::TestServer;
use edgechat::api::{self, handler, Doc};
use http::Method;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `limit` passes) and returns what came.
async fn read_all(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    out
}

async fn healthy(s: &TestServer) {
    assert_eq!(s.get("/health", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn bodies_over_the_cap_are_413_without_being_read() {
    let s = TestServer::start(|c| c.server.max_body_bytes = 1024).await;
    let addr = s.running().addr;

    // Declared too large: refused from the headers alone, before a body byte is sent.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = "POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let reply =
        String::from_utf8_lossy(&read_all(&mut stream, Duration::from_secs(10)).await).to_string();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("larger than 1024 bytes"), "{reply}");

    // Chunked, no length: reading stops at the cap.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = "POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
    stream.write_all(chunk.as_bytes()).await.unwrap();
    let reply =
        String::from_utf8_lossy(&read_all(&mut stream, Duration::from_secs(10)).await).to_string();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    // Through a normal client as well, and the server is still serving.
    let big = json!({"username": "x".repeat(2000), "email": "a@b.co", "password": "longenough"});
    let r = s.post("/auth/register", &big, None).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    healthy(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn malformed_json_wrong_types_and_wrong_content_type() {
    let s = TestServer::start(|_| {}).await;
    let post_raw = |body: &'static str, content_type: &'static str| {
        s.client
            .post(s.url("/auth/register"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = post_raw("{\"username\": ", "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["detail"][0]["type"], "json_invalid");
    assert_eq!(b["detail"][0]["loc"][0], "body");

    for body in ["[1, 2]", "\"text\"", "42", ""] {
        let r = post_raw(body, "application/json").await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body:?}");
    }
    let r = post_raw(
        r#"{"username": 5, "email": "a@b.co", "password": "longenough"}"#,
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["detail"][0]["loc"], json!(["body", "username"]));

    let r = post_raw("username=a", "text/plain").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let b: Value = r.json().await.unwrap();
    assert!(b["detail"].as_str().unwrap().contains("application/json"));
    let r = post_raw(
        r#"{"username":"okname","email":"a@b.co","password":"longenough"}"#,
        "application/json; charset=utf-8",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "parameters on the media type are fine");
    healthy(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn unknown_route_404_and_wrong_method_405_with_allow() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get("/nope", None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"detail": "Not Found"}));
    let r = s.get("/v1/nope", None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        b["error"]["type"], "invalid_request_error",
        "the OpenAI face answers in its own shape"
    );

    let r = s.client.delete(s.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "GET");
    let r = s.client.put(s.url("/auth/api-keys")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "POST, GET");
    s.stop().await;
}

#[tokio::test]
async fn a_client_stalling_in_its_headers_is_cut_off_while_others_are_served() {
    let s = TestServer::start(|c| c.server.header_read_timeout_secs = 1).await;
    let mut stalled = TcpStream::connect(s.running().addr).await.unwrap();
    stalled.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Half: ").await.unwrap();
    let started = std::time::Instant::now();
    let closer = tokio::spawn(async move {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), stalled.read_to_end(&mut buf)).await;
        (r.is_ok(), buf)
    });
    // The stalled client blocks no one.
    for _ in 0..5 {
        healthy(&s).await;
    }
    let (closed, buf) = closer.await.unwrap();
    assert!(closed, "the server never closed the stalled connection");
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the timeout");

    // A connection that never sends a byte is closed after the handshake timeout.
    s.stop().await;
    let s = TestServer::start(|c| c.server.handshake_timeout_secs = 1).await;
    let mut silent = TcpStream::connect(s.running().addr).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), silent.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "silent connection was never closed");
    healthy(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_serving() {
    let mut routes = api::routes();
    routes.add(
        Method::GET,
        "/test/panic",
        handler(|_, _| async { panic!("boom for the test") }),
        Doc::new("test", "Always panics"),
    );
    let s = TestServer::start_routes(|_| {}, routes).await;
    for _ in 0..3 {
        let r = s.get("/test/panic", None).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b, json!({"detail": "Internal Server Error"}), "no panic text leaks");
    }
    healthy(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn cors_preflight_and_headers_for_allowed_origins_only() {
    let s = TestServer::start(|c| c.cors.allowed_origins = vec!["https://chat.example.com".into()])
        .await;
    let preflight = |origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/auth/login"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let r = preflight("https://chat.example.com").await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://chat.example.com");
    assert!(h["access-control-allow-methods"].to_str().unwrap().contains("POST"));
    assert!(h["access-control-allow-headers"].to_str().unwrap().contains("content-type"));
    assert_eq!(h["access-control-max-age"], "600");
    assert!(!h.contains_key("access-control-allow-credentials"));

    let r = preflight("https://evil.example.com").await.unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let r = s.get_with("/health", "origin", "https://chat.example.com").await;
    assert_eq!(r.headers()["access-control-allow-origin"], "https://chat.example.com");
    assert_eq!(r.headers()["vary"], "origin");
    let r = s.get_with("/health", "origin", "https://evil.example.com").await;
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    s.stop().await;

    let s = TestServer::start(|_| {}).await;
    let r = s.get_with("/health", "origin", "https://chat.example.com").await;
    assert!(
        !r.headers().contains_key("access-control-allow-origin"),
        "no origin is allowed by default"
    );
    s.stop().await;
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane_and_made_otherwise() {
    let s = TestServer::start(|_| {}).await;
    let r = s.get_with("/health", "x-request-id", "abc-123.x").await;
    assert_eq!(r.headers()["x-request-id"], "abc-123.x");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let r = s.get_with("/health", "x-request-id", "bad id with spaces").await;
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert!(id != "bad id with spaces" && id.len() == 32, "{id}");
    let r = s.get("/nope", None).await;
    assert!(r.headers().contains_key("x-request-id"), "errors carry an id too");
    s.stop().await;
}

#[tokio::test]
async fn http2_with_prior_knowledge_and_http1_on_one_port() {
    let s = TestServer::start(|_| {}).await;
    let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let r = h2.get(s.url("/health")).send().await.unwrap();
    assert_eq!((r.version(), r.status()), (reqwest::Version::HTTP_2, StatusCode::OK));
    // Many concurrent streams on the one connection.
    let all =
        futures_util::future::join_all((0..20).map(|_| h2.get(s.url("/health")).send())).await;
    assert!(all.into_iter().all(|r| r.unwrap().status() == StatusCode::OK));
    let r = s.get("/health", None).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    s.stop().await;
}

#[tokio::test]
async fn ready_reports_storage_and_whether_anything_can_answer() {
    // No local model (turned on, but its file is not there) and no provider keys: nothing
    // can answer.
    let s = TestServer::start(|c| {
        c.local.enabled = true;
        c.local.model = "models/not-fetched-yet.gguf".into();
    })
    .await;
    let r = s.get("/ready", None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let b: Value = r.json().await.unwrap();
    assert_eq!((b["status"].as_str(), b["storage"].as_str()), (Some("not_ready"), Some("ok")));
    assert!(b["reasons"][0].as_str().unwrap().contains("no provider can answer"), "{b}");
    assert!(b["providers"]
        .as_array()
        .unwrap()
        .contains(&json!({"provider": "local", "state": "not_loaded"})));
    s.stop().await;

    let s = TestServer::start(|c| {
        c.providers.openai.api_key = Some(edgechat::secret::Secret::new("sk-test"));
    })
    .await;
    let r = s.get("/ready", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b: Value = r.json().await.unwrap();
    assert_eq!((b["status"].as_str(), b["reasons"].clone()), (Some("ready"), json!([])));
    assert!(b["providers"]
        .as_array()
        .unwrap()
        .contains(&json!({"provider": "openai", "state": "up"})));
    s.stop().await;
}

#[tokio::test]
async fn a_body_that_stalls_is_408() {
    let s = TestServer::start(|c| c.server.body_read_timeout_secs = 1).await;
    let mut stream = TcpStream::connect(s.running().addr).await.unwrap();
    let head = "POST /auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user";
    stream.write_all(head.as_bytes()).await.unwrap();
    let reply =
        String::from_utf8_lossy(&read_all(&mut stream, Duration::from_secs(15)).await).to_string();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    healthy(&s).await;
    s.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_then_closes_the_store() {
    use std::sync::{Arc, Mutex};
    use tokio::sync::{oneshot, Notify};
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started = Arc::new(Mutex::new(Some(started_tx)));
    let release = Arc::new(Notify::new());
    let mut routes = api::routes();
    let (st, rel) = (started.clone(), release.clone());
    routes.add(
        Method::GET,
        "/test/slow",
        handler(move |_, _| {
            let (st, rel) = (st.clone(), rel.clone());
            async move {
                let _ = st.lock().unwrap().take().map(|tx| tx.send(()));
                rel.notified().await;
                Ok(edgechat::http::json(http::StatusCode::OK, &json!({"done": true})))
            }
        }),
        Doc::new("test", "Waits for the test to release it"),
    );
    let mut s = TestServer::start_routes(|_| {}, routes).await;
    let (addr, dir) = (s.running().addr, s.dir.path().to_path_buf());
    let in_flight = tokio::spawn(s.client.get(s.url("/test/slow")).send());
    started_rx.await.unwrap();

    let shutdown = tokio::spawn(s.running.take().unwrap().shutdown());
    // Wait (bounded) until the listener is gone: new connections are refused from then on.
    let mut refused = false;
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after shutdown began");
    assert!(!shutdown.is_finished(), "shutdown must wait for the in-flight request");

    release.notify_one();
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"done": true}));
    assert_eq!(shutdown.await.unwrap(), 0, "nothing was cut off");
    // The store was closed: another process could open it now.
    edgechat::store::Store::open(&dir).expect("store released after shutdown");
}

#[tokio::test]
async fn the_connection_cap_holds_new_clients_until_a_slot_frees() {
    let s = TestServer::start(|c| c.server.max_connections = 1).await;
    let addr = s.running().addr;
    // One kept-alive connection takes the only slot.
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let mut waiting = tokio::spawn(s.client.get(s.url("/health")).send());
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(early.is_err(), "a second connection was served while the cap was taken");
    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once the slot freed");
    assert_eq!(r.unwrap().unwrap().status(), StatusCode::OK);
    s.stop().await;
}
