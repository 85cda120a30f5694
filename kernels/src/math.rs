//! Scalar math written so that loops over it vectorise (no libm calls).

/// `e^x` for `x <= 0` (softmax's shifted scores) without a libm call, so that loops over it
/// vectorise: `2^n * e^r` with `r` in `[-ln2/2, ln2/2]` and a degree-6 polynomial for `e^r`.
/// Relative error below 2e-7; inputs below -87 give 0.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer with plain additions,
    // which vectorise on any x86-64 (`floor` needs SSE4.1, else it is a libm call).
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `t` lies in [2^23, 2^24), where its mantissa counts whole units: `t`'s bits less
    // `ROUND`'s are `n` as an integer, with no float-to-int conversion (whose saturating
    // semantics would keep the loop from vectorising).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if x <= -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 4e-7 * want + 1e-37,
                "exp({x}) = {got}, libm {want}"
            );
        }
    }
}
