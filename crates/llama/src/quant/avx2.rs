//! AVX2 + FMA kernels (x86-64 since Haswell and Zen). Each is compiled with those features
//! enabled on the function alone, so the binary runs anywhere and takes this path only where
//! [`crate::Isa`] found them. A weight block is unpacked to bytes once and multiplied into
//! every activation row of the tile (`R` of them, a constant so the sums stay in registers).

// Index loops over `R`-long arrays of registers read better than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use super::regroup::{layout, GroupedDot, GROUP, LAYOUTS};
use super::unpack::Unpacked;
use super::{scales_k4, Format, Kernel, Q8, Q8K, TILE};
use std::arch::x86_64::*;

pub(super) fn kernel(format: Format) -> Kernel {
    match format {
        Format::Q4_0 => Kernel::Narrow(q4_0),
        Format::Q4_1 => Kernel::Narrow(q4_1),
        Format::Q5_0 => Kernel::Narrow(q5_0),
        Format::Q8_0 => Kernel::Narrow(q8_0),
        Format::Q4K => Kernel::Wide(q4_k),
        Format::Q5K => Kernel::Wide(q5_k),
        Format::Q6K => Kernel::Wide(q6_k),
    }
}

/// A safe entry point per format: checks the slices, then runs the `R`-row kernel. Q4_K and
/// Q5_K (`pairs`) take four rows as two pairs: their four-row kernel needs more than AVX2's
/// 16 registers and spills, and reading the block again from L1 costs less (batched decode
/// of a Llama-3.2-1B Q4_K_M: 8–22 % more tokens/s; Q6_K's gains nothing).
macro_rules! entry {
    ($name:ident, $act:ty, $bytes:expr, $inner:ident) => {
        entry!(@ $name, $act, $bytes, $inner, |w, a, nb| $inner::<4>(w, a, nb));
    };
    ($name:ident, $act:ty, $bytes:expr, $inner:ident, pairs) => {
        entry!(@ $name, $act, $bytes, $inner, |w, a, nb| {
            let (x, y) = ($inner::<2>(w, a, nb), $inner::<2>(w, a.add(2 * nb), nb));
            [x[0], x[1], y[0], y[1]]
        });
    };
    (@ $name:ident, $act:ty, $bytes:expr, $inner:ident, |$w:ident, $a:ident, $nb:ident| $four:expr) => {
        fn $name($w: &[u8], acts: &[$act], $nb: usize, rows: usize) -> [f32; TILE] {
            assert!($w.len() >= $nb * $bytes && acts.len() >= rows * $nb && rows <= TILE);
            let ($w, $a) = ($w.as_ptr(), acts.as_ptr());
            // SAFETY: `kernel` hands these out only where the CPU has AVX2, FMA and F16C; the
            // assert above keeps every read inside the slices.
            unsafe {
                match rows {
                    1 => $inner::<1>($w, $a, $nb),
                    2 => $inner::<2>($w, $a, $nb),
                    3 => $inner::<3>($w, $a, $nb),
                    _ => $four,
                }
            }
        }
    };
}

entry!(q4_0, Q8, 18, q4_0_rows);
entry!(q4_1, Q8, 20, q4_1_rows);
entry!(q5_0, Q8, 22, q5_0_rows);
entry!(q8_0, Q8, 34, q8_0_rows);
entry!(q4_k, Q8K, 144, q4_k_rows, pairs);
entry!(q5_k, Q8K, 176, q5_k_rows, pairs);
entry!(q6_k, Q8K, 210, q6_k_rows);

/// The 32-weight formats: each names how its block unpacks to 32 unsigned (or, for Q8_0,
/// signed) bytes, its scale, and what multiplies the activations' `s`.
macro_rules! narrow {
    ($name:ident, $bytes:expr, $signed:expr, |$b:ident| $unpack:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const R: usize>(w: *const u8, acts: *const Q8, nb: usize) -> [f32; TILE] {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut bias = [0f32; R];
            for i in 0..nb {
                let $b = w.add(i * $bytes);
                let (q, d, c): (__m256i, f32, f32) = $unpack;
                for r in 0..R {
                    let a = &*acts.add(r * nb + i);
                    let y = _mm256_loadu_si256(a.qs.as_ptr().cast());
                    let p = if $signed { dot_i8(q, y) } else { dot_u8(q, y) };
                    let p = _mm256_cvtepi32_ps(p);
                    acc[r] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * a.d), acc[r]);
                    bias[r] += c * a.s;
                }
            }
            let mut out = [0f32; TILE];
            for r in 0..R {
                out[r] = hsum(acc[r]) + bias[r];
            }
            out
        }
    };
}

narrow!(q4_0_rows, 18, false, |b| {
    let d = half(b);
    (nibbles(b.add(2)), d, -8.0 * d)
});
narrow!(q4_1_rows, 20, false, |b| (nibbles(b.add(4)), half(b), half(b.add(2))));
narrow!(q5_0_rows, 22, false, |b| {
    let d = half(b);
    let high = fifth_bits(b.add(2).cast::<u32>().read_unaligned());
    (_mm256_or_si256(nibbles(b.add(6)), high), d, -16.0 * d)
});
narrow!(q8_0_rows, 34, true, |b| (_mm256_loadu_si256(b.add(2).cast()), half(b), 0.0));

/// Q4_K and Q5_K (`$fifth`: the offset of the 32 bytes of 5th bits, or none).
macro_rules! k4 {
    ($name:ident, $bytes:expr, $qs:expr, $fifth:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn $name<const R: usize>(w: *const u8, acts: *const Q8K, nb: usize) -> [f32; TILE] {
            let low4 = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for i in 0..nb {
                let b = w.add(i * $bytes);
                let (sc, mn) = scales_k4(std::slice::from_raw_parts(b.add(4), 12));
                let scales = words(u64::from_le_bytes(sc), false);
                let mins = pairs(mn);
                let fifth: Option<usize> = $fifth;
                let hbits = match fifth {
                    Some(at) => Some(_mm256_loadu_si256(b.add(at).cast())),
                    None => None,
                };
                let mut sums = [_mm256_setzero_si256(); R];
                for c in 0..4 {
                    let raw = _mm256_loadu_si256(b.add($qs + 32 * c).cast());
                    let mut lo = _mm256_and_si256(raw, low4);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                    if let Some(h) = hbits {
                        let shift = _mm_cvtsi32_si128(2 * c as i32);
                        let h = _mm256_srl_epi16(h, shift);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                        let h = _mm256_srli_epi16(h, 1);
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                    }
                    let s_lo = _mm256_shuffle_epi8(scales, spread(2 * c, 2 * c));
                    let s_hi = _mm256_shuffle_epi8(scales, spread(2 * c + 1, 2 * c + 1));
                    for r in 0..R {
                        let y = (*acts.add(r * nb + i)).qs.as_ptr().add(64 * c);
                        let p_lo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(y.cast()));
                        let p_hi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(y.add(32).cast()));
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(p_lo, s_lo),
                            _mm256_madd_epi16(p_hi, s_hi),
                        );
                        sums[r] = _mm256_add_epi32(sums[r], p);
                    }
                }
                let (d, dmin) = (half(b), half(b.add(2)));
                for r in 0..R {
                    let a = &*acts.add(r * nb + i);
                    let bsums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
                    let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, mins));
                    let s = _mm256_cvtepi32_ps(sums[r]);
                    acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(d * a.d), acc[r]);
                    acc[r] = _mm256_fnmadd_ps(m, _mm256_set1_ps(dmin * a.d), acc[r]);
                }
            }
            let mut out = [0f32; TILE];
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
            out
        }
    };
}

k4!(q4_k_rows, 144, 16, None);
k4!(q5_k_rows, 176, 48, Some(16));

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_rows<const R: usize>(w: *const u8, acts: *const Q8K, nb: usize) -> [f32; TILE] {
    let low4 = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let b = w.add(i * 210);
        let sc = b.add(192);
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.cast()));
        let halves = [
            words(sc.cast::<u64>().read_unaligned(), true),
            words(sc.add(8).cast::<u64>().read_unaligned(), true),
        ];
        let mut sums = [_mm256_setzero_si256(); R];
        for h in 0..2 {
            let ql = [
                _mm256_loadu_si256(b.add(64 * h).cast()),
                _mm256_loadu_si256(b.add(64 * h + 32).cast()),
            ];
            let qh = _mm256_loadu_si256(b.add(128 + 32 * h).cast());
            for t in 0..4 {
                let low = match t < 2 {
                    true => _mm256_and_si256(ql[t], low4),
                    false => _mm256_and_si256(_mm256_srli_epi16(ql[t - 2], 4), low4),
                };
                let shift = _mm_cvtsi32_si128(2 * t as i32);
                let high = _mm256_and_si256(_mm256_srl_epi16(qh, shift), three);
                let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                let s = _mm256_shuffle_epi8(halves[h], spread(2 * t, 2 * t + 1));
                for r in 0..R {
                    let y = (*acts.add(r * nb + i)).qs.as_ptr().add(128 * h + 32 * t);
                    let p = _mm256_maddubs_epi16(q, _mm256_loadu_si256(y.cast()));
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(p, s));
                }
            }
        }
        let d = half(b.add(208));
        for r in 0..R {
            let a = &*acts.add(r * nb + i);
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales), 5);
            let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[r], offset));
            acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(d * a.d), acc[r]);
        }
    }
    let mut out = [0f32; TILE];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// `Σ q·y` of unsigned bytes `q` and signed `y`, as eight 32-bit partial sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_u8(q: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), _mm256_set1_epi16(1))
}

/// The same for signed `q`: the sign moves onto `y` so `q` can be taken unsigned.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_i8(q: __m256i, y: __m256i) -> __m256i {
    dot_u8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
}

/// 16 bytes of nibbles as 32 bytes, low nibbles first (the blocks' weight order).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let mask = _mm_set1_epi8(0x0F);
    let raw = _mm_loadu_si128(p.cast());
    let lo = _mm_and_si128(raw, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Byte `j` is 16 where bit `j` of `bits` is set: Q5_0's fifth bits, in place.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Eight byte scales as words, in both 128-bit lanes (for [`spread`]); `signed`: Q6_K's.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn words(bytes: u64, signed: bool) -> __m256i {
    let v = _mm_cvtsi64_si128(bytes as i64);
    let w = if signed { _mm_cvtepi8_epi16(v) } else { _mm_cvtepu8_epi16(v) };
    _mm256_broadcastsi128_si256(w)
}

/// A shuffle that fills the low lane with word `lo` of a [`words`] vector and the high lane
/// with word `hi`: the factors of one `maddubs` result (its two 16-weight halves).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn spread(lo: usize, hi: usize) -> __m256i {
    let (lo, hi) =
        ((((2 * lo + 1) << 8) | (2 * lo)) as i16, (((2 * hi + 1) << 8) | (2 * hi)) as i16);
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// Eight minimums as 16 words, each twice: multiplied with the activations' 16 sums, word
/// pairs `2j, 2j+1` (sub-block `j`'s two halves) meet minimum `j`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pairs(mn: [u8; 8]) -> __m256i {
    let v = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr().cast()));
    _mm256_set_m128i(_mm_unpackhi_epi16(v, v), _mm_unpacklo_epi16(v, v))
}

/// A little-endian f16 at `p`, through F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half(p: *const u8) -> f32 {
    let bits = p.cast::<u16>().read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Prefill of K-quants on unpacked blocks (`super::unpack`).
pub(super) fn unpacked(w: &[Unpacked], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE] {
    assert!(w.len() >= nb && acts.len() >= rows * nb && rows <= TILE);
    let (w, a) = (w.as_ptr(), acts.as_ptr());
    // SAFETY: handed out only where the CPU has AVX2, FMA and F16C; reads stay in the slices.
    unsafe {
        match rows {
            1 => unpacked_rows::<1>(w, a, nb),
            2 => unpacked_rows::<2>(w, a, nb),
            3 => unpacked_rows::<3>(w, a, nb),
            _ => unpacked_rows::<4>(w, a, nb),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpacked_rows<const R: usize>(
    w: *const Unpacked,
    acts: *const Q8K,
    nb: usize,
) -> [f32; TILE] {
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let u = &*w.add(i);
        let mut sums = [_mm256_setzero_si256(); R];
        for c in 0..8 {
            let q = _mm256_load_si256(u.q.as_ptr().add(32 * c).cast());
            let s = _mm256_load_si256(u.scales[c].as_ptr().cast());
            for r in 0..R {
                let y = (*acts.add(r * nb + i)).qs.as_ptr().add(32 * c);
                let p = _mm256_maddubs_epi16(q, _mm256_loadu_si256(y.cast()));
                sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(p, s));
            }
        }
        let mins = _mm256_load_si256(u.mins.as_ptr().cast());
        for r in 0..R {
            let a = &*acts.add(r * nb + i);
            let bsums = _mm256_loadu_si256(a.bsums.as_ptr().cast());
            let m = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, mins));
            acc[r] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), _mm256_set1_ps(u.d * a.d), acc[r]);
            acc[r] = _mm256_fnmadd_ps(m, _mm256_set1_ps(u.dmin * a.d), acc[r]);
        }
    }
    let mut out = [0f32; TILE];
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
    out
}

/// Regrouped 32-weight formats (`super::regroup`): eight weight rows per call.
pub(super) fn grouped(format: Format) -> GroupedDot {
    match layout(format) {
        Q4_0 => grouped_entry::<Q4_0>,
        Q4_1 => grouped_entry::<Q4_1>,
        Q5_0 => grouped_entry::<Q5_0>,
        _ => grouped_entry::<Q8_0>,
    }
}

/// The formats by their index in [`LAYOUTS`].
const Q4_0: usize = 0;
const Q4_1: usize = 1;
const Q5_0: usize = 2;
const Q8_0: usize = 3;

fn grouped_entry<const F: usize>(
    w: &[u8],
    acts: &[Q8],
    nb: usize,
    rows: usize,
) -> [[f32; GROUP]; TILE] {
    assert!(w.len() >= nb * GROUP * LAYOUTS[F][0] && acts.len() >= rows * nb && rows <= TILE);
    let (w, a) = (w.as_ptr(), acts.as_ptr());
    // SAFETY: handed out only where the CPU has AVX2, FMA and F16C; reads stay in the slices.
    unsafe {
        match rows {
            1 => grouped_rows::<F, 1>(w, a, nb),
            2 => grouped_rows::<F, 2>(w, a, nb),
            3 => grouped_rows::<F, 3>(w, a, nb),
            _ => grouped_rows::<F, 4>(w, a, nb),
        }
    }
}

/// Four activation bytes at `p`, in every 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn four(p: *const i8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn grouped_rows<const F: usize, const R: usize>(
    w: *const u8,
    acts: *const Q8,
    nb: usize,
) -> [[f32; GROUP]; TILE] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let b = w.add(i * GROUP * LAYOUTS[F][0]);
        let d = _mm256_cvtph_ps(_mm_loadu_si128(b.cast()));
        let qs = b.add(16 + GROUP * LAYOUTS[F][2]);
        let mut sums = [_mm256_setzero_si256(); R];
        if F == Q8_0 {
            for c in 0..8 {
                let q = _mm256_loadu_si256(qs.add(32 * c).cast());
                let abs = _mm256_sign_epi8(q, q);
                for r in 0..R {
                    let y = four((*acts.add(r * nb + i)).qs.as_ptr().add(4 * c));
                    let p = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(y, q));
                    sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(p, ones));
                }
            }
        } else {
            let low4 = _mm256_set1_epi8(0x0F);
            let high = _mm256_loadu_si256(b.add(16).cast());
            // Q4's 16-bit partial sums stay below 8 · 2 · 15 · 127 < 2¹⁵; Q5_0's are
            // widened after each pair of vectors.
            let mut words = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let raw = _mm256_loadu_si256(qs.add(32 * c).cast());
                let mut lo = _mm256_and_si256(raw, low4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                if F == Q5_0 {
                    lo = _mm256_or_si256(lo, fifth_bits_grouped(high, 4 * c as i32));
                    hi = _mm256_or_si256(hi, fifth_bits_grouped(high, 16 + 4 * c as i32));
                }
                for r in 0..R {
                    let y = (*acts.add(r * nb + i)).qs.as_ptr();
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, four(y.add(4 * c))),
                        _mm256_maddubs_epi16(hi, four(y.add(16 + 4 * c))),
                    );
                    match F == Q5_0 {
                        true => sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(p, ones)),
                        false => words[r] = _mm256_add_epi16(words[r], p),
                    }
                }
            }
            if F != Q5_0 {
                for r in 0..R {
                    sums[r] = _mm256_madd_epi16(words[r], ones);
                }
            }
        }
        // What multiplies the activations' sum `s`: the offset times the scale, or Q4_1's
        // minimum.
        let (offset, by) = match F {
            Q4_0 => (d, -8.0),
            Q4_1 => (_mm256_cvtph_ps(_mm_loadu_si128(b.add(16).cast())), 1.0),
            Q5_0 => (d, -16.0),
            _ => (d, 0.0),
        };
        for r in 0..R {
            let a = &*acts.add(r * nb + i);
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
            if F != Q8_0 {
                acc[r] = _mm256_fmadd_ps(offset, _mm256_set1_ps(by * a.s), acc[r]);
            }
        }
    }
    let mut out = [[0f32; GROUP]; TILE];
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
    out
}

/// Q5_0 regrouped: `high` holds each row's 32 fifth bits in its lane; byte `t` of lane `r`
/// becomes 16 where bit `from + t` of row `r`'s bits is set.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fifth_bits_grouped(high: __m256i, from: i32) -> __m256i {
    let bits = _mm256_srl_epi32(high, _mm_cvtsi32_si128(from));
    let low_byte = _mm256_setr_epi8(
        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, //
        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
    );
    let bytes = _mm256_shuffle_epi8(bits, low_byte);
    let bit = _mm256_set1_epi32(0x0804_0201);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}
