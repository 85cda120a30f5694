//! AVX2 + FMA: int8 weights a panel (16 weight rows, two 256-bit halves) × two int8 activation
//! rows at a time; 4-bit weights half a panel × up to six rows, which their 16-bit sums leave
//! registers for.
//! `maddubs` multiplies unsigned by signed bytes into 16-bit pairs, `madd` sums those pairs into
//! each row's 32-bit lane.

use std::arch::x86_64::*;

use super::{
    prefetch, q4k_at, q6_at, Activations, Out, Panels, RowOut, BLOCK, PANEL, Q4K_D, Q4K_MN,
    Q4K_NEG_DMIN, Q4K_SC, Q4_MINS, Q4_PANEL_BLOCK, Q4_SCALES, Q6_BLOCK, Q6_D, Q6_HIGH, Q6_SCALES,
    Q8_PANEL_BLOCK, SUPER,
};

/// [`super::quantize_row`], a block in four vectors, its rounding error kept in registers.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize(x: &[f32], mut first: RowOut, mut rest: Option<RowOut>) {
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
        let (d, codes) = quantize_block(v, &mut first, b);
        let Some(rest) = &mut rest else { continue };
        let d = _mm256_set1_ps(d);
        let error: [__m256; 4] =
            std::array::from_fn(|k| _mm256_fnmadd_ps(d, _mm256_cvtepi32_ps(codes[k]), v[k]));
        quantize_block(error, rest, b);
    }
}

/// Quantizes block `b` (as four vectors) into `out`; returns its scale and codes.
#[inline(always)]
unsafe fn quantize_block(v: [__m256; 4], out: &mut RowOut, b: usize) -> (f32, [__m256i; 4]) {
    let sign = _mm256_set1_epi32(i32::MIN);
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let half = _mm256_set1_epi32(0.5f32.to_bits() as i32);
    let mut m = _mm256_setzero_ps();
    for v in v {
        m = _mm256_max_ps(m, _mm256_and_ps(v, abs));
    }
    let m = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let mut codes = [_mm256_setzero_si256(); 4];
    for (c, v) in codes.iter_mut().zip(v) {
        // Round half away from zero: add 0.5 with the value's sign, truncate.
        let r = _mm256_mul_ps(v, inv);
        let bits = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(r), sign), half);
        *c = _mm256_cvttps_epi32(_mm256_add_ps(r, _mm256_castsi256_ps(bits)));
    }
    // The packs interleave 128-bit lanes; the permute puts the bytes back in order.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(codes[0], codes[1]),
        _mm256_packs_epi32(codes[2], codes[3]),
    );
    let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.quants.as_mut_ptr().add(b * BLOCK) as *mut _, packed);
    let t = _mm256_add_epi32(
        _mm256_add_epi32(codes[0], codes[1]),
        _mm256_add_epi32(codes[2], codes[3]),
    );
    let t = _mm_add_epi32(_mm256_extracti128_si256(t, 1), _mm256_castsi256_si128(t));
    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
    let total = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
    out.set(b, d, total);
    (d, codes)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile(w: &Panels, panels: usize, x: &Activations, out: Out) {
    match x.terms {
        1 => tiles::<1>(w, panels, x, out),
        _ => tiles::<2>(w, panels, x, out),
    }
}

/// The tiles, for `T` int8 rows per input row (a tile's rows hold whole input rows).
#[inline(always)]
unsafe fn tiles<const T: usize>(w: &Panels, panels: usize, x: &Activations, out: Out) {
    for p in 0..panels {
        match *w {
            Panels::Q8 { codes, scales } => {
                // A single tile of rows (a panel read once) asks for the next panel; more tiles
                // re-read each panel from the L1 cache, and there asking made 16 rows slower.
                if x.m <= 2 {
                    with_rows!(x.m, 2, q8[T, true](codes, scales, p, x, 0, out))
                } else {
                    for i in (0..x.m).step_by(2) {
                        let n = (x.m - i).min(2);
                        with_rows!(n, 2, q8[T, false](codes, scales, p, x, i, out))
                    }
                }
            }
            Panels::Q4(data) => {
                for h in 0..2 {
                    for i in (0..x.m).step_by(6) {
                        let n = (x.m - i).min(6);
                        with_rows!(n, 6, q4[T, false](data, p, h, x, i, out))
                    }
                }
            }
            Panels::Q4K(data) => {
                for h in 0..2 {
                    for i in (0..x.m).step_by(6) {
                        let n = (x.m - i).min(6);
                        with_rows!(n, 6, q4[T, true](data, p, h, x, i, out))
                    }
                }
            }
            Panels::Q6(data) => {
                for h in 0..2 {
                    // Two sums a row: three rows keep them in registers (four in two terms,
                    // whose tiles hold whole input rows).
                    let rows = if T == 2 { 4 } else { 3 };
                    for i in (0..x.m).step_by(rows) {
                        let n = (x.m - i).min(rows);
                        with_rows!(n, 6, q6[T](data, p, h, x, i, out))
                    }
                }
            }
        }
    }
}

#[inline(always)]
unsafe fn broadcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// The panel's 16 f32 scales of one block as two halves.
#[inline(always)]
unsafe fn halves(v: &[f32], at: usize) -> [__m256; 2] {
    let p = v.as_ptr().add(at);
    [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
}

/// Eight f16 values (half a 4-bit panel-block's scales or minimums) as f32.
#[inline(always)]
unsafe fn f16_half(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const _))
}

/// Eight bytes (half a Q4_K panel-block's scales or minimums) as f32.
#[inline(always)]
unsafe fn bytes_half(p: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const _)))
}

/// Each input row's terms, added.
#[inline(always)]
unsafe fn store<const T: usize, const R: usize>(
    acc: &[[__m256; 2]; R],
    p: usize,
    i0: usize,
    x: &Activations,
    out: Out,
) {
    for r in (0..R).step_by(T) {
        let o = out.at(x.out_row_of::<T>(i0 + r), p);
        for (h, &a) in acc[r].iter().enumerate() {
            let sum = if T == 2 {
                _mm256_add_ps(a, acc[r + 1][h])
            } else {
                a
            };
            _mm256_storeu_ps(o.add(8 * h), sum);
        }
    }
}

/// Half `h` of panel `p` (8 rows) for each input row, its terms added.
#[inline(always)]
unsafe fn store_half<const T: usize, const R: usize>(
    acc: &[__m256; R],
    p: usize,
    h: usize,
    i0: usize,
    x: &Activations,
    out: Out,
) {
    for r in (0..R).step_by(T) {
        let sum = if T == 2 {
            _mm256_add_ps(acc[r], acc[r + 1])
        } else {
            acc[r]
        };
        _mm256_storeu_ps(out.at(x.out_row_of::<T>(i0 + r), p).add(8 * h), sum);
    }
}

/// Int8 weights: `maddubs` needs one unsigned operand, so it takes |w| and x with w's sign
/// (|w|, |x| <= 127, so a pair of products cannot saturate 16 bits).
#[inline(always)]
unsafe fn q8<const T: usize, const PREFETCH: bool, const R: usize>(
    codes: &[u8],
    scales: &[f32],
    p: usize,
    x: &Activations,
    i0: usize,
    out: Out,
) {
    let blocks = x.blocks();
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let (ones, flip) = (_mm256_set1_epi16(1), _mm256_set1_epi8(-128));
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..blocks {
        if PREFETCH {
            let next = ((p + 1) * blocks + b) * Q8_PANEL_BLOCK;
            prefetch(codes.as_ptr().wrapping_add(next), Q8_PANEL_BLOCK / 64);
            let next = ((p + 1) * blocks + b) * PANEL * 4;
            prefetch((scales.as_ptr() as *const u8).wrapping_add(next), 1);
        }
        let mut dots = [[_mm256_setzero_si256(); 2]; R];
        for j in 0..BLOCK / 4 {
            let at = codes
                .as_ptr()
                .add((p * blocks + b) * Q8_PANEL_BLOCK + j * 4 * PANEL);
            let w: [__m256i; 2] = std::array::from_fn(|h| {
                _mm256_xor_si256(_mm256_loadu_si256(at.add(32 * h) as *const _), flip)
            });
            let abs = w.map(|w| _mm256_sign_epi8(w, w));
            for (r, dots) in dots.iter_mut().enumerate() {
                let v = broadcast4(xq.add(r * x.cols + b * BLOCK + 4 * j));
                for h in 0..2 {
                    let pairs = _mm256_maddubs_epi16(abs[h], _mm256_sign_epi8(v, w[h]));
                    dots[h] = _mm256_add_epi32(dots[h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        let d = halves(scales, (p * blocks + b) * PANEL);
        for (r, acc) in acc.iter_mut().enumerate() {
            let dx = _mm256_set1_ps(*x.scales.get_unchecked((i0 + r) * blocks + b));
            for h in 0..2 {
                let s = _mm256_mul_ps(d[h], dx);
                acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][h]), s, acc[h]);
            }
        }
    }
    store::<T, R>(&acc, p, i0, x, out);
}

/// 4-bit weights are unsigned, so `maddubs` takes them directly; a block's eight 16-bit pair
/// sums stay within 16 bits (8 * 2 * 15 * 127 < 32768), so they are added before widening.
/// Half `h` of panel `p`: its 8 rows, against `R` int8 rows. `K`: Q4_K panels (byte scales and
/// minimums times their super-block's f16 `d` and `-dmin`), else Q4_1 panel-blocks.
#[inline(always)]
unsafe fn q4<const T: usize, const K: bool, const R: usize>(
    data: &[u8],
    p: usize,
    h: usize,
    x: &Activations,
    i0: usize,
    out: Out,
) {
    let blocks = x.blocks();
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let (ones, low4) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0f));
    // Panel-block `pb`'s codes, and its scales' and minimums' super-block head.
    let place = |pb: usize| {
        if K {
            q4k_at(pb)
        } else {
            (pb * Q4_PANEL_BLOCK, 0)
        }
    };
    let mut acc = [_mm256_setzero_ps(); R];
    let mut heads = [_mm256_setzero_ps(); 2];
    for b in 0..blocks {
        let (at, head) = place(p * blocks + b);
        let pb = data.as_ptr().add(at);
        if i0 == 0 && h == 0 {
            let (next, next_head) = place((p + 1) * blocks + b);
            prefetch(data.as_ptr().wrapping_add(next), Q4_PANEL_BLOCK / 64);
            if K && b % SUPER == 0 {
                prefetch(data.as_ptr().wrapping_add(next_head), 1);
            }
        }
        let mut pairs = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let raw = _mm256_loadu_si256(pb.add(j * 4 * PANEL + 32 * h) as *const _);
            let lo = _mm256_and_si256(raw, low4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
            for (r, pairs) in pairs.iter_mut().enumerate() {
                let xb = xq.add(r * x.cols + b * BLOCK + 4 * j);
                let (vl, vh) = (broadcast4(xb), broadcast4(xb.add(BLOCK / 2)));
                *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(lo, vl));
                *pairs = _mm256_add_epi16(*pairs, _mm256_maddubs_epi16(hi, vh));
            }
        }
        let (d, mn) = if K {
            // The super-block's `d` and `-dmin`, once per super-block.
            if b % SUPER == 0 {
                let head = data.as_ptr().add(head);
                heads = [
                    f16_half(head.add(Q4K_D + 16 * h)),
                    f16_half(head.add(Q4K_NEG_DMIN + 16 * h)),
                ];
            }
            (
                _mm256_mul_ps(bytes_half(pb.add(Q4K_SC + 8 * h)), heads[0]),
                _mm256_mul_ps(bytes_half(pb.add(Q4K_MN + 8 * h)), heads[1]),
            )
        } else {
            (
                f16_half(pb.add(Q4_SCALES + 16 * h)),
                f16_half(pb.add(Q4_MINS + 16 * h)),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let k = (i0 + r) * blocks + b;
            let dx = _mm256_set1_ps(*x.scales.get_unchecked(k));
            let sx = _mm256_set1_ps(*x.sums.get_unchecked(k));
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], ones));
            *acc = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, dx), *acc);
            *acc = _mm256_fmadd_ps(mn, sx, *acc);
        }
    }
    store_half::<T, R>(&acc, p, h, i0, x, out);
}

/// 6-bit weights (stored `w + 32`) as 4-bit ones, each code's high 2 bits or-ed in from its
/// step's nibble; `maddubs` pairs (at most 2 * 63 * 127) are widened every step, and the two
/// halves of a block keep sums of their own (from the activations' `-32 * sum(x)` of that half)
/// for their own scales. Half `h` of panel `p`: its 8 rows, against `R` int8 rows.
#[inline(always)]
unsafe fn q6<const T: usize, const R: usize>(
    data: &[u8],
    p: usize,
    h: usize,
    x: &Activations,
    i0: usize,
    out: Out,
) {
    let blocks = x.blocks();
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let ones = _mm256_set1_epi16(1);
    let (low4, low2, mid2) = (
        _mm256_set1_epi8(0x0f),
        _mm256_set1_epi8(0x03),
        _mm256_set1_epi8(0x0c),
    );
    let mut acc = [_mm256_setzero_ps(); R];
    let mut d = _mm256_setzero_ps();
    for b in 0..blocks {
        let (at, head) = q6_at(p * blocks + b);
        let pb = data.as_ptr().add(at);
        if i0 == 0 && h == 0 {
            let (next, next_head) = q6_at((p + 1) * blocks + b);
            prefetch(data.as_ptr().wrapping_add(next), Q6_BLOCK.div_ceil(64));
            if b % SUPER == 0 {
                prefetch(data.as_ptr().wrapping_add(next_head), 1);
            }
        }
        // The super-block's `d`, once per super-block.
        if b % SUPER == 0 {
            d = f16_half(data.as_ptr().add(head + Q6_D + 16 * h));
        }
        let mut lo_dots = [_mm256_setzero_si256(); R];
        let mut hi_dots = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let k = ((i0 + r) * blocks + b) * 2;
            lo_dots[r] = _mm256_set1_epi32(*x.halves.get_unchecked(k));
            hi_dots[r] = _mm256_set1_epi32(*x.halves.get_unchecked(k + 1));
        }
        for j in 0..4 {
            let raw = _mm256_loadu_si256(pb.add(j * 4 * PANEL + 32 * h) as *const _);
            let at = Q6_HIGH + (j / 2) * 4 * PANEL + 32 * h;
            let mut high = _mm256_loadu_si256(pb.add(at) as *const _);
            if j % 2 == 1 {
                high = _mm256_srli_epi16(high, 4);
            }
            let top = _mm256_slli_epi16(_mm256_and_si256(high, low2), 4);
            let lo = _mm256_or_si256(_mm256_and_si256(raw, low4), top);
            let top = _mm256_slli_epi16(_mm256_and_si256(high, mid2), 2);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), top);
            for r in 0..R {
                let xb = xq.add(r * x.cols + b * BLOCK + 4 * j);
                let (vl, vh) = (broadcast4(xb), broadcast4(xb.add(BLOCK / 2)));
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, vl), ones);
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, vh), ones);
                lo_dots[r] = _mm256_add_epi32(lo_dots[r], pl);
                hi_dots[r] = _mm256_add_epi32(hi_dots[r], ph);
            }
        }
        let s_lo = _mm_loadl_epi64(pb.add(Q6_SCALES + 8 * h) as *const _);
        let s_hi = _mm_loadl_epi64(pb.add(Q6_SCALES + PANEL + 8 * h) as *const _);
        let s_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s_lo));
        let s_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s_hi));
        for (r, acc) in acc.iter_mut().enumerate() {
            let dx = _mm256_set1_ps(*x.scales.get_unchecked((i0 + r) * blocks + b));
            let hi = _mm256_mul_ps(_mm256_cvtepi32_ps(hi_dots[r]), s_hi);
            let both = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo_dots[r]), s_lo, hi);
            *acc = _mm256_fmadd_ps(both, _mm256_mul_ps(d, dx), *acc);
        }
    }
    store_half::<T, R>(&acc, p, h, i0, x, out);
}
