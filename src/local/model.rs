//! The network itself: one of candle-transformers' quantized models, picked by the GGUF's
//! `general.architecture`.

use super::gguf::GgufFile;
use super::LocalError;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_qwen2, quantized_qwen3,
};
use edgechat_llama::Llama;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

pub(crate) const SUPPORTED: &str = "llama, qwen2, qwen3, gemma3";

/// Weights plus one sequence's KV cache. Cloning shares the weights (they sit behind `Arc`s)
/// and gives an independent cache once cleared — except qwen2, whose candle 0.11 model cannot
/// be cloned: its one model (and cache) is shared, so it runs one sequence at a time.
#[derive(Clone)]
pub(crate) enum Weights {
    /// Our own pass (the `edgechat-llama` crate): llama files on the CPU.
    Native(Llama),
    /// candle-transformers' llama: GPUs, the variants ours does not cover, and the reference.
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
        let native = device.is_cpu() && Llama::covers(&content) && !candle_llama_wanted();
        let loaded = guard(|| match architecture.as_str() {
            "llama" if native => Ok(Some((Weights::Native(Llama::load(&content, r)?), trained))),
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
            Some((w, 0)) => Err(LocalError::corrupt(&path, format!("no `{}` > 0", ctx_key(&w)))),
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

fn ctx_key(w: &Weights) -> &'static str {
    match w {
        Weights::Native(_) | Weights::Llama(_) => "llama.context_length",
        Weights::Qwen2(_) => "qwen2.context_length",
        Weights::Qwen3(_) => "qwen3.context_length",
        Weights::Gemma3(_) => "gemma3.context_length",
    }
}

/// `EDGECHAT_CANDLE_LLAMA=1` runs llama files through candle-transformers' model instead of
/// ours: for comparing the two (`cargo bench --bench local`), or to rule ours out.
fn candle_llama_wanted() -> bool {
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
