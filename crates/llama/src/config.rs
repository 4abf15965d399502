//! What the forward pass needs to know about a file, read from its metadata under the
//! architecture's own key prefix (`llama.`, `qwen2.`, …), and whether the pass covers it.
//! One pass serves several architectures: each is llama's block with a few [`Family`] options.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{bail, Result};

/// How an architecture's block departs from llama's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Family {
    /// RoPE turns the first half of each head against the second ("NEOX": GGUF qwen2, qwen3,
    /// gemma3) rather than adjacent pairs (GGUF llama, whose converter permutes q/k rows so).
    pub halves: bool,
    /// q and k get a per-head RMSNorm before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// Gemma 3: the embedding scaled by √hidden, norms after attention and after the FFN, a
    /// GELU-tanh gate, and sliding-window layers with their own RoPE base.
    pub gemma: bool,
    /// Llama 3's `rope_freqs.weight`, per-pair divisors of the RoPE frequencies.
    pub rope_freqs: bool,
}

impl Family {
    /// The architectures the pass covers, by `general.architecture`.
    pub fn of(architecture: &str) -> Option<Family> {
        let f = |halves, qk_norm, gemma, rope_freqs| {
            Some(Family { halves, qk_norm, gemma, rope_freqs })
        };
        match architecture {
            "llama" => f(false, false, false, true),
            "qwen2" => f(true, false, false, false),
            "qwen3" => f(true, true, false, false),
            "gemma3" => f(true, true, true, false),
            _ => None,
        }
    }

    /// Whether a tensor of this name has a place in the pass: a file with any other (experts,
    /// an output bias, …) would be run wrongly, so it is not covered.
    fn knows(&self, name: &str) -> bool {
        const TOP: [&str; 3] = ["token_embd.weight", "output_norm.weight", "output.weight"];
        const BLOCK: [&str; 12] = [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_output.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
        let part = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .filter(|(n, _)| n.parse::<usize>().is_ok())
            .map(|(_, part)| part);
        match part {
            None => TOP.contains(&name) || (self.rope_freqs && name == "rope_freqs.weight"),
            Some(part) => {
                BLOCK.contains(&part)
                    || (self.qk_norm
                        && ["attn_q_norm.weight", "attn_k_norm.weight"].contains(&part))
                    || (self.gemma
                        && ["post_attention_norm.weight", "post_ffw_norm.weight"].contains(&part))
            }
        }
    }
}

/// Sizes the forward pass uses on every token.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// Width of one attention head: `attention.key_length` where given (qwen3, gemma3 differ
    /// from hidden / heads), else hidden / heads.
    pub head_dim: usize,
    pub eps: f32,
}

impl Dims {
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// gemma3's local layers: all but every `pattern`-th attend to the last `window` positions
/// only and rotate with their own RoPE base.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sliding {
    pub window: usize,
    pub pattern: usize,
    pub base: f32,
}

impl Sliding {
    /// Whether block `i` is a sliding-window one (llama.cpp's `set_swa_pattern`).
    pub fn covers(&self, i: usize) -> bool {
        i % self.pattern < self.pattern - 1
    }
}

/// Everything read from the metadata.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub architecture: String,
    pub family: Family,
    pub dims: Dims,
    pub ffn: usize,
    pub blocks: usize,
    pub rope_base: f32,
    /// Linear RoPE scaling (`rope.scaling.factor`): positions are divided by it.
    pub rope_scale: f32,
    pub sliding: Option<Sliding>,
}

impl Config {
    pub fn read(content: &Content) -> Result<Config> {
        let architecture = match meta(content, "general.architecture")? {
            Value::String(s) => s.clone(),
            _ => bail!("`general.architecture` is not a string"),
        };
        let Some(family) = Family::of(&architecture) else {
            bail!("architecture `{architecture}` is not covered by this pass")
        };
        let key = |k: &str| format!("{architecture}.{k}");
        let u = |k: &str| usize_meta(content, &key(k));
        let f = |k: &str| float_meta(content, &key(k));
        let (hidden, heads) = (u("embedding_length")?, u("attention.head_count")?);
        let Some(split) = hidden.checked_div(heads) else { bail!("no attention heads") };
        let Some(embed) = content.tensor_infos.get("token_embd.weight") else {
            bail!("no `token_embd.weight` tensor")
        };
        let dims = Dims {
            vocab: embed.shape.dims().first().copied().unwrap_or(0),
            hidden,
            heads,
            kv_heads: u("attention.head_count_kv").unwrap_or(heads),
            head_dim: u("attention.key_length").unwrap_or(split),
            eps: f("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
                msg(format!("no `{}` metadata", key("attention.layer_norm_rms_epsilon")))
            })?,
        };
        let rope_scale = match string_meta(content, &key("rope.scaling.type")).as_deref() {
            Some("none") => 1.0,
            _ => match f("rope.scaling.factor")? {
                Some(s) if s > 0.0 => s,
                _ => f("rope.scale_linear")?.filter(|s| *s > 0.0).unwrap_or(1.0),
            },
        };
        let sliding = match (family.gemma, u("attention.sliding_window")) {
            (true, Ok(window)) if window > 0 => Some(Sliding {
                window,
                // llama.cpp fixes gemma3's pattern at 6; candle reads this key (tests set it).
                pattern: u("attention.sliding_window_type").unwrap_or(6).max(1),
                base: f("rope.local_freq_base")?.unwrap_or(10_000.0),
            }),
            _ => None,
        };
        Ok(Config {
            family,
            dims,
            ffn: u("feed_forward_length")?,
            blocks: u("block_count")?,
            rope_base: f("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scale,
            sliding,
            architecture,
        })
    }

    /// Whether the pass runs this file as its architecture means it: a known architecture
    /// without experts, RoPE over whole heads of even width, linear RoPE scaling at most, equal
    /// key and value widths, and no tensor the pass would ignore.
    pub fn covers(content: &Content) -> bool {
        let Ok(c) = Config::read(content) else { return false };
        let d = c.dims;
        let key = |k: &str| format!("{}.{k}", c.architecture);
        let u = |k: &str| usize_meta(content, &key(k)).ok();
        let scaling = string_meta(content, &key("rope.scaling.type"));
        u("expert_count").unwrap_or(0) == 0
            && d.kv_heads > 0
            && d.heads % d.kv_heads == 0
            && d.head_dim > 0
            && d.head_dim % 2 == 0
            && u("rope.dimension_count").unwrap_or(d.head_dim) == d.head_dim
            && u("attention.value_length").unwrap_or(d.head_dim) == d.head_dim
            && matches!(scaling.as_deref(), None | Some("none" | "linear"))
            // Gemma 3 27B scales attention by hidden / heads instead of the head width.
            && !(c.family.gemma && c.blocks == 62)
            && content.tensor_infos.keys().all(|name| c.family.knows(name))
    }
}

fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).ok_or_else(|| msg(format!("no `{key}` metadata")))
}

fn usize_meta(content: &Content, key: &str) -> Result<usize> {
    let v = meta(content, key)?;
    value_u32(v).map(|n| n as usize).ok_or_else(|| msg(format!("`{key}` is not an integer")))
}

/// A float where present (f32 or f64 in the file).
fn float_meta(content: &Content, key: &str) -> Result<Option<f32>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x)),
        Some(Value::F64(x)) => Ok(Some(*x as f32)),
        Some(_) => bail!("`{key}` is not a number"),
    }
}

fn string_meta(content: &Content, key: &str) -> Option<String> {
    match content.metadata.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
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

pub(crate) fn msg(m: String) -> candle_core::Error {
    candle_core::Error::Msg(m)
}
