//! AVX-512 VNNI: tiles of two panels (32 weight rows) × up to six int8 activation rows (one panel
//! when there are no more rows than one tile holds). Each VNNI instruction multiplies four values
//! of 16 weight rows by four values of one activation row (broadcast) and adds the sums into 16
//! integer lanes; a block's integer sums become f32 once.

use std::arch::x86_64::*;

use super::{
    blocks_per_pass, prefetch, q4k_at, q6_at, Activations, Out, Panels, RowOut, Tile, BLOCK, PANEL,
    Q4K_BLOCK, Q4K_D, Q4K_MN, Q4K_NEG_DMIN, Q4K_SC, Q4_MINS, Q4_PANEL_BLOCK, Q4_SCALES, Q6_BLOCK,
    Q6_D, Q6_HIGH, Q6_SCALES, Q8_PANEL_BLOCK, SUPER,
};

/// Int8 activation rows per tile: six for rows in one term; four for rows in two, whose
/// tiles of six spill registers (measured: a 256-row prompt chunk 12 % faster at four, a
/// 16-row decode 15 % slower).
const fn tile_rows(terms: usize) -> usize {
    if terms == 2 {
        4
    } else {
        6
    }
}

/// [`super::quantize_row`], a block in two vectors, its rounding error kept in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
pub unsafe fn quantize(x: &[f32], mut first: RowOut, mut rest: Option<RowOut>) {
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        let v = [
            _mm512_loadu_ps(x.as_ptr()),
            _mm512_loadu_ps(x.as_ptr().add(16)),
        ];
        let (d, codes) = quantize_block(v, &mut first, b);
        let Some(rest) = &mut rest else { continue };
        let error =
            [0, 1].map(|h| _mm512_fnmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(codes[h]), v[h]));
        quantize_block(error, rest, b);
    }
}

/// Quantizes block `b` (as two vectors) into `out`; returns its scale and codes.
#[inline(always)]
unsafe fn quantize_block(v: [__m512; 2], out: &mut RowOut, b: usize) -> (f32, [__m512i; 2]) {
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_epi32(0.5f32.to_bits() as i32);
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
    let mut codes = [_mm512_setzero_si512(); 2];
    for (h, (c, v)) in codes.iter_mut().zip(v).enumerate() {
        // Round half away from zero: add 0.5 with the value's sign, truncate.
        let r = _mm512_mul_ps(v, inv);
        let bits = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(r), sign), half);
        *c = _mm512_cvttps_epi32(_mm512_add_ps(r, _mm512_castsi512_ps(bits)));
        let at = out.quants.as_mut_ptr().add(b * BLOCK + 16 * h);
        _mm_storeu_si128(at as *mut _, _mm512_cvtepi32_epi8(*c));
    }
    let total = _mm512_reduce_add_epi32(_mm512_add_epi32(codes[0], codes[1]));
    out.set(b, d, total);
    (d, codes)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
pub unsafe fn tile(w: &Panels, panels: usize, x: &Activations, out: Out) {
    match x.terms {
        1 => tiles::<1>(w, panels, x, out),
        _ => tiles::<2>(w, panels, x, out),
    }
}

/// The tiles, for `T` int8 rows per input row (a tile's rows hold whole input rows).
#[inline(always)]
unsafe fn tiles<const T: usize>(w: &Panels, panels: usize, x: &Activations, out: Out) {
    let blocks = x.blocks();
    // With one tile of rows, every weight is read once: one panel at a time then, so that the
    // weights stream through memory in order (two panels side by side are two streams, which
    // the prefetchers serve at about half the speed), and no passes, which exist to keep
    // weights in the L1 cache for the next tile of rows. (Rows in two terms keep them: their
    // passes resume from the terms' sum, so a row's result would depend on the company it
    // keeps.)
    let rows = tile_rows(T);
    let one_tile = x.m <= rows;
    let per_pass = match w {
        _ if one_tile && T == 1 => blocks,
        Panels::Q8 { .. } => blocks_per_pass(blocks, 2 * Q8_PANEL_BLOCK),
        Panels::Q4(_) => blocks_per_pass(blocks, 2 * Q4_PANEL_BLOCK),
        Panels::Q4K(_) => blocks_per_pass(blocks, 2 * Q4K_BLOCK),
        Panels::Q6(_) => blocks_per_pass(blocks, 2 * Q6_BLOCK),
    };
    // Q4_K's scales and minimums as f32 vectors, for a pass's blocks of one or two panels
    // (`[block][panel]`): made once for every tile of rows rather than by each (a 16-row decode
    // made them three times, 9 % slower than Q4_1 blocks' f16 ones). The same values, so a row's
    // result does not depend on whether its tile made them itself.
    // (Allocated only where used: an array on the stack was zeroed by every call, 6 KB for each
    // task of every matmul.)
    let mut pass_scales = Vec::new();
    if matches!(w, Panels::Q4K(_)) && !one_tile {
        pass_scales = vec![[_mm512_setzero_ps(); 2]; 2 * per_pass];
    }
    let mut p = 0;
    while p < panels {
        let pair = panels - p >= 2 && !one_tile;
        for k in (0..blocks).step_by(per_pass) {
            let kb = k..(k + per_pass).min(blocks);
            if let (Panels::Q4K(data), false) = (w, one_tile) {
                for b in kb.clone() {
                    for q in 0..1 + pair as usize {
                        pass_scales[(b - k) * 2 + q] = q4k_scales(data, (p + q) * blocks + b);
                    }
                }
            }
            for i in (0..x.m).step_by(rows) {
                let n = (x.m - i).min(rows);
                let at = Tile {
                    p0: p,
                    i0: i,
                    blocks: kb.clone(),
                };
                match (*w, pair) {
                    (Panels::Q8 { codes, scales }, true) => {
                        with_rows!(n, 6, q8[2, T](codes, scales, x, &at, out))
                    }
                    (Panels::Q8 { codes, scales }, false) => {
                        with_rows!(n, 6, q8[1, T](codes, scales, x, &at, out))
                    }
                    (Panels::Q4(data), true) => {
                        with_rows!(n, 6, q4[2, T, Q4_1](data, &[], x, &at, out))
                    }
                    (Panels::Q4(data), false) => {
                        with_rows!(n, 6, q4[1, T, Q4_1](data, &[], x, &at, out))
                    }
                    (Panels::Q4K(data), true) => {
                        with_rows!(n, 6, q4[2, T, Q4K_PASS](data, &pass_scales, x, &at, out))
                    }
                    (Panels::Q4K(data), false) if one_tile => {
                        with_rows!(n, 6, q4[1, T, Q4K](data, &[], x, &at, out))
                    }
                    (Panels::Q4K(data), false) => {
                        with_rows!(n, 6, q4[1, T, Q4K_PASS](data, &pass_scales, x, &at, out))
                    }
                    (Panels::Q6(data), true) => with_rows!(n, 6, q6[2, T](data, x, &at, out)),
                    (Panels::Q6(data), false) => with_rows!(n, 6, q6[1, T](data, x, &at, out)),
                }
            }
        }
        p += if pair { 2 } else { 1 };
    }
}

/// Which 4-bit panels [`q4`] reads: Q4_1 ones, Q4_K ones, or Q4_K ones whose scales and
/// minimums the pass has made already.
const Q4_1: u8 = 0;
const Q4K: u8 = 1;
const Q4K_PASS: u8 = 2;

/// Q4_K panel-block `pb`'s scales and minimums in f32: each row's byte times its super-block's
/// f16 `d` or `-dmin`.
#[inline(always)]
unsafe fn q4k_scales(data: &[u8], pb: usize) -> [__m512; 2] {
    let (at, head) = q4k_at(pb);
    let (pb, head) = (data.as_ptr().add(at), data.as_ptr().add(head));
    [
        _mm512_mul_ps(bytes16(pb.add(Q4K_SC)), f16x16(head.add(Q4K_D))),
        _mm512_mul_ps(bytes16(pb.add(Q4K_MN)), f16x16(head.add(Q4K_NEG_DMIN))),
    ]
}

/// Four activation bytes, as every 32-bit lane.
#[inline(always)]
unsafe fn broadcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
}

/// 16 f16 values as f32.
#[inline(always)]
unsafe fn f16x16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p as *const _))
}

/// 16 bytes as f32.
#[inline(always)]
unsafe fn bytes16(p: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const _)))
}

/// Integer sums of a tile's blocks: with few accumulators, two sets (summed at the end of the
/// block) keep enough independent chains of VNNI instructions in flight. Integer additions are
/// exact, so the split does not change a result.
struct Dots<const P: usize, const R: usize> {
    sets: [[[__m512i; R]; P]; 2],
}

impl<const P: usize, const R: usize> Dots<P, R> {
    const SPLIT: bool = P * R < 6;

    #[inline(always)]
    unsafe fn new(init: impl Fn(usize) -> __m512i) -> Self {
        Self {
            sets: [
                [std::array::from_fn(&init); P],
                [[_mm512_setzero_si512(); R]; P],
            ],
        }
    }

    /// Adds `w · x` into row `r` of panel `p`, in set `set`.
    #[inline(always)]
    unsafe fn add(&mut self, set: usize, p: usize, r: usize, w: __m512i, x: __m512i) {
        let s = if Self::SPLIT { set } else { 0 };
        self.sets[s][p][r] = _mm512_dpbusd_epi32(self.sets[s][p][r], w, x);
    }

    #[inline(always)]
    unsafe fn get(&self, p: usize, r: usize) -> __m512 {
        let d = if Self::SPLIT {
            _mm512_add_epi32(self.sets[0][p][r], self.sets[1][p][r])
        } else {
            self.sets[0][p][r]
        };
        _mm512_cvtepi32_ps(d)
    }
}

/// The tile's sums so far: zero on its first blocks, else what the last pass stored (in the
/// first term of each input row).
///
/// Loops, not `array::from_fn`: a closure does not take the kernel's target features, so the
/// intrinsics inside it stayed calls (measured: 3.5 % of a 16-stream decode).
#[inline(always)]
unsafe fn resume<const P: usize, const T: usize, const R: usize>(
    at: &Tile,
    x: &Activations,
    out: Out,
) -> [[__m512; R]; P] {
    let mut acc = [[_mm512_setzero_ps(); R]; P];
    if at.blocks.start != 0 {
        for (p, acc) in acc.iter_mut().enumerate() {
            for r in (0..R).step_by(T) {
                acc[r] = _mm512_loadu_ps(out.at(x.out_row_of::<T>(at.i0 + r), at.p0 + p));
            }
        }
    }
    acc
}

/// Each input row's terms, added.
#[inline(always)]
unsafe fn store<const P: usize, const T: usize, const R: usize>(
    acc: &[[__m512; R]; P],
    at: &Tile,
    x: &Activations,
    out: Out,
) {
    for (p, acc) in acc.iter().enumerate() {
        for r in (0..R).step_by(T) {
            let sum = if T == 2 {
                _mm512_add_ps(acc[r], acc[r + 1])
            } else {
                acc[r]
            };
            _mm512_storeu_ps(out.at(x.out_row_of::<T>(at.i0 + r), at.p0 + p), sum);
        }
    }
}

/// Int8 weights (stored `w + 128`), 8 steps of 4 values per block; each block's sums start
/// from the activations' `-128 * sum(x)`.
#[inline(always)]
unsafe fn q8<const P: usize, const T: usize, const R: usize>(
    codes: &[u8],
    scales: &[f32],
    x: &Activations,
    at: &Tile,
    out: Out,
) {
    let (p0, i0, blocks) = (at.p0, at.i0, x.blocks());
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let mut acc = resume::<P, T, R>(at, x, out);
    for b in at.blocks.clone() {
        if i0 == 0 {
            for p in P..2 * P {
                let next = ((p0 + p) * blocks + b) * Q8_PANEL_BLOCK;
                prefetch(codes.as_ptr().wrapping_add(next), Q8_PANEL_BLOCK / 64);
                let next = ((p0 + p) * blocks + b) * PANEL * 4;
                prefetch((scales.as_ptr() as *const u8).wrapping_add(next), 1);
            }
        }
        let mut dots = Dots::<P, R>::new(|r| _mm512_set1_epi32(x.offsets[(i0 + r) * blocks + b]));
        for j in 0..BLOCK / 4 {
            let w: [__m512i; P] = std::array::from_fn(|p| {
                let at = ((p0 + p) * blocks + b) * Q8_PANEL_BLOCK + j * 4 * PANEL;
                _mm512_loadu_si512(codes.as_ptr().add(at) as *const _)
            });
            for r in 0..R {
                let v = broadcast4(xq.add(r * x.cols + b * BLOCK + 4 * j));
                for (p, &w) in w.iter().enumerate() {
                    dots.add(j % 2, p, r, w, v);
                }
            }
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let d = _mm512_loadu_ps(scales.as_ptr().add(((p0 + p) * blocks + b) * PANEL));
            for (r, acc) in acc.iter_mut().enumerate() {
                let dx = _mm512_set1_ps(*x.scales.get_unchecked((i0 + r) * blocks + b));
                *acc = _mm512_fmadd_ps(dots.get(p, r), _mm512_mul_ps(d, dx), *acc);
            }
        }
    }
    store::<P, T, R>(&acc, at, x, out);
}

/// 4-bit weights, 4 steps per block: each 64-byte load gives values `4j..4j + 4` (low
/// nibbles) and `16 + 4j..` (high nibbles) of 16 rows; the minimum adds `min * scale * sum(x)`.
/// `K`: which panels (see [`Q4_1`]); `scales`, with [`Q4K_PASS`], the pass's.
#[inline(always)]
unsafe fn q4<const P: usize, const T: usize, const K: u8, const R: usize>(
    data: &[u8],
    scales: &[[__m512; 2]],
    x: &Activations,
    at: &Tile,
    out: Out,
) {
    let (p0, i0, blocks) = (at.p0, at.i0, x.blocks());
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let low4 = _mm512_set1_epi8(0x0f);
    // Panel-block `pb`'s codes, and its scales' and minimums' super-block head.
    let place = |pb: usize| {
        if K == Q4_1 {
            (pb * Q4_PANEL_BLOCK, 0)
        } else {
            q4k_at(pb)
        }
    };
    let mut heads = [[_mm512_setzero_ps(); 2]; P];
    let mut acc = resume::<P, T, R>(at, x, out);
    for b in at.blocks.clone() {
        if i0 == 0 {
            for p in P..2 * P {
                let (next, head) = place((p0 + p) * blocks + b);
                prefetch(data.as_ptr().wrapping_add(next), Q4_PANEL_BLOCK / 64);
                if K != Q4_1 && b % SUPER == 0 {
                    prefetch(data.as_ptr().wrapping_add(head), 1);
                }
            }
        }
        let mut dots = Dots::<P, R>::new(|_| _mm512_setzero_si512());
        for j in 0..4 {
            let raw: [__m512i; P] = std::array::from_fn(|p| {
                let (at, _) = place((p0 + p) * blocks + b);
                _mm512_loadu_si512(data.as_ptr().add(at + j * 4 * PANEL) as *const _)
            });
            let lo = raw.map(|v| _mm512_and_si512(v, low4));
            let hi = raw.map(|v| _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
            for r in 0..R {
                let xb = xq.add(r * x.cols + b * BLOCK + 4 * j);
                let (vl, vh) = (broadcast4(xb), broadcast4(xb.add(BLOCK / 2)));
                for p in 0..P {
                    dots.add(0, p, r, lo[p], vl);
                    dots.add(1, p, r, hi[p], vh);
                }
            }
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let pb = (p0 + p) * blocks + b;
            let [d, mn] = match K {
                Q4_1 => {
                    let pb = data.as_ptr().add(place(pb).0);
                    [f16x16(pb.add(Q4_SCALES)), f16x16(pb.add(Q4_MINS))]
                }
                Q4K => {
                    // The super-block's `d` and `-dmin` once per super-block (each block's
                    // products the same as `q4k_scales`').
                    if b % SUPER == 0 || b == at.blocks.start {
                        let head = data.as_ptr().add(place(pb).1);
                        heads[p] = [f16x16(head.add(Q4K_D)), f16x16(head.add(Q4K_NEG_DMIN))];
                    }
                    let at = data.as_ptr().add(place(pb).0);
                    [
                        _mm512_mul_ps(bytes16(at.add(Q4K_SC)), heads[p][0]),
                        _mm512_mul_ps(bytes16(at.add(Q4K_MN)), heads[p][1]),
                    ]
                }
                _ => *scales.get_unchecked((b - at.blocks.start) * 2 + p),
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let k = (i0 + r) * blocks + b;
                let dx = _mm512_set1_ps(*x.scales.get_unchecked(k));
                *acc = _mm512_fmadd_ps(dots.get(p, r), _mm512_mul_ps(d, dx), *acc);
                *acc = _mm512_fmadd_ps(mn, _mm512_set1_ps(*x.sums.get_unchecked(k)), *acc);
            }
        }
    }
    store::<P, T, R>(&acc, at, x, out);
}

/// 6-bit weights (stored `w + 32`), 4 steps per block as for 4-bit ones, each code's high 2 bits
/// or-ed in from the step's nibble of the high-bit vectors; the two halves of a block keep sums
/// of their own (each from the activations' `-32 * sum(x)` of that half) for their own scales.
#[inline(always)]
unsafe fn q6<const P: usize, const T: usize, const R: usize>(
    data: &[u8],
    x: &Activations,
    at: &Tile,
    out: Out,
) {
    let (p0, i0, blocks) = (at.p0, at.i0, x.blocks());
    let xq = x.quants.as_ptr().add(i0 * x.cols);
    let (low4, low2, mid2) = (
        _mm512_set1_epi8(0x0f),
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x0c),
    );
    let mut acc = resume::<P, T, R>(at, x, out);
    let mut heads = [_mm512_setzero_ps(); P];
    for b in at.blocks.clone() {
        if i0 == 0 {
            for p in P..2 * P {
                let (next, head) = q6_at((p0 + p) * blocks + b);
                prefetch(data.as_ptr().wrapping_add(next), Q6_BLOCK.div_ceil(64));
                if b % SUPER == 0 {
                    prefetch(data.as_ptr().wrapping_add(head), 1);
                }
            }
        }
        let half = |r: usize, h: usize| *x.halves.get_unchecked(((i0 + r) * blocks + b) * 2 + h);
        let mut lo_dots = [[_mm512_setzero_si512(); R]; P];
        let mut hi_dots = [[_mm512_setzero_si512(); R]; P];
        for p in 0..P {
            for r in 0..R {
                lo_dots[p][r] = _mm512_set1_epi32(half(r, 0));
                hi_dots[p][r] = _mm512_set1_epi32(half(r, 1));
            }
        }
        // Loops, not closures, wherever intrinsics are (see `resume`).
        let mut lo = [_mm512_setzero_si512(); P];
        let mut hi = [_mm512_setzero_si512(); P];
        for j in 0..4 {
            for p in 0..P {
                let pb = data.as_ptr().add(q6_at((p0 + p) * blocks + b).0);
                let raw = _mm512_loadu_si512(pb.add(j * 4 * PANEL) as *const _);
                let mut high =
                    _mm512_loadu_si512(pb.add(Q6_HIGH + (j / 2) * 4 * PANEL) as *const _);
                if j % 2 == 1 {
                    high = _mm512_srli_epi16(high, 4);
                }
                let top = _mm512_slli_epi16(_mm512_and_si512(high, low2), 4);
                lo[p] = _mm512_or_si512(_mm512_and_si512(raw, low4), top);
                let top = _mm512_slli_epi16(_mm512_and_si512(high, mid2), 2);
                hi[p] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), top);
            }
            for r in 0..R {
                let xb = xq.add(r * x.cols + b * BLOCK + 4 * j);
                let (vl, vh) = (broadcast4(xb), broadcast4(xb.add(BLOCK / 2)));
                for p in 0..P {
                    lo_dots[p][r] = _mm512_dpbusd_epi32(lo_dots[p][r], lo[p], vl);
                    hi_dots[p][r] = _mm512_dpbusd_epi32(hi_dots[p][r], hi[p], vh);
                }
            }
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let (start, head) = q6_at((p0 + p) * blocks + b);
            let pb = data.as_ptr().add(start);
            // The super-block's `d`, once per super-block.
            if b % SUPER == 0 || b == at.blocks.start {
                heads[p] = f16x16(data.as_ptr().add(head + Q6_D));
            }
            let d = heads[p];
            let s_lo = _mm_loadu_si128(pb.add(Q6_SCALES) as *const _);
            let s_hi = _mm_loadu_si128(pb.add(Q6_SCALES + PANEL) as *const _);
            let s_lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s_lo));
            let s_hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s_hi));
            for (r, acc) in acc.iter_mut().enumerate() {
                let dx = _mm512_set1_ps(*x.scales.get_unchecked((i0 + r) * blocks + b));
                let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(hi_dots[p][r]), s_hi);
                let both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_dots[p][r]), s_lo, hi);
                *acc = _mm512_fmadd_ps(both, _mm512_mul_ps(d, dx), *acc);
            }
        }
    }
    store::<P, T, R>(&acc, at, x, out);
}
