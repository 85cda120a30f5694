//! Which x86 instruction sets the CPU kernels may use.
//!
//! Each CPU kernel is compiled for several instruction sets and runs the widest one the CPU has.
//! `CANDELA_CPU_KERNELS=avx2` (or `scalar`) caps that choice, so that the narrower kernels can be
//! measured, and checked, on a machine that has the wider ones.

use std::sync::OnceLock;

/// Instruction-set tiers, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Tier {
    /// Plain Rust, any CPU.
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (with whatever extensions the kernel names).
    Avx512,
}

/// The widest tier the kernels may use: `CANDELA_CPU_KERNELS` if set to `avx512`, `avx2` or
/// `scalar`, else no cap. Read once.
pub(crate) fn cap() -> Tier {
    static CAP: OnceLock<Tier> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("CANDELA_CPU_KERNELS").as_deref() {
        Ok("scalar") => Tier::Scalar,
        Ok("avx2") => Tier::Avx2,
        _ => Tier::Avx512,
    })
}
