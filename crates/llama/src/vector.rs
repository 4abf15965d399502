//! The small vector loops outside the matrix kernels (attention's dot products, activation
//! quantization), compiled twice: for any CPU and with AVX2 + FMA, picked at run time like
//! the kernels, so a binary built for plain x86-64 loses nothing on a newer CPU.

/// Defines `fn $name` whose body runs with AVX2 + FMA where [`crate::Isa`] chose AVX2.
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if crate::Isa::get() == crate::Isa::Avx2 {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                // SAFETY: `Isa::get` is AVX2 only where the CPU has AVX2 and FMA.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

dispatched! {
    /// `Σ aᵢ·bᵢ` in eight running sums, so the compiler keeps them in one vector register.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
        for (x, y) in a8.zip(b8) {
            for j in 0..8 {
                acc[j] += x[j] * y[j];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

dispatched! {
    /// `y += a·x`.
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
    }
}

dispatched! {
    /// ggml's 8-bit block quantization of `x` into `qs`: scaled by the largest magnitude to
    /// ±127 and rounded to nearest; returns the scale.
    fn quantize(x: &[f32], qs: &mut [i8]) -> f32 {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
        d
    }
}
