//! The forward pass alone on any GGUF, for quick kernel work: load time, prefill of a
//! 256-token prompt, 128 decode steps, peak RSS. The product's benchmark, with the engine,
//! sampler and tokenizer around it, is `cargo bench --bench local` at the workspace root.
//!
//! `cargo run --release -p edgechat-llama --example speed -- MODEL.gguf [RUNS]`
//! (threads: `CANDLE_NUM_THREADS`; kernels: `EDGECHAT_ISA`).

use candle_core::quantized::gguf_file::Content;
use edgechat_llama::{Isa, Model};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: speed MODEL.gguf [RUNS]");
    let runs: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let started = Instant::now();
    let mut file = std::io::BufReader::new(std::fs::File::open(&path).expect("open the model"));
    let content = Content::read(&mut file).expect("a GGUF file");
    assert!(Model::covers(&content), "our pass does not cover this file");
    let mut model = Model::load(&content, file.get_ref()).expect("load");
    let load = started.elapsed();
    let vocab = content.tensor_infos["token_embd.weight"].shape.dims()[0] as u32;
    let prompt: Vec<u32> = (0..256u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..runs {
        model.clear();
        let t = Instant::now();
        let mut logits = model.forward(&prompt, 0).expect("prefill");
        prefill = prefill.max(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for pos in prompt.len()..prompt.len() + 128 {
            let next = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
            logits = model.forward(&[next as u32], pos).expect("decode");
        }
        decode = decode.max(128.0 / t.elapsed().as_secs_f64());
    }
    println!(
        "{path}: kernels {}, load {} ms, pp256 {prefill:.1} tok/s, tg128 {decode:.1} tok/s, peak RSS {} MiB (best of {runs})",
        Isa::get().name(),
        load.as_millis(),
        peak_rss_kib() / 1024
    );
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: 0 kB");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}
