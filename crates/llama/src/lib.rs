//! The llama forward pass on the CPU, ours rather than candle-transformers': it runs Q4_1
//! matrices through our SIMD kernel (candle's is scalar), keeps the token embedding quantized
//! (candle's model dequantizes it, ~113 MB for SmolLM2), appends to a growing KV cache instead
//! of concatenating it every token, and reads grouped-query K/V heads in place instead of
//! repeating them. Other matrix types still go through candle's quantized matmul. GPUs and the
//! llama variants this does not cover (mixture of experts, partial RoPE) keep candle's model.
//!
//! edgechat's `local` engine picks it for llama files on the CPU; its tests hold it to
//! candle-transformers' model (same logits within rounding, same greedy tokens).

mod cpu;
mod matmul;
mod q4_1;

pub use cpu::Isa;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::utils::barrier_pool;
use candle_core::{bail, Device, Result, Tensor};
use matmul::{Disjoint, Fused, Linear};
use std::io::{Read, Seek};
use std::sync::Arc;

/// Weights (shared between sequences) and one sequence's KV cache.
#[derive(Clone)]
pub struct Llama {
    net: Arc<Net>,
    cache: Vec<Kv>,
}

struct Net {
    dims: Dims,
    embed: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// RoPE frequencies, one per rotated pair.
    inv_freq: Vec<f32>,
}

#[derive(Clone, Copy)]
struct Dims {
    vocab: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Dims {
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Queries, keys and values.
    qkv: Fused,
    o: Linear,
    ffn_norm: Vec<f32>,
    /// The gate and up projections.
    gate_up: Fused,
    down: Linear,
}

/// Keys and values of every position so far, `kv_width` floats per position.
#[derive(Clone, Default)]
struct Kv {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Llama {
    /// Whether this pass covers the file: plain llama blocks with RoPE over whole heads.
    pub fn covers(content: &Content) -> bool {
        let u = |key: &str| usize_meta(content, key).ok();
        let Ok(d) = dims(content) else { return false };
        u("llama.expert_count").unwrap_or(0) == 0
            && d.kv_heads > 0
            && d.heads % d.kv_heads == 0
            && d.head_dim * d.heads == d.hidden
            && d.head_dim % 2 == 0
            && u("llama.rope.dimension_count").unwrap_or(d.head_dim) == d.head_dim
    }

    /// Reads every tensor the pass needs, each checked against the shape the metadata implies
    /// (a wrong one would otherwise fail deep inside a matmul); call [`Llama::covers`] first.
    pub fn load<R: Read + Seek>(content: &Content, reader: &mut R) -> Result<Self> {
        let dims = dims(content)?;
        let (h, kv, ffn) =
            (dims.hidden, dims.kv_width(), usize_meta(content, "llama.feed_forward_length")?);
        let mut tensor = |name: &str, shape: &[usize]| -> Result<QTensor> {
            let t = content.tensor(reader, name, &Device::Cpu)?;
            match t.shape().dims() == shape {
                true => Ok(t),
                false => bail!(
                    "`{name}` has shape {:?}; the metadata implies {shape:?}",
                    t.shape().dims()
                ),
            }
        };
        let embed = Arc::new(tensor("token_embd.weight", &[dims.vocab, h])?);
        let norm = vector(tensor("output_norm.weight", &[h])?)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => Linear::new(Arc::new(tensor("output.weight", &[dims.vocab, h])?))?,
            false => Linear::new(embed.clone())?,
        };
        let blocks = usize_meta(content, "llama.block_count")?;
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut w =
                |part: &str, shape: &[usize]| tensor(&format!("blk.{i}.{part}.weight"), shape);
            layers.push(Layer {
                attn_norm: vector(w("attn_norm", &[h])?)?,
                qkv: Fused::new(vec![
                    w("attn_q", &[h, h])?,
                    w("attn_k", &[kv, h])?,
                    w("attn_v", &[kv, h])?,
                ])?,
                o: Linear::new(Arc::new(w("attn_output", &[h, h])?))?,
                ffn_norm: vector(w("ffn_norm", &[h])?)?,
                gate_up: Fused::new(vec![w("ffn_gate", &[ffn, h])?, w("ffn_up", &[ffn, h])?])?,
                down: Linear::new(Arc::new(w("ffn_down", &[h, ffn])?))?,
            });
        }
        let base = match content.metadata.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10_000.0,
        };
        let d = dims.head_dim;
        let inv_freq = (0..d).step_by(2).map(|i| 1.0 / base.powf(i as f32 / d as f32)).collect();
        let net = Net { dims, embed, layers, norm, output, inv_freq };
        Ok(Llama { cache: vec![Kv::default(); net.layers.len()], net: Arc::new(net) })
    }

    /// Forgets the sequence; the weights stay shared.
    pub fn clear(&mut self) {
        self.cache.iter_mut().for_each(|kv| *kv = Kv::default());
    }

    /// Runs `tokens` at positions `pos..` (dropping any cache beyond `pos`) and returns the
    /// logits for the last one.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let net = &*self.net;
        let d = net.dims;
        let vocab = d.vocab;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token {t} is outside the vocabulary of {vocab}")
        }
        let Some(last) = tokens.len().checked_sub(1) else { bail!("no tokens to run") };
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x: Vec<f32> = net.embed.embedding(&ids)?.flatten_all()?.to_vec1()?;
        let rope = Rope::new(&net.inv_freq, pos, tokens.len());
        for (layer, kv) in net.layers.iter().zip(&mut self.cache) {
            if kv.k.len() < pos * d.kv_width() {
                bail!("position {pos} is past the {} cached", kv.k.len() / d.kv_width())
            }
            kv.k.truncate(pos * d.kv_width());
            kv.v.truncate(pos * d.kv_width());
            layer.forward(&mut x, kv, &rope, d)?;
        }
        let h = rms_norm(&x[last * d.hidden..], &net.norm, d.eps);
        net.output.forward(&h)
    }
}

impl Layer {
    fn forward(&self, x: &mut [f32], kv: &mut Kv, rope: &Rope, d: Dims) -> Result<()> {
        let h = rms_norm(x, &self.attn_norm, d.eps);
        let [mut q, mut k, v]: [Vec<f32>; 3] = self.qkv.forward(&h)?.try_into().expect("three");
        rope.apply(&mut q, d.head_dim);
        rope.apply(&mut k, d.head_dim);
        kv.k.extend_from_slice(&k);
        kv.v.extend_from_slice(&v);
        add(x, &self.o.forward(&attention(&q, kv, d))?);
        let h = rms_norm(x, &self.ffn_norm, d.eps);
        let [mut gate, up]: [Vec<f32>; 2] = self.gate_up.forward(&h)?.try_into().expect("two");
        for (g, u) in gate.iter_mut().zip(&up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        add(x, &self.down.forward(&gate)?);
        Ok(())
    }
}

/// Causal attention of the new positions (the last rows of the cache) over the whole cache,
/// one pool item per (position, head); a query head reads its group's K/V head in place.
fn attention(q: &[f32], kv: &Kv, d: Dims) -> Vec<f32> {
    let (hd, heads) = (d.head_dim, d.heads);
    let m = q.len() / (heads * hd);
    let first = kv.k.len() / d.kv_width() - m;
    let per_group = heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let dst = Disjoint::new(&mut out);
    barrier_pool().execute_chunked(m * heads, |items| {
        let mut scores = Vec::new();
        for item in items {
            let (i, h) = (item / heads, item % heads);
            let qh = &q[item * hd..][..hd];
            let at = |t: usize| t * d.kv_width() + h / per_group * hd;
            scores.clear();
            scores.extend((0..=first + i).map(|t| dot(qh, &kv.k[at(t)..][..hd]) * scale));
            softmax(&mut scores);
            // SAFETY: item `i·heads + h` owns this head's slice of the output row.
            let o = unsafe { dst.slice(item * hd, hd) };
            for (t, p) in scores.iter().enumerate() {
                o.iter_mut().zip(&kv.v[at(t)..][..hd]).for_each(|(o, v)| *o += p * v);
            }
        }
    });
    out
}

/// Rotation angles of the new positions, shared by every layer.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl Rope {
    fn new(inv_freq: &[f32], pos: usize, len: usize) -> Self {
        let angles: Vec<f32> =
            (pos..pos + len).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f)).collect();
        Rope {
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            pairs: inv_freq.len(),
        }
    }

    /// Rotates adjacent pairs `(2j, 2j+1)` of every head (GGUF llama's layout).
    fn apply(&self, rows: &mut [f32], head_dim: usize) {
        let len = self.cos.len() / self.pairs;
        for (i, row) in rows.chunks_exact_mut(rows.len() / len).enumerate() {
            let (cos, sin) = (&self.cos[i * self.pairs..], &self.sin[i * self.pairs..]);
            for head in row.chunks_exact_mut(head_dim) {
                for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[j] - b * sin[j];
                    pair[1] = a * sin[j] + b * cos[j];
                }
            }
        }
    }
}

fn dims(content: &Content) -> Result<Dims> {
    let u = |key: &str| usize_meta(content, key);
    let (hidden, heads) = (u("llama.embedding_length")?, u("llama.attention.head_count")?);
    let kv_heads = u("llama.attention.head_count_kv").unwrap_or(heads);
    let eps = meta(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?;
    let Some(embed) = content.tensor_infos.get("token_embd.weight") else {
        bail!("no `token_embd.weight` tensor")
    };
    let vocab = embed.shape.dims().first().copied().unwrap_or(0);
    let Some(head_dim) = hidden.checked_div(heads) else { bail!("no attention heads") };
    Ok(Dims { vocab, hidden, heads, kv_heads, head_dim, eps })
}

fn usize_meta(content: &Content, key: &str) -> Result<usize> {
    let v = meta(content, key)?;
    value_u32(v).map(|n| n as usize).ok_or_else(|| msg(format!("`{key}` is not an integer")))
}

/// GGUF integer metadata as u32, whatever width the file stored it in (token ids and counts
/// fit); edgechat's GGUF reader uses it too.
pub fn value_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(x) => Some(u32::from(*x)),
        Value::U16(x) => Some(u32::from(*x)),
        Value::U32(x) => Some(*x),
        Value::U64(x) => u32::try_from(*x).ok(),
        Value::I8(x) => u32::try_from(*x).ok(),
        Value::I16(x) => u32::try_from(*x).ok(),
        Value::I32(x) => u32::try_from(*x).ok(),
        Value::I64(x) => u32::try_from(*x).ok(),
        _ => None,
    }
}

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| msg(format!("no `{key}` metadata")))
}

fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}

fn vector(t: QTensor) -> Result<Vec<f32>> {
    t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()
}

/// RMS-normalises each row of `x` (rows as long as `w`) and scales it by `w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let scale = 1.0 / (dot(row, row) / row.len() as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(x, w)| x * scale * w));
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}

/// Eight running sums, so the compiler can keep them in one vector register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a8.zip(b8) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn softmax(xs: &mut [f32]) {
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    xs.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(test)]
#[path = "../../../tests/common_local/mod.rs"]
mod common_local;

#[cfg(test)]
mod tests {
    use super::common_local::tiny_model;
    use super::*;
    use candle_transformers::models::quantized_llama::ModelWeights;
    use std::path::{Path, PathBuf};

    /// The default model at the workspace root (this crate's manifest is two levels down).
    fn default_model() -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let fetch = "run `bash models/fetch-default.sh` (CI does) to fetch the default model";
        assert!(path.exists(), "{} is missing: {fetch}", path.display());
        path
    }

    /// Ours and candle's model, on the same file.
    fn both(path: &Path) -> (Llama, ModelWeights) {
        let mut file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let content = Content::read(&mut file).unwrap();
        assert!(Llama::covers(&content));
        let ours = Llama::load(&content, &mut file).unwrap();
        let theirs = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        (ours, theirs)
    }

    fn argmax(xs: &[f32]) -> usize {
        (0..xs.len()).fold(0, |best, i| if xs[i] > xs[best] { i } else { best })
    }

    /// How far the best logit leads the second best.
    fn runner_up_gap(xs: &[f32]) -> f32 {
        let best = argmax(xs);
        let second = (0..xs.len()).filter(|&i| i != best).map(|i| xs[i]).fold(f32::MIN, f32::max);
        xs[best] - second
    }

    /// Prefills `prompt`, then decodes `steps` greedy tokens, checking at each step that the
    /// logits agree within `tolerance` of their range and that both pick the same token. The
    /// two differ by rounding alone (candle keeps activation scales in f16, ours in f32; sums
    /// run in another order), which 30 layers grow to a few percent at worst.
    fn agree(path: &Path, prompt: &[u32], steps: usize, tolerance: f32) {
        let (mut ours, mut theirs) = both(path);
        let (mut tokens, mut pos) = (prompt.to_vec(), 0);
        for step in 0..=steps {
            let a = ours.forward(&tokens, pos).unwrap();
            let input = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let b = theirs.forward(&input, pos).unwrap().flatten_all().unwrap();
            let b: Vec<f32> = b.to_vec1().unwrap();
            let range = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= tolerance * range, "step {step}: off by {worst} of {range}");
            // Same greedy token, unless candle's best two lie within 1% of the range: such a
            // near-tie goes either way by rounding (the tiny model's third token on aarch64).
            if runner_up_gap(&b) > 0.01 * range {
                assert_eq!(argmax(&a), argmax(&b), "step {step}");
            }
            pos += tokens.len();
            tokens = vec![argmax(&b) as u32];
        }
    }

    #[test]
    fn the_tiny_model_matches_candles_llama() {
        let (_dir, path) = tiny_model();
        agree(&path, &[5, 40, 41, 42, 60, 61, 7], 12, 0.04);
    }

    #[test]
    fn the_default_model_matches_candles_llama() {
        let prompt = [1, 9690, 198, 2683, 314, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198];
        agree(&default_model(), &prompt, 8, 0.08);
    }

    #[test]
    fn a_tensor_of_the_wrong_shape_is_named() {
        use candle_core::quantized::{gguf_file, GgmlDType};
        let (dir, path) = tiny_model();
        let mut file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let content = Content::read(&mut file).unwrap();
        let mut tensors = Vec::new();
        for name in content.tensor_infos.keys() {
            let t = match name.as_str() {
                "blk.1.attn_k.weight" => {
                    let zeros = Tensor::zeros((8, 64), candle_core::DType::F32, &Device::Cpu);
                    QTensor::quantize(&zeros.unwrap(), GgmlDType::Q4_1).unwrap()
                }
                _ => content.tensor(&mut file, name, &Device::Cpu).unwrap(),
            };
            tensors.push((name.as_str(), t));
        }
        let metadata: Vec<_> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<_> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        let bad = dir.path().join("bad.gguf");
        gguf_file::write(&mut std::fs::File::create(&bad).unwrap(), &metadata, &tensors).unwrap();
        let mut file = std::io::BufReader::new(std::fs::File::open(&bad).unwrap());
        let content = Content::read(&mut file).unwrap();
        let err = Llama::load(&content, &mut file).err().expect("refused").to_string();
        assert!(err.contains("`blk.1.attn_k.weight` has shape [8, 64]"), "{err}");
    }

    #[test]
    fn forgetting_the_cache_gives_the_same_answer_again() {
        let (_dir, path) = tiny_model();
        let (mut m, _) = both(&path);
        let first = m.forward(&[5, 6, 7], 0).unwrap();
        m.forward(&[8], 3).unwrap();
        m.clear();
        assert_eq!(m.forward(&[5, 6, 7], 0).unwrap(), first);
        assert!(m.forward(&[9], 5).is_err(), "a position past the cache is refused");
        assert!(m.forward(&[u32::MAX], 0).is_err(), "a token outside the vocabulary is refused");
    }
}
