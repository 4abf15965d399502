//! Who may hold a connection and for how long: keep-alive idle is its own timeout (not the
//! header timeout), idle HTTP/2 connections get GOAWAY, one address cannot take every slot,
//! a nearly full server closes its longest-idle connections first, hyper's own answers to
//! unparsable requests carry a JSON error body, and SIGHUP reloads the TLS certificate
//! without dropping a connection.

mod common;

use bytes::Bytes;
use common::TestServer;
use edgechat::api::{self, handler, Doc};
use http::Method;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: edgechat\r\n\r\n";

/// Reads one HTTP/1 response with a `content-length` body; `None` if the peer closed first.
async fn read_response(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(text);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("no response within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits (at most `limit`) for the server to close `tcp`; returns how long that took.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = [0u8; 1024];
    let closed = async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, closed).await.ok().map(|()| started.elapsed())
}

async fn connect_from(source: &str, target: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(target).await.unwrap()
}

async fn served(tcp: &mut TcpStream) -> bool {
    tcp.write_all(HEALTH).await.is_ok()
        && read_response(tcp).await.is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// `edgechat_http_connections_ended_total{reason}` from `/metrics` (process-wide), asked from
/// an address of its own (127.0.0.1 may be at its cap).
async fn ended(s: &TestServer, reason: &str) -> f64 {
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.9".parse::<std::net::IpAddr>().unwrap())
        // Holds no connection afterwards: a test counting the server's slots must not see it.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = client.get(s.url("/metrics")).send().await.unwrap();
    let text = r.text().await.unwrap();
    let series = format!("edgechat_http_connections_ended_total{{reason=\"{reason}\"}} ");
    let line = text.lines().find_map(|l| l.strip_prefix(series.as_str()));
    line.unwrap_or_else(|| panic!("no {series} in {text}")).trim().parse().unwrap()
}

#[tokio::test]
async fn keep_alive_outlives_the_header_timeout_and_ends_at_the_idle_timeout() {
    let s = TestServer::start(|c| {
        c.server.header_read_timeout_secs = 1;
        c.server.idle_timeout_secs = 3;
    })
    .await;
    let mut tcp = TcpStream::connect(s.running().addr).await.unwrap();
    assert!(served(&mut tcp).await);
    // Idle for longer than the header timeout: the connection is still there to reuse.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(served(&mut tcp).await, "a keep-alive connection was closed by the header timeout");
    let took = closed_within(&mut tcp, Duration::from_secs(15)).await;
    let took = took.expect("an idle keep-alive connection was never closed");
    assert!(took >= Duration::from_millis(2500), "closed after {took:?}, before the idle timeout");
    s.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_but_an_open_stream_keeps_it() {
    let mut routes = api::routes();
    routes.add(
        Method::GET,
        "/test/slow",
        handler(|_, _| async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            Ok(edgechat::http::json(http::StatusCode::OK, &json!({"done": true})))
        }),
        Doc::new("test", "Answers after 2.5 s"),
    );
    let s = TestServer::start_routes(|c| c.server.idle_timeout_secs = 1, routes).await;
    let tcp = TcpStream::connect(s.running().addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::get(format!("{}/test/slow", s.base)).body(Empty::new()).unwrap();
    let r = sender.send_request(request).await.expect("a stream longer than the idle timeout");
    assert_eq!(r.status(), http::StatusCode::OK);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"done": true}));
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "an idle HTTP/2 connection was kept past the idle timeout");
    s.stop().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_slot() {
    let s = TestServer::start(|c| {
        c.server.max_connections_per_address = 3;
        // Refused connections are held this long before they are closed.
        c.server.handshake_timeout_secs = 1;
    })
    .await;
    let addr = s.running().addr;
    let refused_before = ended(&s, "refused").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = connect_from("127.0.0.1", addr).await;
        assert!(served(&mut tcp).await);
        held.push(tcp);
    }
    let mut fourth = connect_from("127.0.0.1", addr).await;
    fourth.write_all(HEALTH).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), fourth.read_to_end(&mut answer));
    assert!(read.await.is_ok(), "a fourth connection from one address was kept");
    assert!(answer.is_empty(), "a fourth connection was served");
    let mut other = connect_from("127.0.0.2", addr).await;
    assert!(served(&mut other).await, "another address was refused");
    for tcp in &mut held {
        assert!(served(tcp).await, "the connections within the cap were disturbed");
    }
    // A freed slot is available again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        let mut tcp = connect_from("127.0.0.1", addr).await;
        if served(&mut tcp).await {
            again = Some(tcp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the slot freed by a closed connection was never reused");
    // Counters are process-wide: other tests' refusals may add to it, never take away.
    assert!(ended(&s, "refused").await > refused_before, "the refusal was not counted");
    s.stop().await;
}

#[tokio::test]
async fn a_nearly_full_server_closes_its_longest_idle_connection_first() {
    // 10 slots: the 10th connection passes the 90 % mark.
    let s = TestServer::start(|c| c.server.max_connections = 10).await;
    let addr = s.running().addr;
    let evicted_before = ended(&s, "evicted").await;
    let mut conns = Vec::new();
    for _ in 0..9 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert!(served(&mut tcp).await);
        conns.push(tcp);
        // Distinct idle times, so "longest idle" is one connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The oldest one makes a new request: now the second is the longest idle.
    assert!(served(&mut conns[0]).await);
    let mut tenth = TcpStream::connect(addr).await.unwrap();
    assert!(served(&mut tenth).await, "the new client was not served");
    let evicted = closed_within(&mut conns[1], Duration::from_secs(10)).await;
    assert!(evicted.is_some(), "the longest-idle connection was not closed");
    for (i, tcp) in conns.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert!(served(tcp).await, "connection {i} was closed, not only the longest idle");
    }
    drop((conns, tenth));
    assert!(ended(&s, "evicted").await > evicted_before, "the eviction was not counted");
    s.stop().await;
}

#[tokio::test]
async fn unparsable_requests_get_the_usual_error_body() {
    let s = TestServer::start(|_| {}).await;
    let cases: [(&[u8], &str); 2] = [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x7fb\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX\x00: y\r\n\r\n", "HTTP/1.1 400"),
    ];
    for (request, status) in cases {
        let mut tcp = TcpStream::connect(s.running().addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let response = read_response(&mut tcp).await.expect("an answer");
        assert!(response.starts_with(status), "{response}");
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert!(body["detail"].as_str().unwrap().contains("header"), "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // A response of ours that happens to be an empty-bodied 4xx is left alone.
    let mut tcp = TcpStream::connect(s.running().addr).await.unwrap();
    tcp.write_all(b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let response = read_response(&mut tcp).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405") && !response.contains("malformed"));
    s.stop().await;
}

/// A self-signed certificate for loopback: (cert PEM, key PEM, leaf DER).
fn certificate() -> (String, String, Vec<u8>) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    (made.cert.pem(), made.key_pair.serialize_pem(), made.cert.der().to_vec())
}

async fn peer_certificate(client: &reqwest::Client, base: &str) -> Vec<u8> {
    let r = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let info = r.extensions().get::<reqwest::tls::TlsInfo>().expect("TLS info");
    info.peer_certificate().unwrap().to_vec()
}

fn tls_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .unwrap()
}

/// Polls the log (bounded) until `needle` has appeared `times` times.
fn await_log(log: &std::path::Path, needle: &str, times: usize) -> String {
    for _ in 0..500 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= times {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the log never said {needle:?} {times} time(s)");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let (_dir, path) = common::data_dir();
    let (cert, key) = (path.join("cert.pem"), path.join("key.pem"));
    let (a_pem, a_key, a_der) = certificate();
    std::fs::write(&cert, &a_pem).unwrap();
    std::fs::write(&key, &a_key).unwrap();
    let log = path.join("server.log");
    let env = [
        ("EDGECHAT_TLS__CERT_FILE", cert.to_str().unwrap()),
        ("EDGECHAT_TLS__KEY_FILE", key.to_str().unwrap()),
    ];
    let mut server = common::Binary::spawn_logged(&path, &[], &env, &log);
    let base = server.base.clone();
    assert!(base.starts_with("https://"), "{base}");
    let old = tls_client();
    assert_eq!(peer_certificate(&old, &base).await, a_der);

    let (b_pem, b_key, b_der) = certificate();
    std::fs::write(&cert, &b_pem).unwrap();
    std::fs::write(&key, &b_key).unwrap();
    let pid = server.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGHUP) };
    await_log(&log, "TLS certificate and key reloaded", 1);
    assert!(server.child.try_wait().unwrap().is_none(), "SIGHUP ended the server");
    assert_eq!(peer_certificate(&tls_client(), &base).await, b_der, "new handshakes: new cert");
    // The connection opened before the reload is still the same one, with its certificate.
    assert_eq!(peer_certificate(&old, &base).await, a_der, "an open connection was dropped");

    // A broken file is refused and the certificate in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    unsafe { libc::kill(pid, libc::SIGHUP) };
    await_log(&log, "TLS certificate NOT reloaded", 1);
    assert_eq!(peer_certificate(&tls_client(), &base).await, b_der);

    // Signals whose default would end the process are caught; SIGTERM still drains and exits 0.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    await_log(&log, "SIGUSR1 received and ignored", 1);
    assert!(server.child.try_wait().unwrap().is_none(), "SIGUSR1 ended the server");
    assert_eq!(peer_certificate(&tls_client(), &base).await, b_der);
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
