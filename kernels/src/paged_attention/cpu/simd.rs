//! The two inner loops of CPU attention, once per instruction set.
//!
//! - **Scores**: a KV head's group of query heads against its keys, `q_g · k_p * scale` for every
//!   position `p`. A dot product of one query and one key ends in a sum across the vector's
//!   lanes, and doing that sum once per position costs more than the multiplications. So the x86
//!   versions score a run of positions (16 with AVX-512, 8 with AVX2) into as many vector
//!   accumulators and add all of them across lanes at once (a transpose-and-add), which leaves
//!   one score per lane.
//! - **Weighted values**: `Σ_p w_p v_p` for one query head, each value row multiplied into
//!   accumulators that stay in registers (fused multiply-adds, which the compiler may not form
//!   from plain Rust).
//!
//! The portable versions are plain loops for any CPU.
//!
//! The cache holds f32 or f16 ([`Element`]); f16 rows are widened to f32 as they are loaded
//! (one `vcvtph2ps` per 8 or 16 values), so the arithmetic is f32 either way.

use half::f16;

use super::LANES;

/// What a cache row holds.
pub(super) trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// `LANES` values from `p`, as f32.
    ///
    /// # Safety
    /// AVX-512F; `p` points at `LANES` values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// 8 values from `p`, as f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points at 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// A KV head's rows: the cache (from the head's first value) and each position's row offset.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a, E> {
    pub cache: &'a [E],
    pub offsets: &'a [usize],
}

/// The inner loops for one instruction set.
pub(super) trait Simd {
    /// `out[g * n + p] = q_g · k_p * scale` for the `group` query heads stored back to back in
    /// `q` and the `n = keys.offsets.len()` positions.
    ///
    /// # Safety
    /// The CPU must have the instruction set; every offset must leave `C * LANES` floats of the
    /// cache after it; `q` holds `group * C * LANES` floats and `out` `group * n`.
    unsafe fn score<const C: usize, E: Element>(
        q: &[f32],
        group: usize,
        keys: Rows<E>,
        scale: f32,
        out: &mut [f32],
    );

    /// `Σ_p weights[p] * v_p` over the positions of `values`.
    ///
    /// # Safety
    /// As for [`Simd::score`]; `weights` has one entry per offset.
    unsafe fn weigh<const C: usize, E: Element>(
        weights: &[f32],
        values: Rows<E>,
    ) -> [[f32; LANES]; C];
}

/// Any CPU: one dot product per (head, position), its lanes added pairwise.
pub(super) struct Portable;

impl Simd for Portable {
    #[inline(always)]
    unsafe fn score<const C: usize, E: Element>(
        q: &[f32],
        group: usize,
        keys: Rows<E>,
        scale: f32,
        out: &mut [f32],
    ) {
        let n = keys.offsets.len();
        let hd = C * LANES;
        for (p, &row) in keys.offsets.iter().enumerate() {
            let key = widen::<C, E>(&keys.cache[row..]);
            for g in 0..group {
                out[g * n + p] = dot::<C>(head::<C>(&q[g * hd..]), &key) * scale;
            }
        }
    }

    #[inline(always)]
    unsafe fn weigh<const C: usize, E: Element>(
        weights: &[f32],
        values: Rows<E>,
    ) -> [[f32; LANES]; C] {
        let mut acc = [[0f32; LANES]; C];
        for (&w, &row) in weights.iter().zip(values.offsets) {
            for (a, x) in acc.iter_mut().zip(&widen::<C, E>(&values.cache[row..])) {
                for i in 0..LANES {
                    a[i] += w * x[i];
                }
            }
        }
        acc
    }
}

/// A head's `C * LANES` floats as chunks the compiler keeps in vector registers.
#[inline(always)]
pub(super) fn head<const C: usize>(x: &[f32]) -> &[[f32; LANES]; C] {
    x[..C * LANES]
        .as_chunks::<LANES>()
        .0
        .try_into()
        .expect("C chunks")
}

/// A cache row's first `C * LANES` values as f32 chunks.
#[inline(always)]
fn widen<const C: usize, E: Element>(x: &[E]) -> [[f32; LANES]; C] {
    let x = &x[..C * LANES];
    let mut out = [[0f32; LANES]; C];
    for (o, x) in out.iter_mut().zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            o[i] = x[i].to_f32();
        }
    }
    out
}

/// Dot product of two heads: lane-wise products summed over the chunks, then the lanes added
/// pairwise (a tree, not a chain of dependent additions).
#[inline(always)]
fn dot<const C: usize>(a: &[[f32; LANES]; C], b: &[[f32; LANES]; C]) -> f32 {
    let mut acc = [0f32; LANES];
    for (a, b) in a.iter().zip(b) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Element, Rows, Simd, LANES};

    /// The rows of positions `start..start + R` and how many of them there are: past the last
    /// position, a run repeats its row (those lanes' scores are not stored).
    #[inline(always)]
    unsafe fn run<const R: usize, E>(keys: Rows<E>, start: usize) -> ([*const E; R], usize) {
        let take = (keys.offsets.len() - start).min(R);
        let mut rows = [keys.cache.as_ptr(); R];
        for (j, row) in rows.iter_mut().enumerate() {
            *row = row.add(keys.offsets[start + j.min(take - 1)]);
        }
        (rows, take)
    }

    /// AVX-512 (a `LANES`-float chunk is one register).
    pub(in super::super) struct Avx512;

    impl Simd for Avx512 {
        /// Runs of 16 positions, one accumulator each: each chunk of the query is loaded once
        /// and multiplied into all 16 keys.
        #[inline(always)]
        unsafe fn score<const C: usize, E: Element>(
            q: &[f32],
            group: usize,
            keys: Rows<E>,
            scale: f32,
            out: &mut [f32],
        ) {
            let n = keys.offsets.len();
            let scale = _mm512_set1_ps(scale);
            for start in (0..n).step_by(16) {
                let (key, take) = run::<16, E>(keys, start);
                for g in 0..group {
                    let qg = q.as_ptr().add(g * C * LANES);
                    let mut qc = [_mm512_setzero_ps(); C];
                    for (c, qc) in qc.iter_mut().enumerate() {
                        *qc = _mm512_loadu_ps(qg.add(c * LANES));
                    }
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (a, &key) in acc.iter_mut().zip(&key) {
                        *a = _mm512_mul_ps(qc[0], E::load16(key));
                        for (c, &qc) in qc.iter().enumerate().skip(1) {
                            *a = _mm512_fmadd_ps(qc, E::load16(key.add(c * LANES)), *a);
                        }
                    }
                    let s = _mm512_mul_ps(sum_lanes16(acc), scale);
                    let mask = (u32::MAX >> (32 - take)) as u16;
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(g * n + start), mask, s);
                }
            }
        }

        /// Two positions at a time into two sets of accumulators, so that twice as many
        /// multiply-adds are in flight.
        #[inline(always)]
        unsafe fn weigh<const C: usize, E: Element>(
            weights: &[f32],
            values: Rows<E>,
        ) -> [[f32; LANES]; C] {
            let base = values.cache.as_ptr();
            let (mut even, mut odd) = ([_mm512_setzero_ps(); C], [_mm512_setzero_ps(); C]);
            let mut p = 0;
            while p + 1 < weights.len() {
                add_row::<C, E>(&mut even, weights[p], base.add(values.offsets[p]));
                add_row::<C, E>(&mut odd, weights[p + 1], base.add(values.offsets[p + 1]));
                p += 2;
            }
            if p < weights.len() {
                add_row::<C, E>(&mut even, weights[p], base.add(values.offsets[p]));
            }
            let mut sum = [[0f32; LANES]; C];
            for (c, s) in sum.iter_mut().enumerate() {
                _mm512_storeu_ps(s.as_mut_ptr(), _mm512_add_ps(even[c], odd[c]));
            }
            sum
        }
    }

    /// `acc += w * row` over a head's `C` chunks.
    #[inline(always)]
    unsafe fn add_row<const C: usize, E: Element>(acc: &mut [__m512; C], w: f32, row: *const E) {
        let w = _mm512_set1_ps(w);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(w, E::load16(row.add(c * LANES)), *a);
        }
    }

    /// Lane `j` of the result is the sum of `v[j]`'s 16 lanes: four rounds that pair vectors and
    /// add their halves (256-bit, 128-bit, 64-bit, then 32-bit pieces), then one permute that
    /// puts the sums in order.
    #[inline(always)]
    pub(super) unsafe fn sum_lanes16(v: [__m512; 16]) -> __m512 {
        // Round 1: 128-bit chunks [a0 a1 b0 b1] + [a2 a3 b2 b3].
        let mut r1 = [_mm512_setzero_ps(); 8];
        for (i, r) in r1.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *r = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        // Round 2: chunk k of r2[i] holds four partial sums of v[4i + k].
        let mut r2 = [_mm512_setzero_ps(); 4];
        for (i, r) in r2.iter_mut().enumerate() {
            let (a, b) = (r1[2 * i], r1[2 * i + 1]);
            *r = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            );
        }
        // Round 3: chunk k of r3[i] holds two partials of v[8i + k] and two of v[8i + 4 + k].
        let mut r3 = [_mm512_setzero_ps(); 2];
        for (i, r) in r3.iter_mut().enumerate() {
            let (a, b) = (r2[2 * i], r2[2 * i + 1]);
            *r = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // Round 4: chunk k holds the sums of v[k], v[k + 4], v[k + 8] and v[k + 12].
        let (a, b) = (_mm512_castps_pd(r3[0]), _mm512_castps_pd(r3[1]));
        let r4 = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, r4)
    }

    /// AVX2 (a `LANES`-float chunk is two registers).
    pub(in super::super) struct Avx2;

    impl Simd for Avx2 {
        /// Runs of 8 positions, one accumulator each: each 8-float piece of the query is loaded
        /// once and multiplied into all eight keys.
        #[inline(always)]
        unsafe fn score<const C: usize, E: Element>(
            q: &[f32],
            group: usize,
            keys: Rows<E>,
            scale: f32,
            out: &mut [f32],
        ) {
            let n = keys.offsets.len();
            let scale = _mm256_set1_ps(scale);
            for start in (0..n).step_by(8) {
                let (key, take) = run::<8, E>(keys, start);
                for g in 0..group {
                    let qg = q.as_ptr().add(g * C * LANES);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for piece in 0..2 * C {
                        let qp = _mm256_loadu_ps(qg.add(piece * 8));
                        for (a, k) in acc.iter_mut().zip(key) {
                            *a = _mm256_fmadd_ps(qp, E::load8(k.add(piece * 8)), *a);
                        }
                    }
                    let s = _mm256_mul_ps(sum_lanes8(acc), scale);
                    let dst = out.as_mut_ptr().add(g * n + start);
                    if take == 8 {
                        _mm256_storeu_ps(dst, s);
                    } else {
                        let mut tail = [0f32; 8];
                        _mm256_storeu_ps(tail.as_mut_ptr(), s);
                        std::ptr::copy_nonoverlapping(tail.as_ptr(), dst, take);
                    }
                }
            }
        }

        #[inline(always)]
        unsafe fn weigh<const C: usize, E: Element>(
            weights: &[f32],
            values: Rows<E>,
        ) -> [[f32; LANES]; C] {
            let base = values.cache.as_ptr();
            let mut acc = [[_mm256_setzero_ps(); 2]; C];
            for (&w, &row) in weights.iter().zip(values.offsets) {
                let (w, row) = (_mm256_set1_ps(w), base.add(row));
                for (c, a) in acc.iter_mut().enumerate() {
                    for (h, a) in a.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, E::load8(row.add(c * LANES + 8 * h)), *a);
                    }
                }
            }
            let mut sum = [[0f32; LANES]; C];
            for (s, a) in sum.iter_mut().zip(&acc) {
                _mm256_storeu_ps(s.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(s.as_mut_ptr().add(8), a[1]);
            }
            sum
        }
    }

    /// Lane `j` of the result is the sum of `v[j]`'s 8 lanes: two rounds of horizontal adds,
    /// then the 128-bit halves added.
    #[inline(always)]
    pub(super) unsafe fn sum_lanes8(v: [__m256; 8]) -> __m256 {
        let mut h = [_mm256_setzero_ps(); 4];
        for (i, h) in h.iter_mut().enumerate() {
            *h = _mm256_hadd_ps(v[2 * i], v[2 * i + 1]);
        }
        let lo = _mm256_hadd_ps(h[0], h[1]);
        let hi = _mm256_hadd_ps(h[2], h[3]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        )
    }

    #[cfg(test)]
    mod tests {
        use std::array::from_fn;

        use super::*;

        /// Each lane of the transpose-and-add is its own vector's sum, in order.
        #[test]
        fn lane_sums_land_in_order() {
            let v: Vec<[f32; 16]> = (0..16)
                .map(|j| from_fn(|i| (j * 100 + i * i) as f32))
                .collect();
            let want: Vec<f32> = v.iter().map(|x| x.iter().sum()).collect();
            if is_x86_feature_detected!("avx512f") {
                let mut got = [0f32; 16];
                // SAFETY: AVX-512F is present.
                unsafe { sums16(&v, &mut got) };
                assert_eq!(got.as_slice(), want);
            }
            if is_x86_feature_detected!("avx2") {
                let mut got = [0f32; 8];
                // SAFETY: AVX2 is present.
                unsafe { sums8(&v, &mut got) };
                let want8: Vec<f32> = v[..8].iter().map(|x| x[..8].iter().sum()).collect();
                assert_eq!(got.as_slice(), want8);
            }
        }

        #[target_feature(enable = "avx512f")]
        unsafe fn sums16(v: &[[f32; 16]], out: &mut [f32; 16]) {
            let v = from_fn(|j| _mm512_loadu_ps(v[j].as_ptr()));
            _mm512_storeu_ps(out.as_mut_ptr(), sum_lanes16(v));
        }

        #[target_feature(enable = "avx2")]
        unsafe fn sums8(v: &[[f32; 16]], out: &mut [f32; 8]) {
            let v = from_fn(|j| _mm256_loadu_ps(v[j].as_ptr()));
            _mm256_storeu_ps(out.as_mut_ptr(), sum_lanes8(v));
        }
    }
}
