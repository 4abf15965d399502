//! The kernels the matrices run on, chosen once per process from what the CPU has: one
//! x86-64 binary runs on any CPU and takes AVX2 where it is there.
//!
//! AVX-512 (VNNI) and NEON kernels are not written yet: those CPUs run the AVX2 kernels
//! (AVX-512 CPUs have AVX2) or the portable ones (aarch64).

use std::sync::OnceLock;

/// A family of kernels; [`Isa::get`] is the one this process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, for any CPU (and the reference the SIMD kernels are tested against).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell, Zen and newer).
    Avx2,
}

impl Isa {
    /// The kernels this process uses; `EDGECHAT_ISA=portable` narrows it (to measure what an
    /// older CPU gets), never beyond what the CPU has.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| match std::env::var("EDGECHAT_ISA").ok().and_then(|v| Isa::parse(&v)) {
            Some(Isa::Portable) => Isa::Portable,
            _ => Isa::detect(),
        })
    }

    /// The best this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
        Isa::Portable
    }

    /// The name logs, `model list` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2].into_iter().find(|isa| isa.name() == name.trim())
    }
}
