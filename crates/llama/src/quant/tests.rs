use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

const FORMATS: [(GgmlDType, Format); 7] = [
    (GgmlDType::Q4_0, Format::Q4_0),
    (GgmlDType::Q4_1, Format::Q4_1),
    (GgmlDType::Q5_0, Format::Q5_0),
    (GgmlDType::Q8_0, Format::Q8_0),
    (GgmlDType::Q4K, Format::Q4K),
    (GgmlDType::Q5K, Format::Q5K),
    (GgmlDType::Q6K, Format::Q6K),
];

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

/// A random `(n, k)` matrix quantized by candle: its bytes, and its dequantized floats.
fn matrix(dtype: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let t = Tensor::from_vec(random(n * k, 3 + n as u64), (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let floats = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    (q.data().unwrap().to_vec(), floats)
}

/// `x · wᵀ` in f32.
fn reference(w: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let m = x.len() / k;
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    out
}

#[test]
fn rows_dequantize_as_candle_does() {
    // Sixteen rows: two groups where the 32-weight formats are regrouped (AVX2).
    for (dtype, format) in FORMATS {
        let (n, k) = (16, 512);
        let (bytes, floats) = matrix(dtype, n, k);
        let regrouped = QMatrix::new(format, bytes.clone(), n, k).unwrap();
        let in_place = QMatrix::in_place(format, bytes, n, k).unwrap();
        for (m, i) in [&regrouped, &in_place].into_iter().flat_map(|m| (0..n).map(move |i| (m, i)))
        {
            let row = m.dequantize_row(i);
            for (j, (a, b)) in row.iter().zip(&floats[i * k..]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{format:?} [{i},{j}]: {a} vs {b}"
                );
            }
        }
    }
}

/// Every format, on every kernel family this CPU has, against the f32 product of candle's
/// dequantized weights: one row (decode), a full tile and ragged ones (prefill), an odd
/// number of outputs and a multiple of eight (regrouped), and K of several blocks.
#[test]
fn every_kernel_agrees_with_candles_dequantized_matmul() {
    for ((dtype, format), n) in FORMATS.into_iter().flat_map(|f| [(f, 37), (f, 40)]) {
        let k = 768;
        let (bytes, floats) = matrix(dtype, n, k);
        for isa in Isa::supported() {
            let ours = QMatrix::with_isa(format, bytes.clone().into(), n, k, isa).unwrap();
            for m in [1, 3, 4, 9, 17] {
                let x = random(m * k, 11 + m as u64);
                let got = &matmul(&[&ours], &x)[0];
                let want = reference(&floats, &x, n, k);
                let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // The activations are rounded to 8 bits; nothing else differs.
                    let ok = (g - w).abs() <= 0.01 * scale;
                    assert!(ok, "{format:?} {isa:?} m={m} [{i}]: {g} vs {w} (scale {scale})");
                }
            }
        }
    }
}

/// The SIMD kernels do the portable path's integer sums, so they agree to float rounding.
#[test]
fn simd_kernels_equal_the_portable_ones() {
    for ((dtype, format), n) in FORMATS.into_iter().flat_map(|f| [(f, 5), (f, 16)]) {
        let k = 512;
        let (bytes, _) = matrix(dtype, n, k);
        let portable =
            QMatrix::with_isa(format, bytes.clone().into(), n, k, Isa::Portable).unwrap();
        for isa in Isa::supported().into_iter().skip(1) {
            let simd = QMatrix::with_isa(format, bytes.clone().into(), n, k, isa).unwrap();
            // Seven rows take the direct kernels; fourteen, the unpacked ones (K-quants).
            for m in [7, 14] {
                let x = random(m * k, 5);
                let (a, b) = (&matmul(&[&portable], &x)[0], &matmul(&[&simd], &x)[0]);
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    let ok = (a - b).abs() <= 1e-4 * (1.0 + a.abs());
                    assert!(ok, "{format:?} {isa:?} m={m} [{i}]: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn parts_of_different_formats_run_together_as_apart() {
    let k = 512;
    let (a, _) = matrix(GgmlDType::Q4K, 7, k);
    let (b, _) = matrix(GgmlDType::Q8_0, 5, k);
    let (c, _) = matrix(GgmlDType::Q6K, 3, k);
    let a = QMatrix::new(Format::Q4K, a, 7, k).unwrap();
    let b = QMatrix::new(Format::Q8_0, b, 5, k).unwrap();
    let c = QMatrix::new(Format::Q6K, c, 3, k).unwrap();
    let (d, _) = matrix(GgmlDType::Q5_0, 24, k);
    let d = QMatrix::new(Format::Q5_0, d, 24, k).unwrap();
    let x = random(6 * k, 9);
    let together = matmul(&[&a, &d, &b, &c], &x);
    let apart: Vec<Vec<f32>> =
        [&a, &d, &b, &c].iter().map(|p| matmul(&[p], &x).remove(0)).collect();
    assert_eq!(together, apart);
}

#[test]
fn bytes_that_do_not_fit_the_shape_are_refused() {
    assert!(QMatrix::new(Format::Q4_1, vec![0; 40], 1, 64).is_some());
    assert!(QMatrix::new(Format::Q4_1, vec![0; 40], 2, 64).is_none());
    assert!(QMatrix::new(Format::Q4_0, vec![0; 18], 1, 20).is_none());
    assert!(QMatrix::new(Format::Q4K, vec![0; 144], 1, 128).is_none(), "K-quants need k % 256");
}

/// Kernel throughput, for profiling rather than checking:
/// `cargo test --release -p edgechat-llama kernel_speed -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand in release builds"]
fn kernel_speed() {
    let (n, k) = (4096, 2048);
    for (dtype, format) in FORMATS {
        let (bytes, _) = matrix(dtype, n, k);
        let size = bytes.len();
        for isa in Isa::supported() {
            let w = QMatrix::with_isa(format, bytes.clone().into(), n, k, isa).unwrap();
            for m in [1, 64] {
                let x = random(m * k, 1);
                let reps = if m == 1 { 50 } else { 3 };
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(matmul(&[&w], &x));
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let gmac = (m * n * k) as f64 / s / 1e9;
                println!(
                    "{format:?} {isa:?} m={m}: {:.2} ms, {:.1} GB/s of weights, {gmac:.1} GMAC/s",
                    s * 1e3,
                    size as f64 / s / 1e9
                );
            }
        }
    }
}

/// Regrouping a 544 MB Q8_0 matrix (load time of Q4_0/Q8_0 files), for profiling:
/// `cargo test --release -p edgechat-llama regroup_speed -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand in release builds"]
fn regroup_speed() {
    let (n, k) = (128 * 1024, 4096);
    let bytes: Bytes = vec![1u8; n * k / 32 * 34].into();
    let t = std::time::Instant::now();
    let m = QMatrix::with_isa(Format::Q8_0, bytes, n, k, Isa::detect()).unwrap();
    println!("regroup of {} MiB: {:?}", m.data.len() >> 20, t.elapsed());
}
