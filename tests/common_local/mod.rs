//! Shared helpers for the local-engine tests: a tiny random-weight GGUF (llama, qwen2, qwen3,
//! gemma3) written with candle's own writer, and the path of the default model.
#![allow(dead_code)]

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

pub const HIDDEN: usize = 64;
pub const CONTEXT: u32 = 96;
pub const LAYERS: usize = 2;
pub const HEADS: u32 = 4;
pub const KV_HEADS: u32 = 2;
pub const FFN: usize = 128;

/// Special tokens first, as SmolLM2 has them.
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// A few merges so BPE has work to do; each pair's parts must be tokens already.
const MERGES: [(&str, &str); 6] =
    [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")];

pub const TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Options for [`write_tiny_model`].
pub struct Tiny {
    pub architecture: &'static str,
    pub seed: u64,
    /// Attention head width (`attention.key_length`) where it should differ from hidden /
    /// heads, as Qwen3's does.
    pub head_dim: Option<usize>,
    /// No `output.weight`: the embedding doubles as the output matrix.
    pub tied: bool,
    /// Llama 3's per-pair RoPE divisors, written as `rope_freqs.weight`.
    pub rope_freqs: Option<Vec<f32>>,
    /// Norm weights drawn from 1 ± this instead of all ones, so a misapplied norm shows.
    pub norm_noise: f32,
    /// More metadata, keys without the architecture prefix (`rope.scaling.type`, …), or
    /// `general.*` ones as they are; they replace the defaults of the same name.
    pub extra: Vec<(&'static str, Value)>,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            architecture: "llama",
            seed: 7,
            head_dim: None,
            tied: false,
            rope_freqs: None,
            norm_noise: 0.0,
            extra: Vec::new(),
        }
    }
}

/// GPT-2's byte-to-character table, so every byte has a token.
pub fn byte_tokens() -> Vec<String> {
    let printable: Vec<u32> =
        (b'!'..=b'~').chain(0xA1..=0xAC).chain(0xAE..=0xFF).map(u32::from).collect();
    let mut chars: Vec<(u32, u32)> = printable.iter().map(|&b| (b, b)).collect();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars.push((b, 256 + extra));
            extra += 1;
        }
    }
    chars.sort();
    chars.into_iter().map(|(_, c)| char::from_u32(c).unwrap().to_string()).collect()
}

pub fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_tokens());
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens
}

/// Deterministic weights: a xorshift stream scaled to `scale`.
struct Rng(u64);

impl Rng {
    fn tensor(&mut self, rows: usize, cols: usize, scale: f32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }
}

/// Writes a 2-layer model of `opts.architecture` with a byte-level BPE vocabulary, ChatML
/// template and random weights.
pub fn write_tiny_model(path: &Path, opts: &Tiny) {
    let tokens = vocabulary();
    let vocab = tokens.len();
    let mut rng = Rng(opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let q = |t: Tensor, dtype| QTensor::quantize(&t, dtype).unwrap();
    let head = opts.head_dim.unwrap_or(HIDDEN / HEADS as usize);
    // Without noise no numbers are drawn, so the other weights stay as they were.
    let norm = |rng: &mut Rng, n: usize| match opts.norm_noise {
        0.0 => q(Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32),
        noise => q((rng.tensor(1, n, noise).flatten_all().unwrap() + 1.0).unwrap(), GgmlDType::F32),
    };
    // Special tokens get zero output rows so random weights rarely end a generation early
    // (a tied embedding keeps them: the output is the embedding then).
    let mask: Vec<f32> = (0..vocab).map(|i| if i < SPECIALS.len() { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::from_vec(mask, (vocab, 1), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q(rng.tensor(vocab, HIDDEN, 1.0), GgmlDType::Q8_0)),
        ("output_norm.weight".into(), norm(&mut rng, HIDDEN)),
    ];
    let output = rng.tensor(vocab, HIDDEN, 1.0).broadcast_mul(&mask).unwrap();
    if !opts.tied {
        tensors.push(("output.weight".into(), q(output, GgmlDType::Q8_0)));
    }
    if let Some(factors) = &opts.rope_freqs {
        let t = Tensor::new(factors.as_slice(), &Device::Cpu).unwrap();
        tensors.push(("rope_freqs.weight".into(), q(t, GgmlDType::F32)));
    }
    let (qw, kv) = (head * HEADS as usize, head * KV_HEADS as usize);
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let w = 0.15;
        tensors.push((format!("{p}.attn_q.weight"), q(rng.tensor(qw, HIDDEN, w), GgmlDType::Q4_1)));
        tensors.push((format!("{p}.attn_k.weight"), q(rng.tensor(kv, HIDDEN, w), GgmlDType::Q4_1)));
        tensors.push((format!("{p}.attn_v.weight"), q(rng.tensor(kv, HIDDEN, w), GgmlDType::Q4_1)));
        tensors.push((
            format!("{p}.attn_output.weight"),
            q(rng.tensor(HIDDEN, qw, w), GgmlDType::Q4_1),
        ));
        tensors
            .push((format!("{p}.ffn_gate.weight"), q(rng.tensor(FFN, HIDDEN, w), GgmlDType::Q4_1)));
        tensors
            .push((format!("{p}.ffn_up.weight"), q(rng.tensor(FFN, HIDDEN, w), GgmlDType::Q4_1)));
        tensors
            .push((format!("{p}.ffn_down.weight"), q(rng.tensor(HIDDEN, FFN, w), GgmlDType::Q4_1)));
        tensors.push((format!("{p}.attn_norm.weight"), norm(&mut rng, HIDDEN)));
        tensors.push((format!("{p}.ffn_norm.weight"), norm(&mut rng, HIDDEN)));
        tensors.extend(family_tensors(opts.architecture, &p, head, &mut rng, &norm));
    }
    let arch = opts.architecture;
    let string = |s: &str| Value::String(s.to_owned());
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let types: Vec<Value> =
        (0..vocab).map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 })).collect();
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), string(arch)),
        ("general.name".into(), string("tiny test llama")),
        (format!("{arch}.context_length"), Value::U32(CONTEXT)),
        (format!("{arch}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(FFN as u32)),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(HEADS)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(KV_HEADS)),
        (format!("{arch}.rope.dimension_count"), Value::U32(head as u32)),
        (format!("{arch}.rope.freq_base"), Value::F32(10_000.0)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.attention.key_length"), Value::U32(head as u32)),
        (format!("{arch}.attention.value_length"), Value::U32(head as u32)),
        // gemma3 alternates sliding-window and global layers; a window shorter than the
        // context makes the tiny model exercise both.
        (format!("{arch}.attention.sliding_window"), Value::U32(CONTEXT / 2)),
        (format!("{arch}.attention.sliding_window_type"), Value::U32(2)),
        ("tokenizer.ggml.model".into(), string("gpt2")),
        ("tokenizer.ggml.pre".into(), string("smollm")),
        ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            strings(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), string(TEMPLATE)),
    ];
    let extra: Vec<(String, Value)> =
        opts.extra.iter().map(|(k, v)| (keyed(arch, k), v.clone())).collect();
    metadata.retain(|(k, _)| extra.iter().all(|(e, _)| e != k));
    metadata.extend(extra);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// What a family adds to llama's layer: qwen2's attention biases, qwen3's q/k norms, and
/// gemma3's q/k norms plus its norms after attention and feed-forward.
fn family_tensors(
    architecture: &str,
    p: &str,
    head: usize,
    rng: &mut Rng,
    norm: &dyn Fn(&mut Rng, usize) -> QTensor,
) -> Vec<(String, QTensor)> {
    let f32 = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let (qw, kv) = (head * HEADS as usize, head * KV_HEADS as usize);
    // Biases as large as a projection's outputs, so that leaving one out shows.
    let vector = |rng: &mut Rng, n: usize| rng.tensor(1, n, 0.5).flatten_all().unwrap();
    match architecture {
        "qwen2" => vec![
            (format!("{p}.attn_q.bias"), f32(vector(rng, qw))),
            (format!("{p}.attn_k.bias"), f32(vector(rng, kv))),
            (format!("{p}.attn_v.bias"), f32(vector(rng, kv))),
        ],
        "qwen3" | "gemma3" => {
            let mut extra = vec![
                (format!("{p}.attn_q_norm.weight"), norm(rng, head)),
                (format!("{p}.attn_k_norm.weight"), norm(rng, head)),
            ];
            if architecture == "gemma3" {
                extra.push((format!("{p}.post_attention_norm.weight"), norm(rng, HIDDEN)));
                extra.push((format!("{p}.post_ffw_norm.weight"), norm(rng, HIDDEN)));
            }
            extra
        }
        _ => Vec::new(),
    }
}

/// `extra`'s keys belong to the architecture (`llama.rope.dimension_count`), except the
/// `general.*` ones.
fn keyed(arch: &str, key: &str) -> String {
    match key.starts_with("general.") {
        true => key.to_owned(),
        false => format!("{arch}.{key}"),
    }
}

/// A tiny model in a fresh temporary directory (kept alive by the returned guard).
pub fn tiny_model() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_model(&path, &Tiny::default());
    (dir, path)
}

/// The default model, or a failure that says how to get it.
pub fn default_model() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `bash models/fetch-default.sh` (CI does) to fetch the default model",
        path.display()
    );
    path
}
