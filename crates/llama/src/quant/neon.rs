//! NEON kernels (every ARM64 CPU), in two builds: with the dot-product instructions
//! (`SDOT`: Cortex-A55/A76 and newer, Raspberry Pi 5, Graviton 2+, Apple) and without them
//! (Cortex-A53/A72: Raspberry Pi 3 and 4), where a widening multiply and pairwise add do the
//! same sum. Every unpacked weight fits a signed byte (0..63 before its offset), so one signed
//! 16-byte dot product serves every format. [`crate::Isa`] picks the build at run time.

// Index loops over `R`-long arrays of registers read better than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::{scales_k4, Format, Kernel, Q8, Q8K, TILE};
use half::f16;
use std::arch::aarch64::*;

/// Four 32-bit sums of `a · b` over 16 signed bytes, added to `acc`.
trait Dot {
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// `SDOT`, through `asm!` (its intrinsic is not stable Rust yet); the callers run only where
/// the CPU has it.
struct Sdot;

impl Dot for Sdot {
    #[inline(always)]
    unsafe fn dot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        std::arch::asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack),
        );
        acc
    }
}

/// Baseline NEON: 16-bit products, added pairwise into the 32-bit lanes.
struct Widen;

impl Dot for Widen {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// The kernels with (`dot: true`) or without the dot-product instructions.
pub(super) fn kernel(format: Format, dot: bool) -> Kernel {
    macro_rules! pick {
        ($narrow:ident, $wide:ident) => {
            match format {
                Format::Q4_0 => Kernel::Narrow($narrow::<Q4_0>),
                Format::Q4_1 => Kernel::Narrow($narrow::<Q4_1>),
                Format::Q5_0 => Kernel::Narrow($narrow::<Q5_0>),
                Format::Q8_0 => Kernel::Narrow($narrow::<Q8_0>),
                Format::Q4K => Kernel::Wide($wide::<Q4K>),
                Format::Q5K => Kernel::Wide($wide::<Q5K>),
                Format::Q6K => Kernel::Wide($wide::<Q6K>),
            }
        };
    }
    match dot {
        true => pick!(narrow_sdot, wide_sdot),
        false => pick!(narrow_widen, wide_widen),
    }
}

/// A safe entry point per block kind and instruction set: checks the slices, then runs the
/// `R`-row body with the features enabled on the function alone.
macro_rules! entry {
    ($name:ident, $act:ty, $block:ident, $body:ident, $dot:ty, $features:literal) => {
        fn $name<B: $block>(w: &[u8], acts: &[$act], nb: usize, rows: usize) -> [f32; TILE] {
            assert!(w.len() >= nb * B::BYTES && acts.len() >= rows * nb && rows <= TILE);
            #[target_feature(enable = $features)]
            unsafe fn run<B: $block, const R: usize>(
                w: *const u8,
                a: *const $act,
                nb: usize,
            ) -> [f32; TILE] {
                $body::<B, $dot, R>(w, a, nb)
            }
            let (w, a) = (w.as_ptr(), acts.as_ptr());
            // SAFETY: `kernel` hands these out only where the CPU has the features; the
            // assert above keeps every read inside the slices.
            unsafe {
                match rows {
                    1 => run::<B, 1>(w, a, nb),
                    2 => run::<B, 2>(w, a, nb),
                    3 => run::<B, 3>(w, a, nb),
                    _ => run::<B, 4>(w, a, nb),
                }
            }
        }
    };
}

entry!(narrow_sdot, Q8, NarrowBlock, narrow_rows, Sdot, "neon,dotprod");
entry!(wide_sdot, Q8K, WideBlock, wide_rows, Sdot, "neon,dotprod");
entry!(narrow_widen, Q8, NarrowBlock, narrow_rows, Widen, "neon");
entry!(wide_widen, Q8K, WideBlock, wide_rows, Widen, "neon");

/// A 32-weight block format: its 32 weights as signed bytes, their scale, and what
/// multiplies the activations' sum `s` (the format's offset or minimum).
trait NarrowBlock {
    const BYTES: usize;
    unsafe fn unpack(b: *const u8) -> ([int8x16_t; 2], f32, f32);
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q8_0;

impl NarrowBlock for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> ([int8x16_t; 2], f32, f32) {
        let d = half(b);
        (nibbles(b.add(2)), d, -8.0 * d)
    }
}

impl NarrowBlock for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> ([int8x16_t; 2], f32, f32) {
        (nibbles(b.add(4)), half(b), half(b.add(2)))
    }
}

impl NarrowBlock for Q5_0 {
    const BYTES: usize = 22;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> ([int8x16_t; 2], f32, f32) {
        let d = half(b);
        let [lo, hi] = nibbles(b.add(6));
        let high = b.add(2).cast::<u32>().read_unaligned();
        let fifth = |bits: u32| {
            // Byte j of the 16 is 16 where bit j of `bits` is set.
            let bytes = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
            let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
            vreinterpretq_s8_u8(vandq_u8(vtstq_u8(bytes, bit), vdupq_n_u8(0x10)))
        };
        let q = [vorrq_s8(lo, fifth(high)), vorrq_s8(hi, fifth(high >> 16))];
        (q, d, -16.0 * d)
    }
}

impl NarrowBlock for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    unsafe fn unpack(b: *const u8) -> ([int8x16_t; 2], f32, f32) {
        let q = b.add(2).cast::<i8>();
        ([vld1q_s8(q), vld1q_s8(q.add(16))], half(b), 0.0)
    }
}

#[inline(always)]
unsafe fn narrow_rows<B: NarrowBlock, D: Dot, const R: usize>(
    w: *const u8,
    acts: *const Q8,
    nb: usize,
) -> [f32; TILE] {
    let mut acc = [vdupq_n_f32(0.0); R];
    let mut bias = [0f32; R];
    for i in 0..nb {
        let ([q0, q1], d, c) = B::unpack(w.add(i * B::BYTES));
        for r in 0..R {
            let a = &*acts.add(r * nb + i);
            let y = a.qs.as_ptr();
            let s = D::dot(D::dot(vdupq_n_s32(0), q0, vld1q_s8(y)), q1, vld1q_s8(y.add(16)));
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), d * a.d);
            bias[r] += c * a.s;
        }
    }
    let mut out = [0f32; TILE];
    for r in 0..R {
        out[r] = vaddvq_f32(acc[r]) + bias[r];
    }
    out
}

/// A K-quant format: its 256 weights as eight runs of 32 signed bytes with the scale of each
/// 16, and the integer its minimums (or offset) contribute against the activations' 16 sums.
trait WideBlock {
    const BYTES: usize;
    /// Calls `run(c, weights, [scale of the first 16, of the next 16])` for `c` in 0..8.
    unsafe fn each(b: *const u8, run: impl FnMut(usize, [int8x16_t; 2], [i32; 2]));
    /// `(d, dmin)` and the weights of the activations' 16 sums in the term `dmin` multiplies.
    unsafe fn mins(b: *const u8) -> (f32, f32, [i16; 16]);
}

struct Q4K;
struct Q5K;
struct Q6K;

impl WideBlock for Q4K {
    const BYTES: usize = 144;
    #[inline(always)]
    unsafe fn each(b: *const u8, run: impl FnMut(usize, [int8x16_t; 2], [i32; 2])) {
        k4_each(b, b.add(16), None, run)
    }
    #[inline(always)]
    unsafe fn mins(b: *const u8) -> (f32, f32, [i16; 16]) {
        k4_mins(b)
    }
}

impl WideBlock for Q5K {
    const BYTES: usize = 176;
    #[inline(always)]
    unsafe fn each(b: *const u8, run: impl FnMut(usize, [int8x16_t; 2], [i32; 2])) {
        k4_each(b, b.add(48), Some(b.add(16)), run)
    }
    #[inline(always)]
    unsafe fn mins(b: *const u8) -> (f32, f32, [i16; 16]) {
        k4_mins(b)
    }
}

/// Q4_K and Q5_K: 128 bytes of nibbles at `qs` (low nibbles are sub-block `2c`, high ones
/// `2c + 1`), and Q5_K's 32 bytes of fifth bits (bit `j` for sub-block `j`).
#[inline(always)]
unsafe fn k4_each(
    b: *const u8,
    qs: *const u8,
    high: Option<*const u8>,
    mut run: impl FnMut(usize, [int8x16_t; 2], [i32; 2]),
) {
    let (sc, _) = scales_k4(std::slice::from_raw_parts(b.add(4), 12));
    let low4 = vdupq_n_u8(0x0F);
    let one = vdupq_n_u8(1);
    let h = high.map(|h| [vld1q_u8(h), vld1q_u8(h.add(16))]);
    for c in 0..4 {
        let raw = [vld1q_u8(qs.add(32 * c)), vld1q_u8(qs.add(32 * c + 16))];
        let mut lo = raw.map(|r| vandq_u8(r, low4));
        let mut hi = raw.map(|r| vshrq_n_u8::<4>(r));
        if let Some(h) = h {
            for p in 0..2 {
                // Fifth bits `2c` and `2c + 1`, moved to bit 4.
                let bits = vshlq_u8(h[p], vdupq_n_s8(-(2 * c as i8)));
                lo[p] = vorrq_u8(lo[p], vshlq_n_u8::<4>(vandq_u8(bits, one)));
                let bits = vshrq_n_u8::<1>(bits);
                hi[p] = vorrq_u8(hi[p], vshlq_n_u8::<4>(vandq_u8(bits, one)));
            }
        }
        let s = |j: usize| i32::from(sc[j]);
        run(2 * c, lo.map(|v| vreinterpretq_s8_u8(v)), [s(2 * c); 2]);
        run(2 * c + 1, hi.map(|v| vreinterpretq_s8_u8(v)), [s(2 * c + 1); 2]);
    }
}

#[inline(always)]
unsafe fn k4_mins(b: *const u8) -> (f32, f32, [i16; 16]) {
    let (_, mn) = scales_k4(std::slice::from_raw_parts(b.add(4), 12));
    let mut mins = [0i16; 16];
    for j in 0..16 {
        mins[j] = i16::from(mn[j / 2]);
    }
    (half(b), half(b.add(2)), mins)
}

impl WideBlock for Q6K {
    const BYTES: usize = 210;
    #[inline(always)]
    unsafe fn each(b: *const u8, mut run: impl FnMut(usize, [int8x16_t; 2], [i32; 2])) {
        let low4 = vdupq_n_u8(0x0F);
        let three = vdupq_n_u8(3);
        let sc = |g: usize| i32::from(*b.add(192 + g) as i8);
        for h in 0..2 {
            let ql = |at: usize| vld1q_u8(b.add(64 * h + at));
            let ql = [[ql(0), ql(16)], [ql(32), ql(48)]];
            let qh = [vld1q_u8(b.add(128 + 32 * h)), vld1q_u8(b.add(128 + 32 * h + 16))];
            for t in 0..4 {
                let q: [int8x16_t; 2] = std::array::from_fn(|p| {
                    let l = ql[t % 2][p];
                    let low = if t < 2 { vandq_u8(l, low4) } else { vshrq_n_u8::<4>(l) };
                    let high = vandq_u8(vshlq_u8(qh[p], vdupq_n_s8(-(2 * t as i8))), three);
                    vreinterpretq_s8_u8(vorrq_u8(low, vshlq_n_u8::<4>(high)))
                });
                let g = 8 * h + 2 * t;
                run(4 * h + t, q, [sc(g), sc(g + 1)]);
            }
        }
    }
    #[inline(always)]
    unsafe fn mins(b: *const u8) -> (f32, f32, [i16; 16]) {
        let d = half(b.add(208));
        (d, d, std::array::from_fn(|g| 32 * i16::from(*b.add(192 + g) as i8)))
    }
}

#[inline(always)]
unsafe fn wide_rows<B: WideBlock, D: Dot, const R: usize>(
    w: *const u8,
    acts: *const Q8K,
    nb: usize,
) -> [f32; TILE] {
    let mut acc = [0f32; R];
    for i in 0..nb {
        let b = w.add(i * B::BYTES);
        let mut sums = [0i32; R];
        B::each(b, |c, q, scale| {
            for r in 0..R {
                let y = (*acts.add(r * nb + i)).qs.as_ptr().add(32 * c);
                let lo = D::dot(vdupq_n_s32(0), q[0], vld1q_s8(y));
                let hi = D::dot(vdupq_n_s32(0), q[1], vld1q_s8(y.add(16)));
                sums[r] += scale[0] * vaddvq_s32(lo) + scale[1] * vaddvq_s32(hi);
            }
        });
        let (d, dmin, mins) = B::mins(b);
        let mins = [vld1q_s16(mins.as_ptr()), vld1q_s16(mins.as_ptr().add(8))];
        for r in 0..R {
            let a = &*acts.add(r * nb + i);
            let bsums = [vld1q_s16(a.bsums.as_ptr()), vld1q_s16(a.bsums.as_ptr().add(8))];
            let mut m = vdupq_n_s32(0);
            for p in 0..2 {
                m = vmlal_s16(m, vget_low_s16(mins[p]), vget_low_s16(bsums[p]));
                m = vmlal_high_s16(m, mins[p], bsums[p]);
            }
            acc[r] += a.d * (d * sums[r] as f32 - dmin * vaddvq_s32(m) as f32);
        }
    }
    let mut out = [0f32; TILE];
    out[..R].copy_from_slice(&acc);
    out
}

/// 16 bytes of nibbles as 32 signed bytes, low nibbles first (the blocks' weight order).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> [int8x16_t; 2] {
    let raw = vld1q_u8(p);
    let lo = vandq_u8(raw, vdupq_n_u8(0x0F));
    [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw))]
}

/// A little-endian f16 at `p`.
#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32()
}
