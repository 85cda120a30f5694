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

/// The widest tier within [`cap`] for kernels that need no more than AVX-512F (with AVX2 and
/// FMA) or AVX2 with FMA: plain loops compiled for each, found once.
pub(crate) fn plain() -> Tier {
    static PLAIN: OnceLock<Tier> = OnceLock::new();
    *PLAIN.get_or_init(|| {
        let widest = {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx2") && has!("fma") {
                    Tier::Avx512
                } else if has!("avx2") && has!("fma") {
                    Tier::Avx2
                } else {
                    Tier::Scalar
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Scalar
        };
        widest.min(cap())
    })
}

/// Defines `$name(tier, args...)`, which runs the `#[inline(always)]` function `$body` compiled
/// for `tier` (at most [`plain`]'s): the same operations at each width, so the same bits.
macro_rules! plain_tiers {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident) => {
        $(#[$doc])*
        $vis fn $name(tier: $crate::isa::Tier, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                // SAFETY: `plain` found these instruction sets on this CPU.
                match tier.min($crate::isa::plain()) {
                    $crate::isa::Tier::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::isa::Tier::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::isa::Tier::Scalar => {}
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use plain_tiers;
