//! Quantized weight matrices times f32 activations on the CPU, for the GGUF block formats
//! people download (Q4_0, Q4_1, Q5_0, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K that make up
//! Q4_K_M and Q5_K_M files). candle 0.11 runs most of these one activation row at a time and
//! picks its SIMD code at compile time; ours reads each weight block once per tile of up to
//! [`TILE`] activation rows and picks its kernels at run time ([`crate::Isa`]).
//!
//! The arithmetic is ggml's: activations are quantized per block to 8 bits, so each block's
//! dot product is an integer sum scaled once. Weights stay in the file's bytes, unpacked in
//! registers as they are read, except where a kernel reads them regrouped (`regroup.rs`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
mod regroup;
mod scalar;

pub(crate) use scalar::dequantize;
mod unpack;

use crate::Isa;
use candle_core::quantized::GgmlDType;
use candle_core::utils::barrier_pool;
use half::f16;
use memmap2::Mmap;
use std::ops::Range;
use std::sync::Arc;

/// Activation rows that share one read of a weight row.
pub(crate) const TILE: usize = 4;

/// A GGUF block format our kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    /// The format for a candle dtype; `None` for those candle's own matmul keeps.
    pub fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// Weights per block.
    pub fn block(self) -> usize {
        if self.wide() {
            256
        } else {
            32
        }
    }

    /// Bytes per block, as stored in the file.
    pub fn bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q5_0 => 22,
            Format::Q8_0 => 34,
            Format::Q4K => 144,
            Format::Q5K => 176,
            Format::Q6K => 210,
        }
    }

    /// K-quants: 256-weight super-blocks, multiplied with [`Q8K`] activations.
    fn wide(self) -> bool {
        matches!(self, Format::Q4K | Format::Q5K | Format::Q6K)
    }

    fn kernel(self, isa: Isa) -> Kernel {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::kernel(self),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon | Isa::NeonDot => neon::kernel(self, isa == Isa::NeonDot),
            _ => scalar::kernel(self),
        }
    }
}

/// 32 activations quantized to 8 bits: value `j` is `d · qs[j]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8 {
    pub qs: [i8; 32],
    pub d: f32,
    /// `d · Σ qs`: what a weight format's offset or minimum multiplies.
    pub s: f32,
}

/// 256 activations quantized to 8 bits with one scale, and the sum of each 16.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8K {
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
    pub d: f32,
}

/// Dot products of one weight row (`nb` blocks) with `rows ≤ TILE` activation rows of `nb`
/// blocks each, laid out one row after another.
pub(crate) type NarrowDot = fn(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [f32; TILE];
/// The same for K-quants.
pub(crate) type WideDot = fn(w: &[u8], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE];

#[derive(Clone, Copy)]
pub(crate) enum Kernel {
    Narrow(NarrowDot),
    Wide(WideDot),
}

/// Dot products of one K-quant weight row already [`unpack`]ed with up to `TILE` rows.
pub(crate) type UnpackedDot =
    fn(w: &[unpack::Unpacked], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE];

/// Activation rows from which a K-quant matrix is unpacked column by column before the
/// tiles read it: unpacking costs about as much as one tile, so it pays from a few tiles on.
const UNPACK_FROM_ROWS: usize = 3 * TILE;
/// Columns unpacked at a time: their unpacked rows stay in L2 while one tile of activations
/// (up to 4 × 8 KiB for the widest matrices) stays in L1 across them.
const UNPACK_COLUMNS: usize = 8;

/// An `n × k` matrix in one of our formats (GGUF's layout: a row of `k` weights per output).
#[derive(Clone)]
pub(crate) struct QMatrix {
    format: Format,
    n: usize,
    k: usize,
    data: Bytes,
    kernel: Kernel,
    unpacked: Option<UnpackedDot>,
    /// Set where `data` holds the [`regroup`]ed layout this kernel reads.
    grouped: Option<regroup::GroupedDot>,
}

/// A tensor's bytes: in the memory-mapped file, or owned (tests, candle's quantizer).
#[derive(Clone)]
pub(crate) enum Bytes {
    Owned(Arc<[u8]>),
    Mapped {
        map: Arc<Mmap>,
        at: usize,
        len: usize,
    },
    /// A copy of our own in anonymous memory (regrouped weights).
    Anon(Arc<Mmap>),
}

impl Bytes {
    /// `len` bytes at `at` in `map` (the caller checked they lie inside it).
    pub fn mapped(map: Arc<Mmap>, at: usize, len: usize) -> Self {
        assert!(at + len <= map.len(), "a tensor past the end of the map");
        Bytes::Mapped { map, at, len }
    }

    /// Drops the mapped pages of `range` from this process once a copy replaced them, so
    /// they stop counting in its resident memory (the page cache keeps them; a later read
    /// maps them again).
    fn release(&self, range: Range<usize>) {
        if let Bytes::Mapped { map, at, .. } = self {
            // SAFETY: the map is read-only, so dropped pages read back as the same bytes.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    at + range.start,
                    range.len(),
                )
            };
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes::Owned(v.into())
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped { map, at, len } => &map[*at..*at + *len],
            Bytes::Anon(map) => map,
        }
    }
}

impl QMatrix {
    /// Takes the raw bytes of a tensor of shape `(n, k)`; `None` if they do not fit it.
    /// Regroups them where this CPU's kernel for the format reads another layout.
    pub fn new(format: Format, data: impl Into<Bytes>, n: usize, k: usize) -> Option<Self> {
        Self::with_isa(format, data.into(), n, k, Isa::get())
    }

    /// The same, never regrouped: for a matrix whose rows are only looked up (an untied
    /// embedding), which then costs no load time and no memory beyond the rows read.
    pub fn in_place(format: Format, data: impl Into<Bytes>, n: usize, k: usize) -> Option<Self> {
        Self::build(format, data.into(), n, k, Isa::get(), false)
    }

    pub(crate) fn with_isa(
        format: Format,
        data: Bytes,
        n: usize,
        k: usize,
        isa: Isa,
    ) -> Option<Self> {
        Self::build(format, data, n, k, isa, true)
    }

    fn build(
        format: Format,
        data: Bytes,
        n: usize,
        k: usize,
        isa: Isa,
        may_regroup: bool,
    ) -> Option<Self> {
        let fits = k > 0 && k % format.block() == 0;
        if !fits || data.len() != n * k / format.block() * format.bytes() {
            return None;
        }
        let unpacked = format.wide().then(|| unpack::kernel(isa)).flatten();
        let grouped = (may_regroup && n % regroup::GROUP == 0)
            .then(|| regroup::kernel(format, isa))
            .flatten();
        let data = match grouped {
            Some(_) => regroup::regroup(format, &data, n, k),
            None => data,
        };
        Some(QMatrix { format, n, k, data, kernel: format.kernel(isa), unpacked, grouped })
    }

    fn row_bytes(&self) -> usize {
        self.k / self.format.block() * self.format.bytes()
    }

    fn row(&self, i: usize) -> &[u8] {
        &self.data[i * self.row_bytes()..][..self.row_bytes()]
    }

    /// Row `i` as floats (an embedding lookup).
    pub fn dequantize_row(&self, i: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.k];
        match self.grouped {
            Some(_) => {
                let (group, mut row) = (regroup::GROUP * self.row_bytes(), Vec::new());
                let bytes = &self.data[i / regroup::GROUP * group..][..group];
                regroup::ungroup_row(self.format, bytes, i % regroup::GROUP, &mut row);
                scalar::dequantize(self.format, &row, &mut out);
            }
            None => scalar::dequantize(self.format, self.row(i), &mut out),
        }
        out
    }
}

/// `x` (`m × k`, row-major) times each of `parts` transposed, in one pass over the worker
/// pool: part `i`'s result is `m × n_i`. All parts must share `k`.
pub(crate) fn matmul(parts: &[&QMatrix], x: &[f32]) -> Vec<Vec<f32>> {
    let Some(k) = parts.first().map(|p| p.k) else { return Vec::new() };
    assert!(parts.iter().all(|p| p.k == k) && x.len() % k == 0, "inputs of the wrong width");
    let m = x.len() / k;
    let narrow: Vec<Q8> = match parts.iter().any(|p| !p.format.wide()) {
        true => x.chunks_exact(32).map(quantize).collect(),
        false => Vec::new(),
    };
    let wide: Vec<Q8K> = match parts.iter().any(|p| p.format.wide()) && k % 256 == 0 {
        true => x.chunks_exact(256).map(quantize_k).collect(),
        false => Vec::new(),
    };
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|p| vec![0f32; m * p.n]).collect();
    let dsts: Vec<Disjoint> = outs.iter_mut().map(|o| Disjoint::new(o)).collect();
    let starts: Vec<usize> = parts
        .iter()
        .scan(0, |at, p| {
            *at += p.n;
            Some(*at - p.n)
        })
        .collect();
    let total = starts.last().unwrap_or(&0) + parts.last().map_or(0, |p| p.n);
    barrier_pool().execute_chunked(total, |cols| {
        // A chunk may straddle parts: run each part's share of it.
        for (i, part) in parts.iter().enumerate() {
            let own = starts[i]..starts[i] + part.n;
            let (lo, hi) = (cols.start.max(own.start), cols.end.min(own.end));
            if lo < hi {
                let range = lo - own.start..hi - own.start;
                part.columns(range, m, &narrow, &wide, &dsts[i]);
            }
        }
    });
    outs
}

impl QMatrix {
    /// Output columns `cols` for every activation row, `TILE` rows per read of a weight row.
    fn columns(&self, cols: Range<usize>, m: usize, narrow: &[Q8], wide: &[Q8K], dst: &Disjoint) {
        if let (Some(dot), true) = (self.unpacked, m >= UNPACK_FROM_ROWS) {
            return self.unpacked_columns(dot, cols, m, wide, dst);
        }
        if let Some(dot) = self.grouped {
            return self.grouped_columns(dot, cols, m, narrow, dst);
        }
        let nb = self.k / self.format.block();
        for col in cols {
            let w = self.row(col);
            for first in (0..m).step_by(TILE) {
                let rows = TILE.min(m - first);
                let sums = match self.kernel {
                    Kernel::Narrow(dot) => {
                        dot(w, &narrow[first * nb..(first + rows) * nb], nb, rows)
                    }
                    Kernel::Wide(dot) => dot(w, &wide[first * nb..(first + rows) * nb], nb, rows),
                };
                self.store(dst, first, col, &sums[..rows]);
            }
        }
    }

    /// Prefill of K-quants: [`UNPACK_COLUMNS`] weight rows unpacked to bytes and ready-made
    /// scale vectors, then every tile of activation rows against each of them.
    fn unpacked_columns(
        &self,
        dot: UnpackedDot,
        cols: Range<usize>,
        m: usize,
        acts: &[Q8K],
        dst: &Disjoint,
    ) {
        let nb = self.k / 256;
        let mut scratch = vec![unpack::Unpacked::default(); UNPACK_COLUMNS * nb];
        for first_col in cols.clone().step_by(UNPACK_COLUMNS) {
            let chunk = first_col..cols.end.min(first_col + UNPACK_COLUMNS);
            for (col, out) in chunk.clone().zip(scratch.chunks_exact_mut(nb)) {
                unpack::unpack(self.format, self.row(col), out);
            }
            for first in (0..m).step_by(TILE) {
                let rows = TILE.min(m - first);
                let tile = &acts[first * nb..(first + rows) * nb];
                for (col, w) in chunk.clone().zip(scratch.chunks_exact(nb)) {
                    self.store(dst, first, col, &dot(w, tile, nb, rows)[..rows]);
                }
            }
        }
    }

    /// Regrouped matrices: the groups of [`regroup::GROUP`] rows that start in `cols` (so
    /// that every group has one owner however the pool splits the columns).
    fn grouped_columns(
        &self,
        dot: regroup::GroupedDot,
        cols: Range<usize>,
        m: usize,
        acts: &[Q8],
        dst: &Disjoint,
    ) {
        let (g, nb) = (regroup::GROUP, self.k / 32);
        for group in cols.start.div_ceil(g)..cols.end.div_ceil(g) {
            let w = &self.data[group * g * self.row_bytes()..][..g * self.row_bytes()];
            for first in (0..m).step_by(TILE) {
                let rows = TILE.min(m - first);
                let sums = dot(w, &acts[first * nb..(first + rows) * nb], nb, rows);
                for (r, sums) in sums[..rows].iter().enumerate() {
                    // SAFETY: this worker owns the group's columns (see above).
                    unsafe { dst.slice((first + r) * self.n + group * g, g) }.copy_from_slice(sums);
                }
            }
        }
    }

    /// Writes one column's sums for activation rows `first..`.
    #[inline(always)]
    fn store(&self, dst: &Disjoint, first: usize, col: usize, sums: &[f32]) {
        for (r, v) in sums.iter().enumerate() {
            // SAFETY: each (row, col) is written by the one worker that owns `col`.
            unsafe { dst.slice((first + r) * self.n + col, 1)[0] = *v };
        }
    }
}

/// An output buffer that pool workers fill at disjoint indices; borrowing it for the whole
/// pool call keeps it alive until every worker is done.
pub(crate) struct Disjoint<'a, T = f32>(*mut T, usize, std::marker::PhantomData<&'a mut [T]>);
// SAFETY: callers of `slice` promise disjoint ranges, so no element is shared between threads.
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(buf: &'a mut [T]) -> Self {
        Disjoint(buf.as_mut_ptr(), buf.len(), std::marker::PhantomData)
    }

    /// # Safety
    /// No other worker may use any index in `start..start + len` during this pool call.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.1, "{start}+{len} out of {}", self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Activations of a 32-weight format's block.
fn quantize(x: &[f32]) -> Q8 {
    let mut qs = [0i8; 32];
    let d = crate::vector::quantize(x, &mut qs);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    Q8 { qs, d, s: d * sum as f32 }
}

/// Activations of a K-quant's block, with the sum of each 16.
fn quantize_k(x: &[f32]) -> Q8K {
    let mut qs = [0i8; 256];
    let d = crate::vector::quantize(x, &mut qs);
    let mut bsums = [0i16; 16];
    for (b, group) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *b = group.iter().map(|&q| i16::from(q)).sum();
    }
    Q8K { qs, bsums, d }
}

/// A little-endian f16 at `at`.
#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and minimum of each of a Q4_K/Q5_K block's eight sub-blocks, from their
/// 12 packed bytes: sub-blocks 0–3 keep their six bits in bytes 0–3 (scales) and 4–7
/// (minimums); 4–7 have their low four bits in the nibbles of bytes 8–11 and their top two
/// in the spare top bits of bytes 0–7. Four bytes at a time, in u32 lanes.
#[inline(always)]
fn scales_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    let (six, four, two) = (0x3F3F_3F3Fu32, 0x0F0F_0F0Fu32, 0x0303_0303u32);
    let sc_hi = (c & four) | (((a >> 6) & two) << 4);
    let mn_hi = ((c >> 4) & four) | (((b >> 6) & two) << 4);
    let join = |lo: u32, hi: u32| (u64::from(lo) | (u64::from(hi) << 32)).to_le_bytes();
    (join(a & six, sc_hi), join(b & six, mn_hi))
}

#[cfg(test)]
mod tests;
