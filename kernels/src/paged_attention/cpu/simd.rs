//! The two inner loops of CPU attention, once per instruction set.
//!
//! - **Scores**: a KV head's group of query heads against its keys, `q_g · k_p * scale` for every
//!   position `p`. A dot product of one query and one key ends in a sum across the vector's
//!   lanes, and doing that sum once per position costs more than the multiplications. So the x86
//!   versions score a run of positions (16 with AVX-512, 8 with AVX2) into as many vector
//!   accumulators and add all of them across lanes at once (a transpose-and-add), which leaves
//!   one score per lane.
//! - **Weighted values**: `Σ_p w_p v_p` for each query head of the group. The x86 versions take
//!   the group together, a chunk of the head at a time: each chunk of a value row is loaded (and
//!   widened) once and multiplied into every head's accumulator, so the values are read once
//!   per KV head rather than once per query head. Fused multiply-adds, which the compiler may
//!   not form from plain Rust.
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
    /// Asks for the first rows of a pass (where the CPU can; else nothing): the passes ask for
    /// the rest as they go.
    ///
    /// # Safety
    /// As for [`Simd::score`].
    #[inline(always)]
    unsafe fn prefetch_start<E>(_rows: Rows<E>, _hd: usize) {}

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

    /// `out_g = Σ_p weights[g * n + p] * v_p` for the `group` query heads whose weights are
    /// stored back to back (`n = values.offsets.len()`), their outputs back to back in `out`.
    ///
    /// # Safety
    /// As for [`Simd::score`]; `weights` holds `group * n` floats and `out` `group * C * LANES`.
    unsafe fn weigh<const C: usize, E: Element>(
        weights: &[f32],
        group: usize,
        values: Rows<E>,
        out: &mut [f32],
    );
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
        group: usize,
        values: Rows<E>,
        out: &mut [f32],
    ) {
        let n = values.offsets.len();
        for g in 0..group {
            let mut acc = [[0f32; LANES]; C];
            for (&w, &row) in weights[g * n..][..n].iter().zip(values.offsets) {
                for (a, x) in acc.iter_mut().zip(&widen::<C, E>(&values.cache[row..])) {
                    for i in 0..LANES {
                        a[i] += w * x[i];
                    }
                }
            }
            for (o, a) in out[g * C * LANES..].chunks_exact_mut(LANES).zip(&acc) {
                o.copy_from_slice(a);
            }
        }
    }
}

/// One vector register's worth of floats, for the weighted values and the prompt tiles
/// ([`super::tiled`]).
///
/// # Safety
/// Every function needs the instruction set of its implementation; pointers name `L` floats
/// (or `L` values of `E`).
pub(super) trait Width {
    type V: Copy;
    /// Floats per vector.
    const L: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load<E: Element>(p: *const E) -> Self::V;
    unsafe fn loadu(p: *const f32) -> Self::V;
    /// `acc + w * v` (fused where the instruction set can).
    unsafe fn fmadd(w: f32, v: Self::V, acc: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
}

/// Eight floats as an array, for any CPU (the compiler vectorises what it can).
impl Width for Portable {
    type V = [f32; 8];
    const L: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.; 8]
    }

    #[inline(always)]
    unsafe fn load<E: Element>(p: *const E) -> [f32; 8] {
        std::array::from_fn(|i| (*p.add(i)).to_f32())
    }

    #[inline(always)]
    unsafe fn loadu(p: *const f32) -> [f32; 8] {
        p.cast::<[f32; 8]>().read_unaligned()
    }

    #[inline(always)]
    unsafe fn fmadd(w: f32, v: [f32; 8], acc: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| acc[i] + w * v[i])
    }

    #[inline(always)]
    unsafe fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: [f32; 8]) {
        p.cast::<[f32; 8]>().write_unaligned(v)
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

    use super::{Element, Rows, Simd, Width, LANES};

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

    /// Positions a pass asks for ahead of the one it reads (32 and 128 measured the same).
    const AHEAD: usize = 64;

    /// Asks for the cache lines of rows `start..start + count` (those that exist), `hd` values
    /// each, into L2. A sequence's blocks lie anywhere in the cache and a KV head's rows are
    /// strided within a block, which the hardware prefetchers follow poorly: in a server's step,
    /// where each layer's cache comes from memory, this makes the kernel 30-45 % faster
    /// (`decode x16, 30 layers` in the attention bench). Into L1 it gained nothing.
    #[inline(always)]
    unsafe fn prefetch<E>(rows: Rows<E>, start: usize, count: usize, hd: usize) {
        let bytes = hd * size_of::<E>();
        let end = (start + count).min(rows.offsets.len());
        for p in start.min(end)..end {
            let row = rows
                .cache
                .as_ptr()
                .add(*rows.offsets.get_unchecked(p))
                .cast::<i8>();
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(row.add(line));
            }
            // The row's last line, where the row does not start on a line.
            _mm_prefetch::<_MM_HINT_T1>(row.add(bytes - 1));
        }
    }

    /// AVX-512 (a `LANES`-float chunk is one register).
    pub(in super::super) struct Avx512;

    impl Simd for Avx512 {
        #[inline(always)]
        unsafe fn prefetch_start<E>(rows: Rows<E>, hd: usize) {
            prefetch(rows, 0, AHEAD, hd)
        }

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
                prefetch(keys, start + AHEAD, 16, C * LANES);
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

        #[inline(always)]
        unsafe fn weigh<const C: usize, E: Element>(
            weights: &[f32],
            group: usize,
            values: Rows<E>,
            out: &mut [f32],
        ) {
            weigh_group::<E, Self>(weights, group, values, C * LANES, out)
        }
    }

    impl Width for Avx512 {
        type V = __m512;
        const L: usize = 16;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline(always)]
        unsafe fn load<E: Element>(p: *const E) -> __m512 {
            E::load16(p)
        }

        #[inline(always)]
        unsafe fn loadu(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }

        #[inline(always)]
        unsafe fn fmadd(w: f32, v: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(_mm512_set1_ps(w), v, acc)
        }

        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }

        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
    }

    /// [`Simd::weigh`] for vectors of `W::L` floats: four heads of the group at a time (or what
    /// is left), over sets of accumulators that take positions in turn so that enough
    /// multiply-adds are in flight: 4 sets, 2 for four heads on AVX2, so that they stay in
    /// registers (24 of AVX-512's 32, 12 of AVX2's 16 at most).
    #[inline(always)]
    unsafe fn weigh_group<E: Element, W: Width>(
        weights: &[f32],
        group: usize,
        values: Rows<E>,
        hd: usize,
        out: &mut [f32],
    ) {
        for g in (0..group).step_by(4) {
            match group - g {
                1 => heads::<1, 4, E, W>(weights, g, values, hd, out),
                2 => heads::<2, 4, E, W>(weights, g, values, hd, out),
                3 => heads::<3, 4, E, W>(weights, g, values, hd, out),
                _ if W::L == 16 => heads::<4, 4, E, W>(weights, g, values, hd, out),
                _ => heads::<4, 2, E, W>(weights, g, values, hd, out),
            }
        }
    }

    /// Heads `g0..g0 + G` of the group: runs of positions whose value rows fit in L1, and
    /// within a run, `W::L` floats of the head at a time (the sums so far kept in `out`).
    #[inline(always)]
    unsafe fn heads<const G: usize, const S: usize, E: Element, W: Width>(
        weights: &[f32],
        g0: usize,
        values: Rows<E>,
        hd: usize,
        out: &mut [f32],
    ) {
        const RUN: usize = 32;
        let n = values.offsets.len();
        let w = weights.as_ptr().add(g0 * n);
        let out = out.as_mut_ptr().add(g0 * hd);
        for start in (0..n).step_by(RUN) {
            prefetch(values, start + AHEAD, RUN, hd);
            let end = (start + RUN).min(n);
            for c in (0..hd).step_by(W::L) {
                let base = values.cache.as_ptr().add(c);
                let mut acc = [[W::zero(); G]; S];
                if start > 0 {
                    for (g, a) in acc[0].iter_mut().enumerate() {
                        *a = W::loadu(out.add(g * hd + c));
                    }
                }
                let mut p = start;
                while p + S <= end {
                    for (s, acc) in acc.iter_mut().enumerate() {
                        let v = W::load::<E>(base.add(*values.offsets.get_unchecked(p + s)));
                        for (g, a) in acc.iter_mut().enumerate() {
                            *a = W::fmadd(*w.add(g * n + p + s), v, *a);
                        }
                    }
                    p += S;
                }
                for (s, acc) in acc.iter_mut().enumerate().take(end - p) {
                    let v = W::load::<E>(base.add(*values.offsets.get_unchecked(p + s)));
                    for (g, a) in acc.iter_mut().enumerate() {
                        *a = W::fmadd(*w.add(g * n + p + s), v, *a);
                    }
                }
                for g in 0..G {
                    let mut sum = acc[0][g];
                    for acc in &acc[1..] {
                        sum = W::add(sum, acc[g]);
                    }
                    W::store(out.add(g * hd + c), sum);
                }
            }
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
        #[inline(always)]
        unsafe fn prefetch_start<E>(rows: Rows<E>, hd: usize) {
            prefetch(rows, 0, AHEAD, hd)
        }

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
                prefetch(keys, start + AHEAD, 8, C * LANES);
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
            group: usize,
            values: Rows<E>,
            out: &mut [f32],
        ) {
            weigh_group::<E, Self>(weights, group, values, C * LANES, out)
        }
    }

    impl Width for Avx2 {
        type V = __m256;
        const L: usize = 8;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }

        #[inline(always)]
        unsafe fn load<E: Element>(p: *const E) -> __m256 {
            E::load8(p)
        }

        #[inline(always)]
        unsafe fn loadu(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }

        #[inline(always)]
        unsafe fn fmadd(w: f32, v: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(_mm256_set1_ps(w), v, acc)
        }

        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }

        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
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
