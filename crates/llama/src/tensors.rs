//! Tensors read in place from the memory-mapped GGUF file: matrices in our formats are used
//! where they lie (the page cache holds them once, shared by every process that maps the
//! file, and loading touches none of them), so peak memory is the file plus the KV cache.
//! Only tensors of types our kernels lack are copied, into candle's `QTensor`.
//!
//! Like llama.cpp, this assumes the file is not rewritten while mapped: replace model files
//! by renaming a new one into place (as `edgechat model pull` does), never in place.

use crate::config::msg;
use crate::quant::{self, Bytes, Format};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, Device, Result};
use memmap2::Mmap;
use std::fs::File;
use std::sync::Arc;

/// The model file, mapped, with its parsed header.
pub(crate) struct Tensors<'a> {
    content: &'a Content,
    map: Arc<Mmap>,
}

/// One tensor's type, shape and bytes (in the map).
#[derive(Clone)]
pub(crate) struct View {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub bytes: Bytes,
}

impl<'a> Tensors<'a> {
    /// Maps `file`, whose header is `content`.
    pub fn open(content: &'a Content, file: &File) -> Result<Self> {
        // SAFETY: the file is only read, and must not be rewritten in place while mapped (see
        // the module's doc): a model file is replaced by renaming a new one over it.
        let map = unsafe { Mmap::map(file)? };
        Ok(Tensors { content, map: Arc::new(map) })
    }

    /// Tensor `name`, which must have `shape` (a wrong one would otherwise fail deep inside a
    /// matmul).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<View> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            bail!("no `{name}` tensor in the file")
        };
        let dims = info.shape.dims().to_vec();
        if dims != shape {
            bail!("`{name}` has shape {dims:?}; the metadata implies {shape:?}")
        }
        let dtype = info.ggml_dtype;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let at = self.content.tensor_data_offset + info.offset;
        let end = usize::try_from(at).ok().and_then(|at| at.checked_add(len));
        match end {
            Some(end) if end <= self.map.len() => {
                let bytes = Bytes::mapped(self.map.clone(), end - len, len);
                Ok(View { dtype, dims, bytes })
            }
            _ => bail!("`{name}` lies past the end of the file (is it truncated?)"),
        }
    }

    /// A tensor the file may leave out.
    pub fn get_if(&self, name: &str, shape: &[usize]) -> Result<Option<View>> {
        match self.content.tensor_infos.contains_key(name) {
            true => self.get(name, shape).map(Some),
            false => Ok(None),
        }
    }

    /// A vector (norm weights, biases) as floats.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.get(name, &[len])?.to_f32()
    }
}

impl View {
    /// Every value as a float: F32 and F16 as they are, our formats through our dequantizer,
    /// anything else through candle.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = &self.bytes[..];
        match self.dtype {
            GgmlDType::F32 => Ok(b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            GgmlDType::F16 => Ok(b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            dtype => match Format::of(dtype) {
                Some(format) => {
                    let mut out = vec![0f32; self.dims.iter().product()];
                    quant::dequantize(format, b, &mut out);
                    Ok(out)
                }
                None => self.qtensor()?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1(),
            },
        }
    }

    /// A copy as candle's quantized tensor, for the types our kernels lack.
    pub fn qtensor(&self) -> Result<QTensor> {
        qtensor_from_ggml(self.dtype, &self.bytes, self.dims.clone(), &Device::Cpu)
    }

    /// The `(rows, columns)` of a matrix.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims[..] {
            [n, k] => Ok((n, k)),
            _ => Err(msg(format!("a matrix was expected, not shape {:?}", self.dims))),
        }
    }
}
