//! The systemd integration through the real binary and the real unit file: the notify protocol
//! played by a datagram socket the test binds, and `systemd-analyze` on `systemd/edgechat.service`.

mod common;
mod common_local;

use common::{command, Binary, JWT_SECRET};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Receives datagrams until one contains `wanted`, bounded by `within`; returns all seen.
fn wait_for(socket: &UnixDatagram, wanted: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|m: &String| m.lines().any(|l| l == wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {wanted} within {within:?}; got {seen:?}");
        socket.set_read_timeout(Some(left)).unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => panic!("no {wanted} within {within:?} ({e}); got {seen:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_once_serving_with_the_model_loaded_then_watchdog_then_stopping() {
    let model = common_local::default_model();
    let (_guard, dir) = common::data_dir();
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = command(&dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env("EDGECHAT_AUTH__JWT_SECRET", JWT_SECRET)
        .env("EDGECHAT_LOCAL__MODEL", &model)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;

    let socket = std::sync::Arc::new(socket);
    let ready = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || wait_for(&socket, "READY=1", Duration::from_secs(60)))
    };
    let ready = ready.await.unwrap();
    // The STATUS= line that comes with READY=1 names the address the server bound.
    let status = ready.last().unwrap();
    let Some((_, base)) = status.split_once("STATUS=serving on ") else {
        panic!("no serving address in {ready:?}")
    };
    let base = base.split_whitespace().next().unwrap().to_string();
    // At READY=1 the server answers at once, and the local model is already up.
    let client = common::client();
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let readiness: serde_json::Value =
        client.get(format!("{base}/ready")).send().await.unwrap().json().await.unwrap();
    assert_eq!(readiness["status"], "ready", "{readiness}");
    let local =
        readiness["providers"].as_array().unwrap().iter().find(|p| p["provider"] == "local");
    assert_eq!(local.map(|p| p["state"].as_str()), Some(Some("up")), "{readiness}");
    assert!(base.starts_with("http://127.0.0.1:"), "{ready:?}");

    // The watchdog keeps being fed (every 200 ms for WATCHDOG_USEC = 400 ms).
    let pings = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            (0..3)
                .map(|_| wait_for(&socket, "WATCHDOG=1", Duration::from_secs(5)).len())
                .sum::<usize>()
        })
    };
    assert!(pings.await.unwrap() >= 3);

    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(&socket, "STOPPING=1", Duration::from_secs(10))
        })
    };
    stopping.await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn serving_works_without_a_notify_socket() {
    let (_guard, dir) = common::data_dir();
    let server = Binary::spawn(&dir, &[], &[]);
    assert!(server.base.starts_with("http://127.0.0.1:"));
    assert!(server.signal(libc::SIGTERM).success());
}

/// The unit as installed, with ExecStart pointing at the binary under test (verify checks it
/// exists and is executable).
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/edgechat.service"))
            .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/edgechat "),
        "ExecStart moved: update this test"
    );
    let unit = unit.replace("/usr/local/bin/edgechat", common::exe());
    let path = dir.join("edgechat.service");
    std::fs::write(&path, unit).unwrap();
    path
}

fn systemd_analyze(args: &[&str], unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect("systemd-analyze is missing: apt-get install systemd (./scripts/test.sh does)");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn unit_file_verifies_and_scores_ok_on_exposure() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let (ok, text) = systemd_analyze(&["verify"], &unit);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify:\n{text}");

    let (ok, text) = systemd_analyze(&["security", "--offline=yes", "--threshold=20"], &unit);
    let overall = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for").nth(1).map(str::to_owned))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    println!("systemd-analyze security: {}", overall.trim());
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {overall:?}"));
    assert!(ok && score <= 2.0, "exposure {score} > 2.0:\n{text}");
}
