//! The kernels the matrices run on, chosen once per process from what the CPU has: one
//! x86-64 binary runs on any CPU and takes AVX2 where it is there; one ARM64 binary takes the
//! dot-product instructions where they are there.
//!
//! AVX-512 CPUs run the AVX2 kernels (no AVX-512 kernel is written yet).

use std::sync::OnceLock;

/// A family of kernels; [`Isa::get`] is the one this process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, for any CPU (and the reference the SIMD kernels are tested against).
    Portable,
    /// x86-64 with AVX2, FMA and F16C (Haswell, Zen and newer).
    Avx2,
    /// ARM64's baseline NEON (Cortex-A53/A72: Raspberry Pi 3 and 4).
    Neon,
    /// NEON with the dot-product instructions (Cortex-A55/A76 and newer, Graviton 2+, Apple).
    NeonDot,
}

impl Isa {
    /// The kernels this process uses: the best the CPU has, or `EDGECHAT_ISA` (`portable`,
    /// `neon`, ...) to measure what an older CPU gets, never beyond what this one has.
    pub fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let asked = std::env::var("EDGECHAT_ISA").ok().and_then(|v| Isa::parse(&v));
            asked.filter(|isa| Isa::supported().contains(isa)).unwrap_or_else(Isa::detect)
        })
    }

    /// The best this CPU supports.
    pub fn detect() -> Isa {
        *Isa::supported().last().expect("the portable kernels run everywhere")
    }

    /// Every family this CPU can run, the portable one first and the best last.
    pub fn supported() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            isas.push(Isa::Avx2);
        }
        #[cfg(target_arch = "aarch64")]
        {
            isas.push(Isa::Neon);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                isas.push(Isa::NeonDot);
            }
        }
        isas
    }

    /// The name logs, `model list` and `/metrics` show.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dotprod",
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Neon, Isa::NeonDot]
            .into_iter()
            .find(|isa| isa.name() == name.trim())
    }
}
