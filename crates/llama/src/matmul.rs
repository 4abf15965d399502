//! Weight matrices times activations: each matrix through our kernel for its block format
//! (`quant`), or candle's quantized matmul for the types we have no kernel for (F16, F32,
//! the 2- and 3-bit K-quants).

pub(crate) use crate::quant::Disjoint;
use crate::quant::{self, Format, QMatrix};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

/// A matrix of the model.
pub(crate) enum Linear {
    Quant(QMatrix),
    Candle { matmul: QMatMul, k: usize },
}

impl Linear {
    /// Our kernel where the tensor's type has one, else candle's matmul.
    pub fn new(t: Arc<QTensor>) -> Result<Self> {
        let (n, k) = t.shape().dims2()?;
        if let Some(format) = Format::of(t.dtype()) {
            if let Some(m) = QMatrix::new(format, t.data()?.into_owned(), n, k) {
                return Ok(Linear::Quant(m));
            }
        }
        Ok(Linear::Candle { matmul: QMatMul::from_arc(t)?, k })
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
    pub fn new(parts: Vec<QTensor>) -> Result<Self> {
        let parts = parts.into_iter().map(|t| Linear::new(Arc::new(t))).collect::<Result<_>>()?;
        Ok(Fused(parts))
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
