//! K-quant blocks unpacked for prefill: each weight as a byte, each 32 weights' scales as the
//! 16 words a `maddubs` result is multiplied with, and the minimums (or Q6_K's offset) as
//! words against the activations' 16 sums. One kernel then serves Q4_K, Q5_K and Q6_K, and
//! its inner loop is a load, a multiply-add pair and an add per 32 weights and row.

use super::{half, scales_k4, Format, Isa, UnpackedDot};

/// One 256-weight block, unpacked.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Unpacked {
    /// Weights without their offset: 0..15 (Q4_K), 0..31 (Q5_K), 0..63 (Q6_K).
    pub q: [u8; 256],
    /// For weights `32c..32c+32`: words 0–7 scale the first 16, words 8–15 the next 16.
    pub scales: [[i16; 16]; 8],
    /// Against the activations' 16 sums (one per 16 values).
    pub mins: [i16; 16],
    /// Multiplies the scaled sums.
    pub d: f32,
    /// Multiplies the `mins` term, which is subtracted.
    pub dmin: f32,
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked { q: [0; 256], scales: [[0; 16]; 8], mins: [0; 16], d: 0.0, dmin: 0.0 }
    }
}

/// The unpacked kernel for this CPU, if it has one.
pub(super) fn kernel(isa: Isa) -> Option<UnpackedDot> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        return Some(super::avx2::unpacked);
    }
    let _ = isa;
    None
}

/// Unpacks one weight row of K-quant blocks into `out` (one per block).
pub(super) fn unpack(format: Format, row: &[u8], out: &mut [Unpacked]) {
    for (b, u) in row.chunks_exact(format.bytes()).zip(out) {
        match format {
            Format::Q4K => k4(b, &b[16..144], None, u),
            Format::Q5K => k4(b, &b[48..176], Some(&b[16..48]), u),
            Format::Q6K => q6k(b, u),
            _ => unreachable!("only K-quants are unpacked"),
        }
    }
}

fn k4(b: &[u8], qs: &[u8], high: Option<&[u8]>, u: &mut Unpacked) {
    let (sc, mn) = scales_k4(&b[4..16]);
    for c in 0..4 {
        let bytes = &qs[32 * c..][..32];
        let (lo, hi) = u.q[64 * c..][..64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = bytes[l] & 0x0F;
            hi[l] = bytes[l] >> 4;
        }
        if let Some(h) = high {
            for l in 0..32 {
                lo[l] |= ((h[l] >> (2 * c)) & 1) << 4;
                hi[l] |= ((h[l] >> (2 * c + 1)) & 1) << 4;
            }
        }
    }
    for j in 0..8 {
        u.scales[j] = [i16::from(sc[j]); 16];
        u.mins[2 * j] = i16::from(mn[j]);
        u.mins[2 * j + 1] = i16::from(mn[j]);
    }
    u.d = half(b, 0);
    u.dmin = half(b, 2);
}

fn q6k(b: &[u8], u: &mut Unpacked) {
    // Four runs of 32 per half-block (see `scalar::q6`), written so the loop vectorises.
    for h in 0..2 {
        let (ql, qh) = (&b[64 * h..][..64], &b[128 + 32 * h..][..32]);
        let q = &mut u.q[128 * h..][..128];
        for l in 0..32 {
            q[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
            q[32 + l] = (ql[32 + l] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
            q[64 + l] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[96 + l] = (ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    for g in 0..16 {
        let sc = i16::from(b[192 + g] as i8);
        u.scales[g / 2][(g % 2) * 8..][..8].fill(sc);
        u.mins[g] = 32 * sc;
    }
    u.d = half(b, 208);
    u.dmin = u.d;
}
