//! The connection flood of issue 12, item 1, shared by `tests/flood.rs` (in CI) and
//! `benches/flood.rs` (the measured goal): from 127.0.0.1, idle HTTP/2 (h2c) connections that
//! open no stream but answer every PING, and silent HTTP/1 sockets (half send nothing, half a
//! partial request head), each reconnecting as soon as it is cut; meanwhile a prober on a
//! second loopback address, 127.0.0.2, opens a new connection to `GET /health` every 100 ms.
//! Everything is bounded: the attackers stop when the probing ends, every probe has a deadline.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

/// The size and length of one flood.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub h2_idle: usize,
    pub h1_silent: usize,
    /// Attackers get this long to open their connections before probing starts.
    pub ramp: Duration,
    pub probe_every: Duration,
    pub probe_for: Duration,
    pub probe_timeout: Duration,
}

/// What the prober saw, and what the attackers held.
#[derive(Debug)]
pub struct Report {
    pub probes: usize,
    pub failures: Vec<String>,
    /// Sorted latencies of the successful probes.
    pub latencies: Vec<Duration>,
    /// Attacker connections alive (HTTP/2 handshaken, or HTTP/1 not yet cut) when probing ended.
    pub attackers_alive: usize,
    /// Times an attacker connection was cut (refused at the cap, timed out, closed idle).
    pub attackers_cut: usize,
}

impl Report {
    /// The latency below which `p` percent of the successful probes answered.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p / 100.0).ceil() as usize).saturating_sub(1);
        self.latencies[i.min(self.latencies.len() - 1)]
    }
}

/// Raises this process's open-file limit to the hard limit (the attackers hold thousands).
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    l.rlim_cur
}

#[derive(Default)]
struct Counters {
    alive: AtomicUsize,
    cut: AtomicUsize,
}

/// Runs one flood against `target` (a loopback address of the server) and reports.
pub async fn run(target: SocketAddr, spec: Spec) -> Report {
    let (stop_tx, stop) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let mut attackers = Vec::new();
    for i in 0..spec.h2_idle {
        attackers.push(tokio::spawn(h2_idle(target, stop.clone(), counters.clone(), i)));
    }
    for i in 0..spec.h1_silent {
        let partial = i % 2 == 1;
        attackers.push(tokio::spawn(h1_silent(target, partial, stop.clone(), counters.clone())));
    }
    tokio::time::sleep(spec.ramp).await;
    let (probes, failures, latencies) = probe(target, spec).await;
    let attackers_alive = counters.alive.load(Ordering::Relaxed);
    let attackers_cut = counters.cut.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for a in attackers {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    Report { probes, failures, latencies, attackers_alive, attackers_cut }
}

/// Opens HTTP/2 connections that never open a stream (hyper's client answers PINGs), and
/// reconnects whenever the server ends one.
async fn h2_idle(target: SocketAddr, mut stop: watch::Receiver<bool>, c: Arc<Counters>, i: usize) {
    // Spread the first connects so that the listen backlog is not the first thing measured.
    tokio::time::sleep(Duration::from_micros(500 * (i % 1000) as u64)).await;
    while !*stop.borrow() {
        let Ok(tcp) = TcpStream::connect(target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let handshake = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        );
        let Ok((sender, conn)) = handshake.await else {
            c.cut.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        c.alive.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = conn => {}
            _ = stop.changed() => {}
        }
        drop(sender);
        c.alive.fetch_sub(1, Ordering::Relaxed);
        c.cut.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens HTTP/1 sockets that send nothing (or a request head's first line) and then wait,
/// reconnecting whenever the server cuts one.
async fn h1_silent(
    target: SocketAddr,
    partial: bool,
    mut stop: watch::Receiver<bool>,
    c: Arc<Counters>,
) {
    while !*stop.borrow() {
        let Ok(mut tcp) = TcpStream::connect(target).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if partial && tcp.write_all(b"GET /health HTTP/1.1\r\n").await.is_err() {
            continue;
        }
        c.alive.fetch_add(1, Ordering::Relaxed);
        let mut sink = [0u8; 256];
        tokio::select! {
            _ = async { while tcp.read(&mut sink).await.is_ok_and(|n| n > 0) {} } => {}
            _ = stop.changed() => {}
        }
        c.alive.fetch_sub(1, Ordering::Relaxed);
        c.cut.fetch_add(1, Ordering::Relaxed);
    }
}

/// Probes `GET /health` from 127.0.0.2 on a fresh connection every `probe_every`.
async fn probe(target: SocketAddr, spec: Spec) -> (usize, Vec<String>, Vec<Duration>) {
    let mut every = tokio::time::interval(spec.probe_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + spec.probe_for;
    let mut running = Vec::new();
    while Instant::now() < end {
        every.tick().await;
        running.push(tokio::spawn(tokio::time::timeout(spec.probe_timeout, health(target))));
    }
    let (mut failures, mut latencies) = (Vec::new(), Vec::new());
    let probes = running.len();
    for p in running {
        match p.await.expect("probe task") {
            Ok(Ok(took)) => latencies.push(took),
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push(format!("no answer within {:?}", spec.probe_timeout)),
        }
    }
    latencies.sort();
    (probes, failures, latencies)
}

async fn health(target: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind("127.0.0.2:0".parse().unwrap()).map_err(|e| format!("bind 127.0.0.2: {e}"))?;
    let mut tcp = socket.connect(target).await.map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: edgechat\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.map_err(|e| format!("read: {e}"))?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        let head = String::from_utf8_lossy(&answer[..answer.len().min(60)]).into_owned();
        return Err(format!("answered {head:?}"));
    }
    Ok(started.elapsed())
}
