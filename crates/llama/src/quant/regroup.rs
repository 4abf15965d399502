//! The 32-weight formats (Q4_0, Q4_1, Q5_0, Q8_0) regrouped at load for the AVX2 kernels:
//! eight weight rows interleaved four bytes at a time, so one 32-byte load holds the same four
//! columns of all eight rows. A broadcast of four activation bytes then yields eight rows'
//! partial sums in one `maddubs`, and each block's scaling is one vector step for eight outputs
//! instead of eight scalar ones (the scale conversion and the float multiply-add are most of a
//! 32-weight block's cost when it is read one row at a time).
//!
//! Same bytes per block as the file, only reordered. Per group of [`GROUP`] rows and block:
//! the eight f16 scales, then the format's extra (Q4_1: eight f16 minimums; Q5_0: eight u32 of
//! fifth bits), then the weight bytes: Q4_0/Q4_1/Q5_0's 16 bytes of nibbles per row as four
//! vectors, vector `c` holding bytes `4c..4c+4` of rows 0..8 (low nibbles: weights `4c..`,
//! high nibbles: `16 + 4c..`); Q8_0's 32 bytes per row as eight such vectors.

use super::{Bytes, Format, Q8, TILE};
use candle_core::utils::barrier_pool;

/// Weight rows interleaved in one group.
pub(crate) const GROUP: usize = 8;

/// Dot products of one group's rows (`nb` regrouped blocks) with up to [`TILE`] activation
/// rows: `out[r][j]` is activation row `r` times weight row `j` of the group.
pub(crate) type GroupedDot =
    fn(w: &[u8], acts: &[Q8], nb: usize, rows: usize) -> [[f32; GROUP]; TILE];

/// Where a block's parts lie in the file's block, per format ([`layout`]): its bytes, the
/// extra's offset and length, and where the weights start (the scale is its first 2 bytes).
pub(super) const LAYOUTS: [[usize; 4]; 4] =
    [[18, 0, 0, 2], [20, 2, 2, 4], [22, 2, 4, 6], [34, 0, 0, 2]];

pub(super) fn layout(format: Format) -> usize {
    match format {
        Format::Q4_0 => 0,
        Format::Q4_1 => 1,
        Format::Q5_0 => 2,
        Format::Q8_0 => 3,
        _ => unreachable!("only 32-weight formats are regrouped"),
    }
}

/// Bytes of the file regrouped between releases of their mapped pages: the copy and the
/// source are both resident for at most this much at a time.
const SLICE: usize = 8 << 20;

/// The regrouped layout of `n × k` weights in `format` (`n` a multiple of [`GROUP`]),
/// built on the worker pool a slice at a time.
pub(super) fn regroup(format: Format, data: &Bytes, n: usize, k: usize) -> Bytes {
    let span = GROUP * k / 32 * format.bytes();
    let mut out = Copy::new(data.len());
    let dst = super::Disjoint::new(out.as_mut());
    let per_slice = (SLICE / span).max(1);
    for first in (0..n / GROUP).step_by(per_slice) {
        let last = (first + per_slice).min(n / GROUP);
        barrier_pool().execute_chunked(last - first, |groups| {
            for g in groups.start + first..groups.end + first {
                // SAFETY: group `g` owns its rows' span of the output.
                let out = unsafe { dst.slice(g * span, span) };
                regroup_one(format, &data[g * span..][..span], k / 32, out);
            }
        });
        data.release(first * span..last * span);
    }
    out.into()
}

/// Memory for a regrouped copy: anonymous pages that Linux may back with huge pages, which
/// spares the copy most of its page faults (a third of its time with 4 KiB pages); the heap
/// where no such mapping can be made.
enum Copy {
    Anon(memmap2::MmapMut),
    Heap(Vec<u8>),
}

impl Copy {
    fn new(len: usize) -> Self {
        match memmap2::MmapMut::map_anon(len) {
            Ok(map) => {
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage);
                Copy::Anon(map)
            }
            Err(_) => Copy::Heap(vec![0; len]),
        }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            Copy::Anon(map) => map,
            Copy::Heap(v) => v,
        }
    }
}

impl From<Copy> for Bytes {
    fn from(copy: Copy) -> Bytes {
        match copy {
            Copy::Anon(map) => match map.make_read_only() {
                Ok(map) => Bytes::Anon(std::sync::Arc::new(map)),
                Err(_) => unreachable!("mprotect of our own mapping to read-only"),
            },
            Copy::Heap(v) => v.into(),
        }
    }
}

fn regroup_one(format: Format, rows: &[u8], nb: usize, out: &mut [u8]) {
    match layout(format) {
        0 => regroup_blocks::<0>(rows, nb, out),
        1 => regroup_blocks::<1>(rows, nb, out),
        2 => regroup_blocks::<2>(rows, nb, out),
        _ => regroup_blocks::<3>(rows, nb, out),
    }
}

/// One group, with the layout known at compile time so each copy is a move or two.
fn regroup_blocks<const L: usize>(rows: &[u8], nb: usize, out: &mut [u8]) {
    let [bytes, extra_at, extra, qs_at] = LAYOUTS[L];
    for (i, o) in out.chunks_exact_mut(GROUP * bytes).enumerate() {
        for r in 0..GROUP {
            let b = &rows[(r * nb + i) * bytes..][..bytes];
            o[2 * r..2 * r + 2].copy_from_slice(&b[..2]);
            o[16 + extra * r..16 + extra * (r + 1)].copy_from_slice(&b[extra_at..extra_at + extra]);
            for c in 0..(bytes - qs_at) / 4 {
                let at = 16 + GROUP * extra + 32 * c + 4 * r;
                o[at..at + 4].copy_from_slice(&b[qs_at + 4 * c..qs_at + 4 * c + 4]);
            }
        }
    }
}

/// Row `j` of a group's regrouped bytes back in the file's layout (embedding lookups).
pub(super) fn ungroup_row(format: Format, group: &[u8], j: usize, out: &mut Vec<u8>) {
    let [bytes, extra_at, extra, qs_at] = LAYOUTS[layout(format)];
    out.clear();
    out.resize(group.len() / GROUP, 0);
    for (o, b) in group.chunks_exact(GROUP * bytes).zip(out.chunks_exact_mut(bytes)) {
        b[..2].copy_from_slice(&o[2 * j..][..2]);
        b[extra_at..][..extra].copy_from_slice(&o[16 + extra * j..][..extra]);
        for c in 0..(bytes - qs_at) / 4 {
            let at = 16 + GROUP * extra + 32 * c + 4 * j;
            b[qs_at + 4 * c..][..4].copy_from_slice(&o[at..at + 4]);
        }
    }
}

/// The regrouped kernel for `format` on this CPU, if it has one.
pub(super) fn kernel(format: Format, isa: crate::Isa) -> Option<GroupedDot> {
    #[cfg(target_arch = "x86_64")]
    if isa == crate::Isa::Avx2 && !format.wide() {
        return Some(super::avx2::grouped(format));
    }
    let _ = (format, isa);
    None
}
