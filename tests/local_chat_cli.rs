//! `edgechat chat` as a person uses it, through the real binary and the default model: one
//! answer with `-p`, and a conversation on stdin where `/reset` clears it and SIGINT (Ctrl-C)
//! stops the current answer but not the program.

mod common_local;

use common_local::default_model;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn chat(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edgechat"));
    // Greedy, so that the answers these tests look for are the same every run.
    c.arg("chat").arg("--model").arg(default_model()).arg("--temperature").arg("0");
    c.args(args).env("NO_COLOR", "1");
    c
}

/// Reads a pipe on its own thread, in whatever pieces arrive.
fn pump(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects from `rx` until `done` holds for what has come (or 120 s pass).
fn until(rx: &mpsc::Receiver<String>, seen: &mut String, done: impl Fn(&str) -> bool) {
    while !done(seen) {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(piece) => seen.push_str(&piece),
            Err(_) => panic!("gave up waiting; got so far: {seen:?}"),
        }
    }
}

#[test]
fn one_prompt_answers_on_stdout() {
    let out =
        chat(&["-p", "What is the capital of Germany?", "--max-tokens", "24"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Berlin"), "{text}");
}

#[test]
fn a_conversation_resets_and_survives_ctrl_c() {
    let mut child = chat(&["--max-tokens", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (pump(child.stdout.take().unwrap()), pump(child.stderr.take().unwrap()));
    let mut stdin = child.stdin.take().unwrap();
    let (mut said, mut notes) = (String::new(), String::new());

    writeln!(stdin, "What is the capital of Germany?").unwrap();
    until(&out, &mut said, |s| s.ends_with('\n'));
    assert!(said.contains("Berlin"), "{said}");

    writeln!(stdin, "/reset").unwrap();
    until(&err, &mut notes, |s| s.contains("(conversation cleared)"));

    // A long answer: interrupt it as soon as it starts streaming.
    said.clear();
    writeln!(stdin, "Write a very long story about a dragon who learns to paint.").unwrap();
    until(&out, &mut said, |s| s.chars().count() > 5);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    until(&err, &mut notes, |s| s.contains("[stopped]"));
    // Back at the prompt, not gone.
    until(&err, &mut notes, |s| {
        s.split("[stopped]").nth(1).is_some_and(|after| after.contains("> "))
    });

    // Still alive, and still answering the same way from a clean conversation.
    writeln!(stdin, "/reset").unwrap();
    until(&err, &mut notes, |s| s.matches("(conversation cleared)").count() == 2);
    said.clear();
    writeln!(stdin, "What is the capital of Germany?").unwrap();
    until(&out, &mut said, |s| s.contains("Berlin"));
    writeln!(stdin, "/quit").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}; stderr: {notes}");
}
