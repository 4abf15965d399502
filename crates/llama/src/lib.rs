//! The transformer forward pass on the CPU, ours rather than candle-transformers': it runs
//! matrices through our kernels (`matmul.rs`), keeps the token embedding quantized (candle's
//! models dequantize it, ~113 MB for SmolLM2), appends to a growing KV cache instead of
//! concatenating it every token, and reads grouped-query K/V heads in place instead of
//! repeating them. One pass covers llama (Llama 3's `rope_freqs` included), qwen2, qwen3 and
//! gemma3: each is llama's block with a few options read from the metadata (`config.rs`).
//! GPUs and the files this does not cover (mixture of experts, partial RoPE, other
//! architectures) keep candle's models.
//!
//! edgechat's `local` engine picks it on the CPU; its tests hold it to candle-transformers'
//! models (same logits within rounding, same greedy tokens).

mod config;
mod cpu;
mod matmul;
mod prefix;
mod quant;
mod rope;
mod tensors;
mod vector;

pub use config::value_u32;
pub use cpu::Isa;
pub use prefix::PrefixCache;

use candle_core::quantized::gguf_file::Content;
use candle_core::utils::barrier_pool;
use candle_core::{bail, Result};
use config::{msg, Config, Dims};
use matmul::{Disjoint, Embedding, Fused, Linear};
use rope::Rope;
use std::fs::File;
use std::sync::Arc;
use tensors::Tensors;
use vector::{axpy, dot};

/// Weights (shared between sequences) and one sequence's KV cache.
#[derive(Clone)]
pub struct Model {
    net: Arc<Net>,
    cache: Vec<Kv>,
}

struct Net {
    dims: Dims,
    /// gemma3 multiplies the embedding by √hidden.
    embed_scale: Option<f32>,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// RoPE frequencies, one per rotated pair: the global table, then gemma3's local one.
    freqs: Vec<Vec<f32>>,
    halves: bool,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Queries, keys and values.
    qkv: Fused,
    /// Their biases where the file has them (qwen2).
    qkv_bias: [Option<Vec<f32>>; 3],
    /// Per-head RMSNorm weights of q and k (qwen3, gemma3).
    qk_norm: Option<[Vec<f32>; 2]>,
    o: Linear,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// The gate and up projections.
    gate_up: Fused,
    down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
    /// gemma3: a GELU-tanh gate instead of SiLU.
    gelu: bool,
    /// Which of the net's RoPE tables this layer rotates with.
    rope: usize,
    /// Positions a query sees, itself included (gemma3's sliding layers); `None`: all.
    window: Option<usize>,
}

/// Keys and values of every position so far, `kv_width` floats per position.
#[derive(Clone, Default)]
struct Kv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Positions a KV cache grows by: it takes memory as the sequence needs it (a full context
/// for every sequence up front would be ~360 MiB each for the default model), in steps small
/// enough to waste little and large enough that reallocation copies are rare.
const KV_BLOCK: usize = 256;

impl Kv {
    fn truncate(&mut self, len: usize) {
        self.k.truncate(len);
        self.v.truncate(len);
    }

    /// Appends rows of `width` floats, growing by whole blocks of positions.
    fn append(&mut self, k: &[f32], v: &[f32], width: usize) {
        let block = KV_BLOCK * width;
        let wanted = (self.k.len() + k.len()).div_ceil(block) * block;
        for (cache, new) in [(&mut self.k, k), (&mut self.v, v)] {
            cache.reserve_exact(wanted.saturating_sub(cache.len()));
            cache.extend_from_slice(new);
        }
    }
}

impl Model {
    /// Whether this pass covers the file (architecture, shapes, RoPE and tensors; see
    /// `Config::covers`): if not, candle's model is the one to run it.
    pub fn covers(content: &Content) -> bool {
        Config::covers(content)
    }

    /// Reads every tensor the pass needs, each checked against the shape the metadata implies
    /// (a wrong one would otherwise fail deep inside a matmul); call [`Model::covers`] first.
    /// The matrices stay in the file, memory-mapped (see `tensors.rs`).
    pub fn load(content: &Content, file: &File) -> Result<Self> {
        let c = Config::read(content)?;
        let d = c.dims;
        let t = &Tensors::open(content, file)?;
        let embed = t.get("token_embd.weight", &[d.vocab, d.hidden])?;
        let norm = t.vector("output_norm.weight", d.hidden)?;
        let untied = t.get_if("output.weight", &[d.vocab, d.hidden])?;
        let tied = untied.is_none();
        let output = Linear::new(untied.unwrap_or(embed.clone()))?;
        // A tied head and the embedding share one matrix (and one regrouped copy, if any).
        let embed = match &output {
            Linear::Quant(m) if tied => Embedding::Quant(m.clone()),
            _ => Embedding::new(&embed)?,
        };
        let pairs = d.head_dim / 2;
        let factors = match c.family.rope_freqs {
            true => t.get_if("rope_freqs.weight", &[pairs])?.map(|v| v.to_f32()).transpose()?,
            false => None,
        };
        let mut freqs = vec![rope::frequencies(d.head_dim, c.rope_base, c.rope_scale, factors)];
        if let Some(s) = c.sliding {
            freqs.push(rope::frequencies(d.head_dim, s.base, 1.0, None));
        }
        let layers = (0..c.blocks).map(|i| Layer::load(t, &c, i)).collect::<Result<_>>()?;
        let net = Net {
            dims: d,
            embed_scale: c.family.gemma.then(|| (d.hidden as f32).sqrt()),
            embed,
            layers,
            norm,
            output,
            freqs,
            halves: c.family.halves,
        };
        Ok(Model { cache: vec![Kv::default(); net.layers.len()], net: Arc::new(net) })
    }

    /// Forgets the sequence; the weights stay shared.
    pub fn clear(&mut self) {
        self.cache.iter_mut().for_each(|kv| *kv = Kv::default());
    }

    /// Positions in the KV cache.
    pub fn cached(&self) -> usize {
        self.cache.first().map_or(0, |kv| kv.k.len() / self.net.dims.kv_width())
    }

    /// Bytes the KV cache holds (what `context` bounds per sequence).
    pub fn kv_bytes(&self) -> usize {
        self.cache.iter().map(|kv| (kv.k.capacity() + kv.v.capacity()) * 4).sum()
    }

    /// A copy holding the cache's first `len` positions (all, if fewer), in no more memory
    /// than they need.
    pub fn prefix(&self, len: usize) -> Model {
        let floats = len.min(self.cached()) * self.net.dims.kv_width();
        let cache = self
            .cache
            .iter()
            .map(|kv| Kv { k: kv.k[..floats].to_vec(), v: kv.v[..floats].to_vec() })
            .collect();
        Model { net: self.net.clone(), cache }
    }

    /// Runs `tokens` at positions `pos..` (dropping any cache beyond `pos`) and returns the
    /// logits for the last one.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        Ok(Model::forward_batch(&mut [self], &[Input { tokens, pos }])?.remove(0))
    }

    /// One step of several sequences of the same weights: each matrix is read once for all
    /// their rows (what makes serving N users cheaper than N times one), while each sequence
    /// keeps its own cache and positions. Returns each sequence's last logits, in order; the
    /// result equals [`Model::forward`] run on each alone.
    pub fn forward_batch(models: &mut [&mut Model], inputs: &[Input]) -> Result<Vec<Vec<f32>>> {
        let Some(net) = models.first().map(|m| m.net.clone()) else { return Ok(Vec::new()) };
        if models.len() != inputs.len() || models.iter().any(|m| !Arc::ptr_eq(&m.net, &net)) {
            bail!("a batch needs one input per sequence, all of the same weights")
        }
        let d = net.dims;
        for (m, input) in models.iter().zip(inputs) {
            input.check(d, m.cached())?;
        }
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for (m, input) in models.iter_mut().zip(inputs) {
            m.cache.iter_mut().for_each(|kv| kv.truncate(input.pos * d.kv_width()));
            positions.extend(input.pos..input.pos + input.tokens.len());
            tokens.extend_from_slice(input.tokens);
        }
        let mut x = net.embed.rows(&tokens)?;
        if let Some(s) = net.embed_scale {
            x.iter_mut().for_each(|x| *x *= s);
        }
        let ropes: Vec<Rope> =
            net.freqs.iter().map(|f| Rope::new(f, &positions, net.halves)).collect();
        let step = Step { inputs, positions: &positions };
        for (i, layer) in net.layers.iter().enumerate() {
            let mut caches: Vec<&mut Kv> = models.iter_mut().map(|m| &mut m.cache[i]).collect();
            layer.forward(&mut x, &mut caches, &step, &ropes[layer.rope], d)?;
        }
        let mut last = Vec::with_capacity(inputs.len() * d.hidden);
        for end in step.ends() {
            last.extend_from_slice(&x[(end - 1) * d.hidden..][..d.hidden]);
        }
        let logits = net.output.forward(&rms_norm(&last, &net.norm, d.eps))?;
        Ok(logits.chunks_exact(d.vocab).map(<[f32]>::to_vec).collect())
    }
}

/// One sequence's share of a batched step: its new tokens, and the position of the first
/// (any cache beyond it is dropped).
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub tokens: &'a [u32],
    pub pos: usize,
}

impl Input<'_> {
    fn check(&self, d: Dims, cached: usize) -> Result<()> {
        let vocab = d.vocab;
        if let Some(t) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            bail!("token {t} is outside the vocabulary of {vocab}")
        }
        if self.tokens.is_empty() {
            bail!("no tokens to run")
        }
        if self.pos > cached {
            bail!("position {} is past the {cached} cached", self.pos)
        }
        Ok(())
    }
}

/// The rows of a batched step: each input's tokens one after another, and every row's
/// position in its own sequence.
struct Step<'a> {
    inputs: &'a [Input<'a>],
    positions: &'a [usize],
}

impl Step<'_> {
    /// Where each input's rows end (exclusive).
    fn ends(&self) -> impl Iterator<Item = usize> + '_ {
        self.inputs.iter().scan(0, |end, input| {
            *end += input.tokens.len();
            Some(*end)
        })
    }
}

impl Layer {
    fn load(t: &Tensors<'_>, c: &Config, i: usize) -> Result<Layer> {
        let d = c.dims;
        let (h, q, kv, hd, ffn) = (d.hidden, d.q_width(), d.kv_width(), d.head_dim, c.ffn);
        let n = |part: &str| format!("blk.{i}.{part}");
        let w = |t: &Tensors<'_>, part: &str, shape: &[usize]| {
            t.get(&n(&format!("{part}.weight")), shape)
        };
        let bias = |t: &Tensors<'_>, part: &str, len: usize| {
            t.get_if(&n(&format!("{part}.bias")), &[len])?.map(|v| v.to_f32()).transpose()
        };
        let norm =
            |t: &Tensors<'_>, part: &str, len: usize| t.vector(&n(&format!("{part}.weight")), len);
        let gemma = c.family.gemma;
        let sliding = c.sliding.filter(|s| s.covers(i));
        Ok(Layer {
            attn_norm: norm(t, "attn_norm", h)?,
            qkv: Fused::new(vec![
                w(t, "attn_q", &[q, h])?,
                w(t, "attn_k", &[kv, h])?,
                w(t, "attn_v", &[kv, h])?,
            ])?,
            qkv_bias: [bias(t, "attn_q", q)?, bias(t, "attn_k", kv)?, bias(t, "attn_v", kv)?],
            qk_norm: match c.family.qk_norm {
                true => Some([norm(t, "attn_q_norm", hd)?, norm(t, "attn_k_norm", hd)?]),
                false => None,
            },
            o: Linear::new(w(t, "attn_output", &[h, q])?)?,
            post_attn_norm: gemma.then(|| norm(t, "post_attention_norm", h)).transpose()?,
            ffn_norm: norm(t, "ffn_norm", h)?,
            gate_up: Fused::new(vec![w(t, "ffn_gate", &[ffn, h])?, w(t, "ffn_up", &[ffn, h])?])?,
            down: Linear::new(w(t, "ffn_down", &[h, ffn])?)?,
            post_ffn_norm: gemma.then(|| norm(t, "post_ffw_norm", h)).transpose()?,
            gelu: gemma,
            rope: usize::from(sliding.is_some()),
            window: sliding.map(|s| s.window),
        })
    }

    fn forward(
        &self,
        x: &mut [f32],
        caches: &mut [&mut Kv],
        step: &Step,
        rope: &Rope,
        d: Dims,
    ) -> Result<()> {
        let h = rms_norm(x, &self.attn_norm, d.eps);
        let mut qkv: [Vec<f32>; 3] = self.qkv.forward(&h)?.try_into().map_err(|_| shape())?;
        for (part, bias) in qkv.iter_mut().zip(&self.qkv_bias) {
            if let Some(b) = bias {
                part.chunks_exact_mut(b.len()).for_each(|row| add(row, b));
            }
        }
        let [mut q, mut k, v] = qkv;
        if let Some([qn, kn]) = &self.qk_norm {
            q = rms_norm(&q, qn, d.eps);
            k = rms_norm(&k, kn, d.eps);
        }
        rope.apply(&mut q, d.head_dim);
        rope.apply(&mut k, d.head_dim);
        let w = d.kv_width();
        let mut start = 0;
        for (kv, end) in caches.iter_mut().zip(step.ends()) {
            kv.append(&k[start * w..end * w], &v[start * w..end * w], w);
            start = end;
        }
        let caches: Vec<&Kv> = caches.iter().map(|kv| &**kv).collect();
        let out = self.o.forward(&attention(&q, &caches, step, d, self.window))?;
        add(x, &norm_if(out, self.post_attn_norm.as_deref(), d.eps));
        let h = rms_norm(x, &self.ffn_norm, d.eps);
        let [mut gate, up]: [Vec<f32>; 2] =
            self.gate_up.forward(&h)?.try_into().map_err(|_| shape())?;
        let act = if self.gelu { gelu_tanh } else { silu };
        gate.iter_mut().zip(&up).for_each(|(g, u)| *g = act(*g) * u);
        let out = self.down.forward(&gate)?;
        add(x, &norm_if(out, self.post_ffn_norm.as_deref(), d.eps));
        Ok(())
    }
}

fn shape() -> candle_core::Error {
    msg("a fused matmul returned the wrong number of parts".to_owned())
}

/// Causal attention of each row over its own sequence's cache (the new rows are its last
/// ones), or over its last `window` positions, one pool item per (row, head); a query head
/// reads its group's K/V head in place.
fn attention(q: &[f32], caches: &[&Kv], step: &Step, d: Dims, window: Option<usize>) -> Vec<f32> {
    let (hd, heads) = (d.head_dim, d.heads);
    let per_group = heads / d.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // Which sequence each row belongs to.
    let owner: Vec<usize> =
        step.inputs.iter().enumerate().flat_map(|(s, i)| vec![s; i.tokens.len()]).collect();
    let mut out = vec![0f32; q.len()];
    let dst = Disjoint::new(&mut out);
    barrier_pool().execute_chunked(owner.len() * heads, |items| {
        let mut scores = Vec::new();
        for item in items {
            let (row, h) = (item / heads, item % heads);
            let kv = caches[owner[row]];
            let qh = &q[item * hd..][..hd];
            let at = |t: usize| t * d.kv_width() + h / per_group * hd;
            let end = step.positions[row] + 1;
            let seen = window.map_or(0, |w| end.saturating_sub(w))..end;
            scores.clear();
            scores.extend(seen.clone().map(|t| dot(qh, &kv.k[at(t)..][..hd]) * scale));
            softmax(&mut scores);
            // SAFETY: item `row·heads + h` owns this head's slice of the output row.
            let o = unsafe { dst.slice(item * hd, hd) };
            for (t, &p) in seen.zip(&scores) {
                axpy(o, p, &kv.v[at(t)..][..hd]);
            }
        }
    });
    out
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

fn norm_if(x: Vec<f32>, w: Option<&[f32]>, eps: f32) -> Vec<f32> {
    match w {
        Some(w) => rms_norm(&x, w, eps),
        None => x,
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU's tanh approximation (PyTorch's `gelu(approximate="tanh")`, llama.cpp's `ggml_gelu`).
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

fn add(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
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
mod tests;
