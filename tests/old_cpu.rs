//! The real binary on an x86-64 CPU without AVX2: QEMU's user-mode emulator posing as a
//! Westmere (SSE4.2, no AVX). It must start, answer `/health`, and load and run a model with
//! the portable kernels, saying so in its log, `/metrics` and `model list`. Code compiled for
//! a newer CPU (a global `target-cpu`) dies of SIGILL here before `main` prints anything.
#![cfg(target_arch = "x86_64")]

mod common;
mod common_local;

use common::{client, data_dir, emulated, Binary};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};

const QEMU: &str = "qemu-x86_64-static";
/// Intel's 2010 core: SSE4.2 and POPCNT, no AVX, AVX2 or FMA.
const OLD_CPU: [&str; 3] = [QEMU, "-cpu", "Westmere"];

/// Fails with the package to install when QEMU is missing.
fn require_qemu() {
    let found = Command::new(QEMU).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{QEMU} is missing: sudo apt-get install qemu-user-static (./scripts/test.sh installs it)"
    );
}

/// Runs `edgechat ARGS` on the old CPU and insists it succeeds, naming a fatal signal.
fn run_old(dir: &std::path::Path, args: &[&str]) -> Output {
    let out = emulated(&OLD_CPU, dir).args(args).stdin(Stdio::null()).output().unwrap();
    let signal = out.status.signal().map(|s| match s {
        libc::SIGILL => "SIGILL: code built for a newer CPU ran".to_string(),
        s => format!("signal {s}"),
    });
    assert!(
        out.status.success(),
        "`edgechat {}` failed on a CPU without AVX2 ({}): {}",
        args.join(" "),
        signal.unwrap_or_else(|| format!("{}", out.status)),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn commands_run_and_the_portable_kernels_answer() {
    require_qemu();
    let (_keep, dir) = data_dir();
    let out = run_old(&dir, &["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("edgechat "));

    let models = dir.join("models");
    std::fs::create_dir(&models).unwrap();
    let model = models.join("tiny.gguf");
    common_local::write_tiny_model(&model, &common_local::Tiny::default());
    let out = run_old(&dir, &["model", "list", "--dir", models.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tiny.gguf") && text.contains("kernels: portable"), "{text}");

    let chat = ["chat", "-p", "Hi", "--max-tokens", "4", "--threads", "1", "--model"];
    run_old(&dir, &[&chat[..], &[model.to_str().unwrap()]].concat());
}

#[tokio::test]
async fn the_server_starts_and_says_which_kernels_it_runs() {
    require_qemu();
    let (_keep, dir) = data_dir();
    // A binary that cannot run on this CPU at all fails here, with the signal named.
    run_old(&dir, &["--version"]);
    let model = dir.join("tiny.gguf");
    common_local::write_tiny_model(&model, &common_local::Tiny::default());
    let log = dir.join("stderr.log");
    let mut cmd = emulated(&OLD_CPU, &dir);
    cmd.env("EDGECHAT_LOCAL__MODEL", &model).env("EDGECHAT_LOCAL__THREADS", "1");
    let stderr = std::fs::File::create(&log).unwrap().into();
    let server = Binary::start(cmd, &dir, &["--log-json"], stderr);

    let c = client();
    let health = c.get(format!("{}/health", server.base)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = c.get(format!("{}/metrics", server.base)).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("edgechat_local_kernels_info{isa=\"portable\"} 1"), "{metrics}");
    assert_eq!(server.signal(libc::SIGTERM).code(), Some(0));

    let text = std::fs::read_to_string(&log).unwrap();
    let loaded = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "local model loaded")
        .unwrap_or_else(|| panic!("no \"local model loaded\" line in the log:\n{text}"));
    assert_eq!(loaded["kernels"], "portable", "{loaded}");
}
