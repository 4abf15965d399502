//! Q4_1 weights times f32 activations on the CPU. candle 0.11 has no SIMD kernel for Q4_1 (the
//! default model's 210 matrices), so its matmul runs a scalar loop there; this one uses AVX2
//! where the build has it, reads each weight block once per tile of up to four activation rows
//! (prefill), and splits output columns over candle's worker pool.
//!
//! The arithmetic is ggml's: activations are quantized per 32-value block to 8 bits with a
//! scale `d` and `s = d · Σq`, so a block's dot product is `dw·da·Σ(qw·qa) + mw·s`.

use candle_core::utils::barrier_pool;
use half::f16;

/// Values per block, in weights and in quantized activations alike.
const QK: usize = 32;
/// Bytes of one Q4_1 block in the GGUF: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Activation rows that share one pass over a weight column.
const ROW_TILE: usize = 4;

/// One block as stored: weight `j` is `d·q + m`, `q` the low nibble of `qs[j]` for `j < 16` and
/// the high nibble of `qs[j-16]` otherwise.
#[derive(Clone, Copy)]
#[repr(C)]
struct Block {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// A block of activations quantized to 8 bits.
#[derive(Clone, Copy)]
#[repr(C)]
struct Quantized {
    qs: [i8; QK],
    d: f32,
    /// `d · Σ qs`, which the weights' minimum multiplies.
    s: f32,
}

/// An `n × k` Q4_1 matrix (GGUF's layout: one row of `k` weights per output).
pub(crate) struct Q41Matrix {
    n: usize,
    k: usize,
    blocks: Vec<Block>,
}

impl Q41Matrix {
    /// Takes the raw bytes of a Q4_1 tensor of shape `(n, k)`; `None` if they do not fit it.
    pub fn from_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k == 0 || k % QK != 0 || bytes.len() != n * k / QK * BLOCK_BYTES {
            return None;
        }
        let blocks = bytes
            .chunks_exact(BLOCK_BYTES)
            .map(|b| Block {
                d: f16::from_le_bytes([b[0], b[1]]),
                m: f16::from_le_bytes([b[2], b[3]]),
                qs: b[4..20].try_into().expect("16 bytes"),
            })
            .collect();
        Some(Q41Matrix { n, k, blocks })
    }

    /// Output rows; the inputs per row are the `k` it was made with.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// One matrix whose outputs are those of `parts` in turn; `None` unless all have the same `k`.
    pub fn stack(parts: &[&Q41Matrix]) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let blocks = parts.iter().flat_map(|p| p.blocks.iter().copied()).collect();
        Some(Q41Matrix { n: parts.iter().map(|p| p.n).sum(), k, blocks })
    }

    /// `x` (`m × k`, row-major) times this matrix transposed: `m × n`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let m = x.len() / k;
        debug_assert_eq!(m * k, x.len());
        let nb = k / QK;
        let xq: Vec<Quantized> = x.chunks_exact(QK).map(quantize).collect();
        let mut out = vec![0f32; m * n];
        let dst = Disjoint::new(&mut out);
        barrier_pool().execute_chunked(n, |cols| {
            for col in cols {
                let w = &self.blocks[col * nb..(col + 1) * nb];
                for (tile, rows) in xq.chunks(ROW_TILE * nb).enumerate() {
                    let sums = dot_tile(w, rows, nb);
                    for (r, v) in sums.iter().take(rows.len() / nb).enumerate() {
                        // SAFETY: each (row, col) is written by the one worker that owns `col`.
                        unsafe { dst.slice((tile * ROW_TILE + r) * n + col, 1)[0] = *v };
                    }
                }
            }
        });
        out
    }
}

/// An output buffer that pool workers fill at disjoint indices; borrowing it for the whole
/// pool call keeps it alive until every worker is done.
pub(crate) struct Disjoint<'a>(*mut f32, usize, std::marker::PhantomData<&'a mut [f32]>);
// SAFETY: callers of `slice` promise disjoint ranges, so no element is shared between threads.
unsafe impl Sync for Disjoint<'_> {}

impl<'a> Disjoint<'a> {
    pub fn new(buf: &'a mut [f32]) -> Self {
        Disjoint(buf.as_mut_ptr(), buf.len(), std::marker::PhantomData)
    }

    /// # Safety
    /// No other worker may use any index in `start..start + len` during this pool call.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1, "{start}+{len} out of {}", self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// ggml's 8-bit block quantization: scale by the largest magnitude to ±127, round to nearest.
fn quantize(x: &[f32]) -> Quantized {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
        sum += i32::from(*q);
    }
    Quantized { qs, d, s: d * sum as f32 }
}

/// Dot products of one weight row with up to `ROW_TILE` activation rows of `nb` blocks each.
#[inline(always)]
fn dot_tile(w: &[Block], rows: &[Quantized], nb: usize) -> [f32; ROW_TILE] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: the build guarantees AVX2 and FMA (see .cargo/config.toml).
        unsafe { avx2::dot_tile(w, rows, nb) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    {
        scalar_dot_tile(w, rows, nb)
    }
}

/// The reference the SIMD path is tested against, and the path for builds without AVX2.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2", not(test)), allow(dead_code))]
fn scalar_dot_tile(w: &[Block], rows: &[Quantized], nb: usize) -> [f32; ROW_TILE] {
    let mut out = [0f32; ROW_TILE];
    for (r, row) in rows.chunks_exact(nb).enumerate() {
        for (b, a) in w.iter().zip(row) {
            let mut sum = 0i32;
            for j in 0..QK / 2 {
                let lo = i32::from(b.qs[j] & 0x0F);
                let hi = i32::from(b.qs[j] >> 4);
                sum += lo * i32::from(a.qs[j]) + hi * i32::from(a.qs[j + QK / 2]);
            }
            out[r] += sum as f32 * b.d.to_f32() * a.d + b.m.to_f32() * a.s;
        }
    }
    out
}

/// Compiled only when the whole build targets AVX2 and FMA (x86-64-v3), so these need no
/// `#[target_feature]` of their own and inline into the pool's loop like plain code.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod avx2 {
    use super::{Block, Quantized, ROW_TILE};
    use std::arch::x86_64::*;

    /// A block's 32 nibbles as bytes, in activation order (low nibbles first).
    #[inline(always)]
    unsafe fn unpack(b: &Block) -> __m256i {
        let mask = _mm_set1_epi8(0x0F);
        let raw = _mm_loadu_si128(b.qs.as_ptr().cast());
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// `Σ q·y` of one block pair, as eight partial sums in floats.
    #[inline(always)]
    unsafe fn block_dot(q: __m256i, a: &Quantized) -> __m256 {
        let y = _mm256_loadu_si256(a.qs.as_ptr().cast());
        let pairs = _mm256_maddubs_epi16(q, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// Unpacks each weight block once and multiplies it into every activation row.
    #[inline(always)]
    pub(super) unsafe fn dot_tile(w: &[Block], rows: &[Quantized], nb: usize) -> [f32; ROW_TILE] {
        let n_rows = rows.len() / nb;
        let mut acc = [_mm256_setzero_ps(); ROW_TILE];
        let mut mins = [0f32; ROW_TILE];
        for (i, b) in w.iter().enumerate() {
            let q = unpack(b);
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            for r in 0..n_rows {
                let a = &rows[r * nb + i];
                acc[r] = _mm256_fmadd_ps(block_dot(q, a), _mm256_set1_ps(d * a.d), acc[r]);
                mins[r] += m * a.s;
            }
        }
        let mut out = [0f32; ROW_TILE];
        for r in 0..n_rows {
            out[r] = hsum(acc[r]) + mins[r];
        }
        out
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// A random `(n, k)` matrix quantized to Q4_1 by candle, as ours and as candle's.
    fn matrix(n: usize, k: usize) -> (Q41Matrix, QTensor) {
        let t = Tensor::from_vec(random(n * k, 3), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        (Q41Matrix::from_bytes(&q.data().unwrap(), n, k).unwrap(), q)
    }

    #[test]
    fn agrees_with_candle_for_one_row_and_for_a_ragged_tile() {
        let (n, k) = (70, 128);
        let (ours, theirs) = matrix(n, k);
        let theirs = QMatMul::from_qtensor(theirs).unwrap();
        for m in [1, 6] {
            let x = random(m * k, 11 + m as u64);
            let got = ours.matmul(&x);
            let xt = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
            let want: Vec<f32> =
                theirs.forward(&xt).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // candle rounds the activation scales to f16; ours keeps f32.
                assert!((g - w).abs() < 2e-2 * (1.0 + w.abs()), "m={m} [{i}]: {g} vs {w}");
            }
        }
    }

    #[test]
    fn the_simd_path_equals_the_scalar_one() {
        let (w, _) = matrix(1, 128);
        let xq: Vec<Quantized> = random(3 * 128, 5).chunks_exact(QK).map(quantize).collect();
        let (simd, scalar) = (dot_tile(&w.blocks, &xq, 4), scalar_dot_tile(&w.blocks, &xq, 4));
        for (a, b) in simd.iter().zip(&scalar) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn refuses_bytes_that_do_not_fit_the_shape() {
        assert!(Q41Matrix::from_bytes(&[0; 40], 1, 64).is_some());
        assert!(Q41Matrix::from_bytes(&[0; 40], 2, 64).is_none());
        assert!(Q41Matrix::from_bytes(&[0; 20], 1, 20).is_none());
    }
}
