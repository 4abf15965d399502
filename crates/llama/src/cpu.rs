//! The instruction set the kernels use, detected once per process: one x86-64 binary runs on
//! any CPU, and takes AVX-512 or AVX2 where the CPU has them.

use std::sync::OnceLock;

/// A family of kernels; the best one the CPU supports is [`Isa::detect`]ed at first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, for any CPU (and the reference the SIMD paths are tested against).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell, Zen and newer).
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL and VNNI (Ice Lake, Zen 4 and newer).
    Avx512Vnni,
    /// aarch64 with NEON and the dot-product extension.
    NeonDot,
    /// aarch64 with NEON only.
    Neon,
}

impl Isa {
    /// The kernels this process uses; `EDGECHAT_ISA=portable|avx2|...` narrows it (for
    /// benchmarks of older CPUs), never beyond what the CPU has.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::detect();
            match std::env::var("EDGECHAT_ISA").ok().and_then(|v| Isa::parse(&v)) {
                Some(wanted) if best.includes(wanted) => wanted,
                _ => best,
            }
        })
    }

    /// What this CPU supports, best first.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                return Isa::NeonDot;
            }
            return Isa::Neon;
        }
        #[allow(unreachable_code)]
        Isa::Portable
    }

    /// The name logs, `model list` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::NeonDot => "neon-dotprod",
            Isa::Neon => "neon",
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::NeonDot, Isa::Neon]
            .into_iter()
            .find(|isa| isa.name() == name.trim())
    }

    /// Whether a CPU with `self` can run `other`'s kernels.
    fn includes(self, other: Isa) -> bool {
        let rank = |isa: Isa| match isa {
            Isa::Portable => (0, 0),
            Isa::Avx2 => (1, 1),
            Isa::Avx512Vnni => (1, 2),
            Isa::Neon => (2, 1),
            Isa::NeonDot => (2, 2),
        };
        let (a, b) = (rank(self), rank(other));
        b.0 == 0 || (a.0 == b.0 && a.1 >= b.1)
    }
}
