//! AVX2 + FMA kernels: one block per instruction, four activation rows per pass.

use std::arch::x86_64::*;

use super::{dot, XGroup, BLOCK, GROUP};

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// A block's 16 bytes of nibbles as 32 bytes: low nibbles (values 0..16), then high ones.
#[inline(always)]
pub(super) unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let low4 = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(raw, 4), low4),
        _mm_and_si128(raw, low4),
    )
}

/// Int8 weights: the sign-transfer trick (|w| unsigned times x with w's sign) lets `maddubs`
/// multiply two signed blocks.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
    for (g, outs) in outs.chunks_mut(GROUP).enumerate() {
        q8_rows(wq, ws, &x.rows(g * GROUP, outs.len(), wq.len()), outs);
    }
}

#[inline(always)]
unsafe fn q8_rows(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
    let n = outs.len().min(GROUP);
    let (cols, blocks) = (wq.len(), ws.len());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); GROUP];
    for b in 0..blocks {
        let vw = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i);
        let abs_w = _mm256_sign_epi8(vw, vw);
        let d = _mm256_set1_ps(*ws.get_unchecked(b));
        for k in 0..n {
            let vx =
                _mm256_loadu_si256(x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i);
            let sums =
                _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(vx, vw)), ones);
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[k]);
        }
    }
    for k in 0..n {
        outs[k] = hsum(acc[k]);
    }
}

/// 4-bit weights are unsigned, so `maddubs` takes them directly; the minimum contributes
/// min * (scale * sum of the activation block), one dot product per row at the end.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q4(nib: &[u8], ws: &[f32], mins: &[f32], x: &XGroup, outs: &mut [f32]) {
    for (g, outs) in outs.chunks_mut(GROUP).enumerate() {
        q4_rows(
            nib,
            ws,
            mins,
            &x.rows(g * GROUP, outs.len(), nib.len() * 2),
            outs,
        );
    }
}

#[inline(always)]
unsafe fn q4_rows(nib: &[u8], ws: &[f32], mins: &[f32], x: &XGroup, outs: &mut [f32]) {
    let n = outs.len().min(GROUP);
    let blocks = ws.len();
    let cols = blocks * BLOCK;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); GROUP];
    for b in 0..blocks {
        let q = unpack_nibbles(nib.as_ptr().add(b * BLOCK / 2));
        let d = _mm256_set1_ps(*ws.get_unchecked(b));
        for k in 0..n {
            let vx =
                _mm256_loadu_si256(x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, vx), ones);
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[k]);
        }
    }
    for k in 0..n {
        outs[k] = hsum(acc[k]) + dot(mins, &x.sums[k * blocks..][..blocks]);
    }
}
