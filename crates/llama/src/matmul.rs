//! Weight matrices times activations: each matrix through the kernel for its block format,
//! the CPU's best instruction set chosen once at start ([`crate::Isa`]).

pub(crate) use crate::q4_1::Disjoint;
use crate::q4_1::Q41Matrix;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use std::sync::Arc;

/// A matrix: Q4_1 through our kernel, anything else through candle's.
pub(crate) enum Linear {
    Q41(Q41Matrix),
    Candle { matmul: QMatMul, k: usize },
}

impl Linear {
    pub fn new(t: Arc<QTensor>) -> Result<Self> {
        let (n, k) = t.shape().dims2()?;
        if t.dtype() == GgmlDType::Q4_1 {
            if let Some(m) = Q41Matrix::from_bytes(&t.data()?, n, k) {
                return Ok(Linear::Q41(m));
            }
        }
        Ok(Linear::Candle { matmul: QMatMul::from_arc(t)?, k })
    }

    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        match self {
            Linear::Q41(m) => Ok(m.matmul(x)),
            Linear::Candle { matmul, k } => {
                let x = Tensor::from_slice(x, (x.len() / k, *k), &Device::Cpu)?;
                matmul.forward(&x)?.flatten_all()?.to_vec1()
            }
        }
    }
}

/// Matrices that read the same input. Where all are Q4_1 they are stacked into one, which
/// costs one pass over the worker pool instead of one each.
pub(crate) enum Fused {
    Stacked { matrix: Q41Matrix, widths: Vec<usize> },
    Apart(Vec<Linear>),
}

impl Fused {
    pub fn new(parts: Vec<QTensor>) -> Result<Self> {
        let parts: Vec<Linear> =
            parts.into_iter().map(|t| Linear::new(Arc::new(t))).collect::<Result<_>>()?;
        let q41: Vec<&Q41Matrix> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Q41(m) => Some(m),
                Linear::Candle { .. } => None,
            })
            .collect();
        match (q41.len() == parts.len()).then(|| Q41Matrix::stack(&q41)).flatten() {
            Some(matrix) => {
                Ok(Fused::Stacked { matrix, widths: q41.iter().map(|m| m.rows()).collect() })
            }
            None => Ok(Fused::Apart(parts)),
        }
    }

    /// Each matrix's output, in the order given.
    pub fn forward(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        let (matrix, widths) = match self {
            Fused::Apart(parts) => return parts.iter().map(|p| p.forward(x)).collect(),
            Fused::Stacked { matrix, widths } => (matrix, widths),
        };
        let out = matrix.matmul(x);
        let mut parts: Vec<Vec<f32>> = Vec::with_capacity(widths.len());
        let mut offset = 0;
        for &w in widths {
            let part = out.chunks_exact(matrix.rows()).flat_map(|row| &row[offset..offset + w]);
            parts.push(part.copied().collect());
            offset += w;
        }
        Ok(parts)
    }
}
