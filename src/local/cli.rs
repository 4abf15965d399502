//! What `edgechat chat` and `edgechat model …` do; `crate::cli` only parses their arguments.

use super::{files, list_models, Engine, EngineOptions, Event, GenerateRequest, Message, Role};
use futures_util::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Settings for `edgechat chat`.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub model: PathBuf,
    /// One answer to this prompt on stdout, then exit.
    pub prompt: Option<String>,
    pub system: Option<String>,
    pub max_tokens: usize,
    /// `None`: the model's default ([`super::SamplingDefaults`], as the server uses).
    pub temperature: Option<f32>,
    pub seed: Option<u64>,
    pub threads: Option<usize>,
}

/// Runs `edgechat chat`: one answer for `-p`, otherwise a conversation on the terminal.
pub async fn chat(options: ChatOptions) -> Result<(), String> {
    let model = options.model.clone();
    let threads = options.threads;
    let engine = tokio::task::spawn_blocking(move || {
        Engine::load(&model, EngineOptions { threads, ..EngineOptions::default() })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| missing_hint(e.to_string(), &options.model))?;
    let mut history: Vec<Message> =
        options.system.iter().map(|s| Message::new(Role::System, s)).collect();
    // One listener for the whole session: a Ctrl-C between two polls is kept, not lost.
    let mut interrupts =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch for Ctrl-C: {e}"))?;
    if let Some(prompt) = &options.prompt {
        history.push(Message::new(Role::User, prompt));
        answer(&engine, &options, &history, &mut interrupts).await?;
        return Ok(());
    }
    converse(&engine, &options, history, &mut interrupts).await
}

async fn converse(
    engine: &Engine,
    options: &ChatOptions,
    start: Vec<Message>,
    interrupts: &mut Signal,
) -> Result<(), String> {
    let info = engine.info();
    eprintln!(
        "{} ({}, {}) — /reset clears the conversation, Ctrl-C stops an answer, Ctrl-D or /quit leaves",
        info.name, info.architecture, info.quantization
    );
    let mut lines = stdin_lines();
    let mut history = start.clone();
    loop {
        eprint!("> ");
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = interrupts.recv() => { eprintln!("\n(Ctrl-D or /quit leaves)"); continue; }
        };
        let Some(line) = line else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history = start.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            text => history.push(Message::new(Role::User, text)),
        }
        let reply = answer(engine, options, &history, interrupts).await?;
        history.push(Message::new(Role::Assistant, reply));
    }
    Ok(())
}

/// Streams one answer to stdout; Ctrl-C ends it early and keeps what was said.
async fn answer(
    engine: &Engine,
    options: &ChatOptions,
    history: &[Message],
    interrupts: &mut Signal,
) -> Result<String, String> {
    let base = engine.sampling();
    let request = GenerateRequest {
        temperature: options.temperature.unwrap_or(base.temperature),
        seed: options.seed,
        ..base.request(history.to_vec(), options.max_tokens)
    };
    let mut stream = engine.generate(request).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut out = std::io::stdout();
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = interrupts.recv() => { eprint!(" [stopped]"); break; }
        };
        match event {
            Some(Ok(Event::Delta(d))) => {
                text.push_str(&d);
                let _ = out.write_all(d.as_bytes()).and_then(|_| out.flush());
            }
            Some(Ok(Event::Finish { .. })) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
    println!();
    Ok(text)
}

/// Lines typed on stdin, read on their own thread so the terminal never blocks the runtime.
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn missing_hint(message: String, model: &Path) -> String {
    if model.exists() || model != files::default_model(&files::default_dir()) {
        return message;
    }
    format!("{message}\nfetch the default model with: bash models/fetch-default.sh")
}

/// `edgechat model list`: the configured local models (name, file) with their state, then a
/// table of the GGUF files in `dir`.
pub fn list(configured: &[(String, PathBuf)], dir: &Path) -> Result<(), String> {
    if !configured.is_empty() {
        println!("configured models (the first answers for `local` and stands in for providers):");
        for (name, path) in configured {
            let state = match super::gguf::GgufFile::open(path).and_then(|g| g.info()) {
                Ok(m) => format!("{} {} {}", m.architecture, m.quantization, count(m.parameters)),
                Err(_) if !path.exists() => {
                    "missing: `edgechat model pull REPO FILE` fetches it".into()
                }
                Err(e) => format!("unusable: {e}"),
            };
            println!("  {name:<24} {:<48} {state}", path.display());
        }
        println!();
    }
    let models = match list_models(dir) {
        Ok(models) => models,
        Err(_) if !dir.exists() => Vec::new(),
        Err(e) => return Err(e.to_string()),
    };
    if models.is_empty() {
        println!(
            "no .gguf files in {} (bash models/fetch-default.sh fetches the default)",
            dir.display()
        );
        return Ok(());
    }
    println!("files in {}:", dir.display());
    println!(
        "{:<40} {:<8} {:>7} {:<6} {:>7} {:>9}",
        "name", "arch", "params", "quant", "context", "size"
    );
    for model in models {
        match model {
            Ok(m) => println!(
                "{:<40} {:<8} {:>7} {:<6} {:>7} {:>7.1}MB",
                m.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
                m.architecture,
                count(m.parameters),
                m.quantization,
                m.trained_context,
                m.file_size as f64 / 1e6
            ),
            Err(e) => println!("{e}"),
        }
    }
    println!("kernels: {} (this CPU's; EDGECHAT_ISA narrows them)", cpu_kernels());
    Ok(())
}

/// The instruction set the local model's CPU kernels use on this machine.
fn cpu_kernels() -> &'static str {
    super::model::kernels(&candle_core::Device::Cpu)
}

/// 134515008 → "135M".
fn count(n: u64) -> String {
    match n {
        0..=999_999 => format!("{:.0}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.0}M", n as f64 / 1e6),
        _ => format!("{:.1}B", n as f64 / 1e9),
    }
}

/// `edgechat model pull REPO FILE`: says what it fetches at once (a stalled hub is not
/// mistaken for a hung command), then the file's path once it is complete and verified.
pub async fn pull(repo: &str, file: &str, dir: &Path, idle_secs: u64) -> Result<(), String> {
    eprintln!("fetching {file} from {repo} into {}", dir.display());
    let deadlines = files::Deadlines {
        idle: std::time::Duration::from_secs(idle_secs.max(1)),
        ..files::Deadlines::default()
    };
    let path = files::pull(repo, file, dir, deadlines).await.map_err(|e| e.to_string())?;
    println!("{}", path.display());
    Ok(())
}
