//! Weight matrices times activations: each matrix through our kernel for its block format
//! (`quant`), or candle's quantized matmul for the types we have no kernel for (F16, F32,
//! the 2- and 3-bit K-quants).

pub(crate) use crate::quant::Disjoint;
use crate::quant::{self, Format, QMatrix};
use crate::tensors::View;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

/// A matrix of the model.
pub(crate) enum Linear {
    Quant(QMatrix),
    Candle { matmul: QMatMul, k: usize },
}

impl Linear {
    /// Our kernel on the bytes in place where the tensor's type has one, else candle's
    /// matmul on a copy.
    pub fn new(t: View) -> Result<Self> {
        let (n, k) = t.dims2()?;
        if let Some(m) = Format::of(t.dtype).and_then(|f| QMatrix::new(f, t.bytes.clone(), n, k)) {
            return Ok(Linear::Quant(m));
        }
        Ok(Linear::Candle { matmul: QMatMul::from_arc(Arc::new(t.qtensor()?))?, k })
    }

    /// `x` (`m × k`, row-major) times this matrix transposed: `m × n`.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        match self {
            Linear::Quant(m) => Ok(quant::matmul(&[m], x).remove(0)),
            Linear::Candle { matmul, k } => {
                let x = Tensor::from_slice(x, (x.len() / k, *k), &Device::Cpu)?;
                matmul.forward(&x)?.flatten_all()?.to_vec1()
            }
        }
    }
}

/// Matrices that read the same input (Q, K, V; gate and up): those our kernels take run in
/// one pass over the worker pool instead of one each, whatever their formats.
pub(crate) struct Fused(Vec<Linear>);

impl Fused {
    pub fn new(parts: Vec<View>) -> Result<Self> {
        Ok(Fused(parts.into_iter().map(Linear::new).collect::<Result<_>>()?))
    }

    /// Each matrix's output, in the order given.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let ours: Vec<&QMatrix> = self
            .0
            .iter()
            .filter_map(|p| match p {
                Linear::Quant(m) => Some(m),
                Linear::Candle { .. } => None,
            })
            .collect();
        let mut ours = quant::matmul(&ours, x).into_iter();
        self.0
            .iter()
            .map(|p| match p {
                Linear::Quant(_) => Ok(ours.next().expect("one output per matrix")),
                Linear::Candle { .. } => p.forward(x),
            })
            .collect()
    }
}

/// The token embedding: rows looked up and dequantized one by one, never the whole matrix
/// (as f32 it would be 4–8× the file's bytes for it).
pub(crate) enum Embedding {
    Quant(QMatrix),
    Candle(QTensor),
}

impl Embedding {
    pub fn new(t: &View) -> Result<Self> {
        let (n, k) = t.dims2()?;
        match Format::of(t.dtype).and_then(|f| QMatrix::in_place(f, t.bytes.clone(), n, k)) {
            Some(m) => Ok(Embedding::Quant(m)),
            None => Ok(Embedding::Candle(t.qtensor()?)),
        }
    }

    /// The rows of `ids`, one after another.
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Embedding::Quant(m) => {
                Ok(ids.iter().flat_map(|&i| m.dequantize_row(i as usize)).collect())
            }
            Embedding::Candle(t) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                t.embedding(&ids)?.flatten_all()?.to_vec1()
            }
        }
    }
}
