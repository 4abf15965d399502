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

fn isas() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    if Isa::detect() != Isa::Portable {
        isas.push(Isa::detect());
    }
    isas
}

#[test]
fn rows_dequantize_as_candle_does() {
    for (dtype, format) in FORMATS {
        let (n, k) = (3, 512);
        let (bytes, floats) = matrix(dtype, n, k);
        let m = QMatrix::new(format, bytes, n, k).unwrap();
        for i in 0..n {
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
/// number of outputs, and K of several blocks.
#[test]
fn every_kernel_agrees_with_candles_dequantized_matmul() {
    for (dtype, format) in FORMATS {
        let (n, k) = (37, 768);
        let (bytes, floats) = matrix(dtype, n, k);
        for isa in isas() {
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
    let best = Isa::detect();
    if best == Isa::Portable {
        return;
    }
    for (dtype, format) in FORMATS {
        let (n, k) = (5, 512);
        let (bytes, _) = matrix(dtype, n, k);
        let portable =
            QMatrix::with_isa(format, bytes.clone().into(), n, k, Isa::Portable).unwrap();
        let simd = QMatrix::with_isa(format, bytes.into(), n, k, best).unwrap();
        // Seven rows take the direct kernels; fourteen, the unpacked ones (K-quants).
        for m in [7, 14] {
            let x = random(m * k, 5);
            let (a, b) = (&matmul(&[&portable], &x)[0], &matmul(&[&simd], &x)[0]);
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                let ok = (a - b).abs() <= 1e-4 * (1.0 + a.abs());
                assert!(ok, "{format:?} m={m} [{i}]: {a} vs {b}");
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
    let x = random(6 * k, 9);
    let together = matmul(&[&a, &b, &c], &x);
    let apart: Vec<Vec<f32>> = [&a, &b, &c].iter().map(|p| matmul(&[p], &x).remove(0)).collect();
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
        for isa in isas() {
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
