//! The network itself, picked by the GGUF's `general.architecture`: our own pass (the
//! `edgechat-llama` crate) on the CPU for the llama, qwen2, qwen3 and gemma3 files it covers,
//! else one of candle-transformers' quantized models.

use super::gguf::GgufFile;
use super::LocalError;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_qwen2, quantized_qwen3,
};
pub(crate) use edgechat_llama::Input;
use edgechat_llama::{Model, PrefixCache};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

pub(crate) const SUPPORTED: &str = "llama, qwen2, qwen3, gemma3";

/// Weights plus one sequence's KV cache. Cloning shares the weights (they sit behind `Arc`s)
/// and gives an independent cache once cleared — except qwen2, whose candle 0.11 model cannot
/// be cloned: its one model (and cache) is shared, so it runs one sequence at a time.
#[derive(Clone)]
pub(crate) enum Weights {
    /// Our own pass (the `edgechat-llama` crate): the files it covers, on the CPU.
    Native(Model),
    /// candle-transformers' models: GPUs, the files ours does not cover, and the reference.
    Llama(quantized_llama::ModelWeights),
    Qwen2(Arc<Mutex<quantized_qwen2::ModelWeights>>),
    Qwen3(quantized_qwen3::ModelWeights),
    Gemma3(quantized_gemma3::ModelWeights),
}

impl Weights {
    /// Reads every tensor; returns the weights and the longest sequence this implementation
    /// can hold (candle's llama precomputes RoPE for 4096 positions only).
    pub fn load(gguf: GgufFile, device: &Device) -> Result<(Self, usize), LocalError> {
        let architecture = gguf.architecture()?;
        let trained = gguf.u32(&format!("{architecture}.context_length")).unwrap_or(0) as usize;
        let GgufFile { path, content, mut reader } = gguf;
        let r = &mut reader;
        let native = device.is_cpu() && Model::covers(&content) && !candle_wanted();
        let loaded = guard(|| match architecture.as_str() {
            _ if native => {
                Ok(Some((Weights::Native(Model::load(&content, r.get_ref())?), trained)))
            }
            "llama" => Ok(Some((
                Weights::Llama(quantized_llama::ModelWeights::from_gguf(content, r, device)?),
                cap(trained, quantized_llama::MAX_SEQ_LEN),
            ))),
            "qwen2" => Ok(Some((
                Weights::Qwen2(Arc::new(Mutex::new(quantized_qwen2::ModelWeights::from_gguf(
                    content, r, device,
                )?))),
                trained,
            ))),
            "qwen3" => Ok(Some((
                Weights::Qwen3(quantized_qwen3::ModelWeights::from_gguf(content, r, device)?),
                trained,
            ))),
            "gemma3" => Ok(Some((
                Weights::Gemma3(quantized_gemma3::ModelWeights::from_gguf(content, r, device)?),
                cap(trained, quantized_gemma3::MAX_SEQ_LEN),
            ))),
            _ => Ok(None),
        })
        .map_err(|message| LocalError::Corrupt { path: path.clone(), message })?;
        match loaded {
            Some((_, 0)) => {
                Err(LocalError::corrupt(&path, format!("no `{architecture}.context_length` > 0")))
            }
            Some(found) => Ok(found),
            None => Err(LocalError::UnsupportedArchitecture {
                path,
                architecture,
                supported: SUPPORTED,
            }),
        }
    }

    /// Sequences this model can run at once: one for qwen2 (one shared cache), else `wanted`.
    pub fn batch_limit(&self, wanted: usize) -> usize {
        match self {
            Weights::Qwen2(_) => 1,
            _ => wanted,
        }
    }

    /// Most prompt tokens one forward pass takes. candle's gemma3 can mask a multi-token step
    /// only at position 0 (later, its mask and its cache differ in dtype), so its prompt goes
    /// in one pass; the others take `chunk` at a time.
    pub fn prefill_chunk(&self, chunk: usize) -> usize {
        match self {
            Weights::Gemma3(_) => usize::MAX,
            _ => chunk,
        }
    }

    /// A copy with an empty KV cache, for a new sequence.
    pub fn fresh(&self) -> Self {
        let mut w = self.clone();
        match &mut w {
            Weights::Native(m) => m.clear(),
            Weights::Llama(m) => m.clear_kv_cache(),
            Weights::Qwen2(m) => m.lock().unwrap_or_else(|p| p.into_inner()).clear_kv_cache(),
            Weights::Qwen3(m) => m.clear_kv_cache(),
            // gemma3 has no clear method; position 0 restarts its cache.
            Weights::Gemma3(_) => {}
        }
        w
    }

    /// A copy for a new sequence of `prompt`, and how many of the prompt's tokens its cache
    /// already holds: the longest prefix `prompts` has (our pass only), else none.
    pub fn resume(&self, prompt: &[u32], prompts: &mut PrefixCache) -> (Self, usize) {
        match self {
            Weights::Native(_) => match prompts.lookup(prompt) {
                Some((model, reused)) => (Weights::Native(model), reused),
                None => (self.fresh(), 0),
            },
            _ => (self.fresh(), 0),
        }
    }

    /// Offers this sequence's cache of `tokens` (those it holds) to `prompts`.
    pub fn keep(&self, tokens: &[u32], prompts: &mut PrefixCache) {
        if let Weights::Native(model) = self {
            prompts.insert(tokens, model);
        }
    }

    /// Bytes of this sequence's KV cache (our pass; candle's caches are not counted).
    pub fn kv_bytes(&self) -> usize {
        match self {
            Weights::Native(m) => m.kv_bytes(),
            _ => 0,
        }
    }

    /// Runs `tokens` at positions `pos..` and returns the logits for the last one.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        pos: usize,
        device: &Device,
    ) -> Result<Vec<f32>, LocalError> {
        guard(|| {
            let input = || Tensor::new(tokens, device)?.unsqueeze(0);
            let logits = match self {
                Weights::Native(m) => return m.forward(tokens, pos),
                Weights::Llama(m) => m.forward(&input()?, pos)?,
                Weights::Qwen2(m) => {
                    m.lock().unwrap_or_else(|p| p.into_inner()).forward(&input()?, pos)?
                }
                Weights::Qwen3(m) => m.forward(&input()?, pos)?,
                Weights::Gemma3(m) => m.forward(&input()?, pos)?,
            };
            logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
        })
        .map_err(LocalError::Generation)
    }
}

/// One step of several sequences of the same weights, each `(tokens, pos)` as in
/// [`Weights::forward`]: our pass reads each matrix once for all of them; candle's models
/// run them one after another. Each sequence's last logits, in order.
pub(crate) fn forward_batch(
    mut batch: Vec<&mut Weights>,
    inputs: &[Input],
    device: &Device,
) -> Result<Vec<Vec<f32>>, LocalError> {
    let native: Option<Vec<&mut Model>> = batch
        .iter_mut()
        .map(|w| match w {
            Weights::Native(m) => Some(m),
            _ => None,
        })
        .collect();
    if let Some(mut models) = native {
        return guard(|| Model::forward_batch(&mut models, inputs)).map_err(LocalError::Generation);
    }
    batch.into_iter().zip(inputs).map(|(w, i)| w.forward(i.tokens, i.pos, device)).collect()
}

/// `EDGECHAT_CANDLE_LLAMA=1` runs every file through candle-transformers' model of its
/// architecture instead of ours (the name predates qwen and gemma in our pass): for comparing
/// the two (`cargo bench --bench local`), or to rule ours out.
fn candle_wanted() -> bool {
    std::env::var_os("EDGECHAT_CANDLE_LLAMA").is_some_and(|v| v == "1")
}

fn cap(trained: usize, implemented: usize) -> usize {
    trained.min(implemented)
}

/// Runs candle code, turning both its errors and any panic (a malformed tensor shape can trip
/// an assertion deep inside) into a message.
fn guard<T>(f: impl FnOnce() -> candle_core::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(match panic.downcast_ref::<&str>() {
            Some(s) => format!("internal error: {s}"),
            None => match panic.downcast_ref::<String>() {
                Some(s) => format!("internal error: {s}"),
                None => "internal error".to_owned(),
            },
        }),
    }
}

/// What runs the matrices on `device`: the CPU kernels' instruction set (`avx2`,
/// `portable`, ...: [`edgechat_llama::Isa`], detected once), or the GPU backend.
pub(crate) fn kernels(device: &Device) -> &'static str {
    match device {
        Device::Cpu => edgechat_llama::Isa::get().name(),
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    }
}

/// The device the `cuda` / `metal` features ask for, else the CPU.
pub(crate) fn device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    #[cfg(feature = "metal")]
    if let Ok(d) = Device::new_metal(0) {
        return d;
    }
    Device::Cpu
}

#[cfg(test)]
#[path = "../../tests/common_local/mod.rs"]
mod common_local;

#[cfg(test)]
mod tests {
    use super::common_local::{write_tiny_model, Tiny};
    use super::*;

    #[test]
    fn every_covered_architecture_runs_our_pass_on_the_cpu_with_a_full_batch() {
        for architecture in ["llama", "qwen2", "qwen3", "gemma3"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            write_tiny_model(&path, &Tiny { architecture, ..Tiny::default() });
            let gguf = GgufFile::open(&path).unwrap();
            let (weights, context) = Weights::load(gguf, &Device::Cpu).unwrap();
            assert!(matches!(weights, Weights::Native(_)), "{architecture}");
            assert_eq!((weights.batch_limit(4), context), (4, 96), "{architecture}");
        }
    }
}
