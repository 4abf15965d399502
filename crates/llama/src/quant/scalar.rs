//! Plain-Rust kernels: the path for CPUs without AVX2 or NEON, and the reference the SIMD
//! kernels are tested against. Integer sums as the SIMD code does them, so the two agree to
//! float rounding.

use super::{half, scales_k4, Format, Kernel, Q8, Q8K, TILE};

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

/// Sums `block(weight block, activation block)` over a row for each activation row.
#[inline(always)]
fn tile<A>(
    w: &[u8],
    acts: &[A],
    nb: usize,
    rows: usize,
    bytes: usize,
    block: impl Fn(&[u8], &A) -> f32,
) -> [f32; TILE] {
    let mut out = [0f32; TILE];
    for (o, row) in out.iter_mut().zip(acts.chunks_exact(nb)).take(rows) {
        *o = w.chunks_exact(bytes).zip(row).map(|(b, a)| block(b, a)).sum();
    }
    out
}

/// `Σ q·y` for 32 weights given as 16 bytes of nibbles (low nibbles first) plus the 5th bits.
#[inline(always)]
fn nibble_dot(qs: &[u8], high: u32, y: &[i8; 32]) -> i32 {
    let mut sum = 0;
    for j in 0..16 {
        let lo = i32::from(qs[j] & 0x0F) | (((high >> j) & 1) << 4) as i32;
        let hi = i32::from(qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4) as i32;
        sum += lo * i32::from(y[j]) + hi * i32::from(y[j + 16]);
    }
    sum
}

fn q4_0(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 18, |b, a| {
        half(b, 0) * (a.d * nibble_dot(&b[2..18], 0, &a.qs) as f32 - 8.0 * a.s)
    })
}

fn q4_1(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 20, |b, a| {
        half(b, 0) * a.d * nibble_dot(&b[4..20], 0, &a.qs) as f32 + half(b, 2) * a.s
    })
}

fn q5_0(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 22, |b, a| {
        let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        half(b, 0) * (a.d * nibble_dot(&b[6..22], high, &a.qs) as f32 - 16.0 * a.s)
    })
}

fn q8_0(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 34, |b, a| {
        let sum: i32 =
            b[2..34].iter().zip(&a.qs).map(|(&q, &y)| i32::from(q as i8) * i32::from(y)).sum();
        half(b, 0) * a.d * sum as f32
    })
}

/// Q4_K and Q5_K: eight 32-weight sub-blocks with 6-bit scales and minimums; `high` gives
/// the 5th bits (Q5_K) of sub-block `j`'s weights as bit `j` of 32 bytes.
#[inline(always)]
fn k4_block(b: &[u8], a: &Q8K, qs: &[u8], high: Option<&[u8]>) -> f32 {
    let (sc, mn) = scales_k4(&b[4..16]);
    let (mut sum, mut mins) = (0i32, 0i32);
    for j in 0..8 {
        let bytes = &qs[j / 2 * 32..][..32];
        let y = &a.qs[j * 32..][..32];
        let mut s = 0i32;
        for l in 0..32 {
            let nibble = if j % 2 == 0 { bytes[l] & 0x0F } else { bytes[l] >> 4 };
            let fifth = high.map_or(0, |h| ((h[l] >> j) & 1) << 4);
            s += i32::from(nibble | fifth) * i32::from(y[l]);
        }
        sum += i32::from(sc[j]) * s;
        mins += i32::from(mn[j]) * (i32::from(a.bsums[2 * j]) + i32::from(a.bsums[2 * j + 1]));
    }
    a.d * (half(b, 0) * sum as f32 - half(b, 2) * mins as f32)
}

fn q4_k(w: &[u8], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 144, |b, a| k4_block(b, a, &b[16..144], None))
}

fn q5_k(w: &[u8], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 176, |b, a| k4_block(b, a, &b[48..176], Some(&b[16..48])))
}

/// Q6_K weight `i` of a block (0..256) as 0..63, before its offset of 32.
#[inline(always)]
fn q6(b: &[u8], i: usize) -> u8 {
    let (half, t, l) = (i / 128, i % 128 / 32, i % 32);
    let ql = b[half * 64 + (t % 2) * 32 + l];
    let qh = b[128 + half * 32 + l];
    let low = if t < 2 { ql & 0x0F } else { ql >> 4 };
    low | (((qh >> (2 * t)) & 3) << 4)
}

fn q6_k(w: &[u8], acts: &[Q8K], nb: usize, rows: usize) -> [f32; TILE] {
    tile(w, acts, nb, rows, 210, |b, a| {
        let (mut sum, mut offset) = (0i32, 0i32);
        for g in 0..16 {
            let sc = i32::from(b[192 + g] as i8);
            let s: i32 =
                (0..16).map(|l| i32::from(q6(b, g * 16 + l)) * i32::from(a.qs[g * 16 + l])).sum();
            sum += sc * s;
            offset += sc * i32::from(a.bsums[g]);
        }
        a.d * half(b, 208) * (sum - 32 * offset) as f32
    })
}

/// `format` blocks as floats: embedding lookups, vectors, and the tests' reference.
pub(crate) fn dequantize(format: Format, row: &[u8], out: &mut [f32]) {
    let per = format.block();
    for (b, y) in row.chunks_exact(format.bytes()).zip(out.chunks_exact_mut(per)) {
        match format {
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 => {
                let (qs, high, base, d) = match format {
                    Format::Q4_0 => (&b[2..18], 0, -8.0 * half(b, 0), half(b, 0)),
                    Format::Q4_1 => (&b[4..20], 0, half(b, 2), half(b, 0)),
                    _ => {
                        let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        (&b[6..22], high, -16.0 * half(b, 0), half(b, 0))
                    }
                };
                for j in 0..16 {
                    let lo = u32::from(qs[j] & 0x0F) | (((high >> j) & 1) << 4);
                    let hi = u32::from(qs[j] >> 4) | (((high >> (j + 16)) & 1) << 4);
                    y[j] = d * lo as f32 + base;
                    y[j + 16] = d * hi as f32 + base;
                }
            }
            Format::Q8_0 => {
                let d = half(b, 0);
                y.iter_mut().zip(&b[2..34]).for_each(|(y, &q)| *y = d * f32::from(q as i8));
            }
            Format::Q4K | Format::Q5K => {
                let (sc, mn) = scales_k4(&b[4..16]);
                let (qs, high) = match format {
                    Format::Q4K => (&b[16..144], None),
                    _ => (&b[48..176], Some(&b[16..48])),
                };
                for j in 0..8 {
                    let d = half(b, 0) * f32::from(sc[j]);
                    let m = half(b, 2) * f32::from(mn[j]);
                    for l in 0..32 {
                        let byte = qs[j / 2 * 32 + l];
                        let nibble = if j % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                        let fifth = high.map_or(0, |h: &[u8]| ((h[l] >> j) & 1) << 4);
                        y[j * 32 + l] = d * f32::from(nibble | fifth) - m;
                    }
                }
            }
            Format::Q6K => {
                for (i, y) in y.iter_mut().enumerate() {
                    let sc = f32::from(b[192 + i / 16] as i8);
                    *y = half(b, 208) * sc * (f32::from(q6(b, i)) - 32.0);
                }
            }
        }
    }
}
