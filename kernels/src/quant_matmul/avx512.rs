//! AVX-512 VNNI: two blocks per instruction, unsigned-by-signed byte dot products accumulated
//! straight into 32-bit lanes (no 16-bit intermediate to saturate), and up to 16 activation rows
//! per pass over a weight row, each in its own register.

use std::arch::x86_64::*;

use super::avx2::{hsum, unpack_nibbles};
use super::{XGroup, BLOCK, GROUP_AVX512};

/// Calls `$f::<N>` with N = `$n` (1..=16), so that each group size gets its own unrolled code.
macro_rules! with_rows {
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            13 => $f::<13>($($arg),*),
            14 => $f::<14>($($arg),*),
            15 => $f::<15>($($arg),*),
            _ => $f::<16>($($arg),*),
        }
    };
}

/// Two consecutive f32s (or i32s), repeated: the scales of blocks b and b + 1 in the even and
/// odd lanes, as the pair-interleaved layout leaves their dot products.
#[inline(always)]
unsafe fn two<T>(p: *const T) -> __m512 {
    _mm512_castpd_ps(_mm512_set1_pd(std::ptr::read_unaligned(p as *const f64)))
}

/// Lane j of the result: the sum of `acc[j]`'s lanes. Every lane's sum is taken in the same
/// order, so a row's result does not depend on its place among the 16.
#[inline(always)]
unsafe fn sum_lanes(acc: &[__m512; 16]) -> __m512 {
    // Within 128-bit lanes: pairs of rows, then quads.
    let pairs: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (acc[2 * i], acc[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    let quads: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (
            _mm512_castps_pd(pairs[2 * i]),
            _mm512_castps_pd(pairs[2 * i + 1]),
        );
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    });
    // quads[i] holds rows 4i..4i+4 in each 128-bit lane; add the four lanes.
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4(a, b, 0b10_00_10_00),
            _mm512_shuffle_f32x4(a, b, 0b11_01_11_01),
        )
    };
    halves(halves(quads[0], quads[1]), halves(quads[2], quads[3]))
}

/// One row's sum with exactly the additions [`sum_lanes`] makes for it.
#[inline(always)]
unsafe fn sum_one(a: __m512) -> f32 {
    // Within 128-bit lanes: (x0 + x2) + (x1 + x3); then (l0 + l1) + (l2 + l3).
    let t = _mm512_add_ps(a, _mm512_permute_ps(a, 0b01_00_11_10));
    let t = _mm512_add_ps(t, _mm512_permute_ps(t, 0b10_11_00_01));
    let t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0b10_11_00_01));
    let t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0b01_00_11_10));
    _mm512_cvtss_f32(t)
}

/// The shared loop over `N` activation rows: `codes(b)` gives blocks `b, b + 1` as 64
/// unsigned bytes in the pair-interleaved layout (and, for an odd last block, `tail(b)` gives
/// it as 32 in order); `offsets`, for int8 weights, start each block's dot product (see
/// [`super::Activations`]); `mins`, for 4-bit weights, add min * sum(x) per block. Every row
/// runs the same instructions whatever `N` is.
#[inline(always)]
unsafe fn body<const N: usize>(
    ws: &[f32],
    mins: Option<&[f32]>,
    offsets: Option<&[i32]>,
    x: &XGroup,
    outs: &mut [f32],
    codes: impl Fn(usize) -> __m512i,
    tail: impl Fn(usize) -> __m256i,
) {
    let blocks = ws.len();
    let cols = blocks * BLOCK;
    let paired = blocks / 2 * 2 * BLOCK;
    let mut acc = [_mm512_setzero_ps(); 16];
    for b in (0..blocks - blocks % 2).step_by(2) {
        let q = codes(b);
        let d = two(ws.as_ptr().add(b));
        for (k, acc) in acc.iter_mut().enumerate().take(N) {
            let vx =
                _mm512_loadu_si512(x.pair_quants.as_ptr().add(k * paired + b * BLOCK) as *const _);
            let s = _mm512_mul_ps(d, two(x.scales.as_ptr().add(k * blocks + b)));
            let init = match offsets {
                // Block b's in lane 0, b + 1's in lane 1.
                Some(o) => _mm512_zextsi128_si512(_mm_loadl_epi64(
                    o.as_ptr().add(k * blocks + b) as *const _
                )),
                None => _mm512_setzero_si512(),
            };
            let sums = _mm512_dpbusd_epi32(init, q, vx);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, *acc);
        }
    }
    if N == 1 {
        // The same additions as below for one row, without the other fifteen.
        let mut total = sum_one(acc[0]);
        if let Some(mins) = mins {
            let (mut even, mut odd) = (0f32, 0f32);
            let (ms, xs) = (mins.chunks_exact(2), x.sums[..mins.len()].chunks_exact(2));
            let last = ms.remainder().first().zip(xs.remainder().first());
            for (m, s) in ms.zip(xs) {
                even = m[0].mul_add(s[0], even);
                odd = m[1].mul_add(s[1], odd);
            }
            if let Some((m, s)) = last {
                even = m.mul_add(*s, even);
            }
            total += even + odd;
        }
        outs[0] = total;
    } else {
        let mut totals = sum_lanes(&acc);
        if let Some(mins) = mins {
            let mut extra = [_mm512_setzero_ps(); 2];
            for (b, &m) in mins.iter().enumerate() {
                let sums = _mm512_loadu_ps(x.sums_by_16.as_ptr().add(b * 16));
                extra[b % 2] = _mm512_fmadd_ps(_mm512_set1_ps(m), sums, extra[b % 2]);
            }
            totals = _mm512_add_ps(totals, _mm512_add_ps(extra[0], extra[1]));
        }
        _mm512_mask_storeu_ps(
            outs.as_mut_ptr(),
            (1u32 << N).wrapping_sub(1) as u16,
            totals,
        );
    }
    if blocks % 2 == 1 {
        let b = blocks - 1;
        let q = tail(b);
        let d = _mm256_set1_ps(*ws.get_unchecked(b));
        for (k, o) in outs.iter_mut().enumerate().take(N) {
            let vx =
                _mm256_loadu_si256(x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i);
            let s = _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
            let init = match offsets {
                Some(o) => _mm256_zextsi128_si256(_mm_cvtsi32_si128(o[k * blocks + b])),
                None => _mm256_setzero_si256(),
            };
            let sums = _mm256_dpbusd_epi32(init, q, vx);
            *o += hsum(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), s));
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
    if outs.len() <= GROUP_AVX512 {
        return with_rows!(outs.len(), q8_rows(wq, ws, x, outs));
    }
    for (g, outs) in outs.chunks_mut(GROUP_AVX512).enumerate() {
        let x = x.rows(g * GROUP_AVX512, outs.len(), wq.len());
        with_rows!(outs.len(), q8_rows(wq, ws, &x, outs));
    }
}

/// Int8 weights go in as `w + 128` (unsigned); the activations' precomputed offsets take the
/// 128 * sum(x) back out, so the integer sums equal the signed ones exactly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn q8_rows<const N: usize>(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
    let flip = _mm512_set1_epi8(-128);
    // 4-byte groups of the two blocks interleaved.
    let interleave = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
    body::<N>(
        ws,
        None,
        Some(x.offsets),
        x,
        outs,
        |b| {
            let w = _mm512_loadu_si512(wq.as_ptr().add(b * BLOCK) as *const _);
            _mm512_xor_si512(_mm512_permutexvar_epi32(interleave, w), flip)
        },
        |b| {
            _mm256_xor_si256(
                _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i),
                _mm512_castsi512_si256(flip),
            )
        },
    );
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn q4(nib: &[u8], ws: &[f32], mins: &[f32], x: &XGroup, outs: &mut [f32]) {
    if outs.len() <= GROUP_AVX512 {
        return with_rows!(outs.len(), q4_rows(nib, ws, mins, x, outs));
    }
    for (g, outs) in outs.chunks_mut(GROUP_AVX512).enumerate() {
        let x = x.rows(g * GROUP_AVX512, outs.len(), nib.len() * 2);
        with_rows!(outs.len(), q4_rows(nib, ws, mins, &x, outs));
    }
}

/// 4-bit weights: 32 bytes of nibbles (two blocks) spread to 64 bytes of values with one
/// permute, one shift and one mask.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn q4_rows<const N: usize>(
    nib: &[u8],
    ws: &[f32],
    mins: &[f32],
    x: &XGroup,
    outs: &mut [f32],
) {
    // From [B0 | B1] (16 bytes of nibbles each), their 4-byte groups interleaved twice over:
    // the low nibbles (values 0..16) in the first half, the high ones (16..32) in the second.
    let spread = _mm512_set_epi32(7, 3, 6, 2, 5, 1, 4, 0, 7, 3, 6, 2, 5, 1, 4, 0);
    let shifts = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    let low4 = _mm512_set1_epi8(0x0f);
    body::<N>(
        ws,
        Some(mins),
        None,
        x,
        outs,
        |b| {
            let raw = _mm512_castsi256_si512(_mm256_loadu_si256(
                nib.as_ptr().add(b * BLOCK / 2) as *const __m256i
            ));
            _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, raw), shifts),
                low4,
            )
        },
        |b| unpack_nibbles(nib.as_ptr().add(b * BLOCK / 2)),
    );
}
