//! The connection-flood goal of issue 12: the release binary with its default limits, 2,000
//! idle HTTP/2 connections and 2,000 reconnecting silent HTTP/1 sockets from 127.0.0.1, and a
//! prober on 127.0.0.2 opening a new connection to `GET /health` every 100 ms. Goal: no failed
//! probe, p99 < 50 ms. All on loopback, bounded: `FLOOD_SECS` of probing (default 30) after a
//! 5 s ramp; `FLOOD_CONNS` attackers of each kind (default 2,000); `FLOOD_IDLE_SECS` sets the
//! server's idle timeout (default: the server's own, 60 s). `FLOOD_BINARY` runs another
//! edgechat binary instead (an older build, to compare).

#[path = "../tests/common/flood.rs"]
mod flood;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let limit = flood::raise_fd_limit();
    let conns = env_or("FLOOD_CONNS", 2000) as usize;
    assert!(limit as usize > 2 * conns + 1024, "open-file hard limit {limit} is too low");
    let dir = tempfile::tempdir().unwrap();
    let binary = std::env::var("FLOOD_BINARY");
    let mut cmd = Command::new(binary.as_deref().unwrap_or(env!("CARGO_BIN_EXE_edgechat")));
    // In the temp dir, so that no ./config.toml is read (an older build would refuse newer keys).
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .env("EDGECHAT_AUTH__JWT_SECRET", "flood-secret-flood-secret-flood-secret-01")
        .env("EDGECHAT_LOCAL__ENABLED", "false")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Ok(idle) = std::env::var("FLOOD_IDLE_SECS") {
        cmd.env("EDGECHAT_SERVER__IDLE_TIMEOUT_SECS", idle);
    }
    let mut child = cmd.spawn().unwrap();
    let target: SocketAddr = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.split("listening on http://").nth(1).map(|a| a.trim().parse().unwrap()))
        .expect("no listening line");
    let spec = flood::Spec {
        h2_idle: conns,
        h1_silent: conns,
        ramp: Duration::from_secs(5),
        probe_every: Duration::from_millis(100),
        probe_for: Duration::from_secs(env_or("FLOOD_SECS", 30)),
        probe_timeout: Duration::from_secs(5),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(flood::run(target, spec));
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "flood: {conns} idle h2 + {conns} silent h1 from 127.0.0.1; probes from 127.0.0.2: {} sent, \
         {} failed; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; attacker connections cut \
         {} times, {} alive at the end",
        report.probes,
        report.failures.len(),
        ms(report.percentile(50.0)),
        ms(report.percentile(99.0)),
        ms(report.latencies.last().copied().unwrap_or_default()),
        report.attackers_cut,
        report.attackers_alive,
    );
    for f in report.failures.iter().take(5) {
        println!("  failed probe: {f}");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
