//! A CPU matrix multiply over block-quantized weights for the few-row steps of decoding:
//! int8 blocks (Q8_0: 32 values, one scale) or 4-bit blocks (GGUF's Q4_1: 32 values, a scale and a
//! minimum), against activations quantized to int8 per block of 32.
//!
//! Weights are repacked at load into the layout the kernels want: codes back to back, and the
//! blocks' scales and minimums as f32 arrays beside them, so the inner loop does no format
//! conversion. Each weight block is loaded once per step and multiplied against up to four
//! activation rows while it sits in registers, so a step of many sequences costs little more
//! memory traffic than a step of one. With AVX-512 VNNI one instruction multiplies two blocks.
//!
//! A row's result depends only on that row (activations are quantized per row, blocks are summed
//! in a fixed order, every row runs the same instructions), never on how many rows share the step.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Activation rows that share one pass over a weight row (AVX2 has 16 registers, AVX-512 32).
const GROUP: usize = 4;
const GROUP_AVX512: usize = 16;
/// Bytes of a GGUF Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

enum Codes {
    /// Signed values, 32 per block: w = scale * q.
    Q8(Vec<i8>),
    /// Values 0..16, 16 bytes per block (low nibbles hold values 0..16, high nibbles values
    /// 16..32, as in GGUF): w = scale * q + min.
    Q4 { nibbles: Vec<u8>, mins: Vec<f32> },
}

/// Weights `[rows, cols]` in quantized blocks along each row.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    /// One per block, row by row.
    scales: Vec<f32>,
    codes: Codes,
}

/// Quantizes one block to int8 with a shared scale (`amax / 127`).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, v) in q.iter_mut().zip(x) {
        // Round half away from zero, as f32::round does, without the libm call (|r| <= 127, so
        // adding 0.5 is exact).
        let r = v * inv;
        *q = (r + 0.5f32.copysign(r)) as i8;
    }
    d
}

/// Activation rows `[m, cols]` quantized per block, with what the kernels precompute from them.
struct Activations {
    quants: Vec<i8>,
    /// `[m, blocks]`.
    scales: Vec<f32>,
    /// `[m, blocks]`: scale * sum of the block's values (for Q4's minimum).
    sums: Vec<f32>,
    /// `[m, blocks / 2, 64]`: each pair of blocks with their 4-byte groups interleaved (b's
    /// first, b + 1's first, b's second, ...), so that a 512-bit dot product leaves block b's
    /// partial sums in the even lanes and b + 1's in the odd ones, and one 8-byte broadcast of
    /// two consecutive scales lines up with them. An odd last block is left out.
    pair_quants: Vec<i8>,
    /// `[m, blocks]`: -128 * the sum of the block's values. VNNI multiplies unsigned by signed
    /// bytes, so int8 weights go in offset by +128; starting the dot product from this takes the
    /// offset back out, exactly.
    offsets: Vec<i32>,
    /// `[m / 16 rounded up, blocks, 16]`: `sums` of 16 rows side by side (zero past the last
    /// row), so that one vector instruction per block applies a weight row's minimums to all.
    sums_by_16: Vec<f32>,
}

impl Activations {
    fn new(x: &[f32], cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let m = x.len() / cols;
        let mut quants = vec![0i8; x.len()];
        let mut scales = Vec::with_capacity(m * blocks);
        let mut sums = Vec::with_capacity(m * blocks);
        let mut offsets = Vec::with_capacity(m * blocks);
        let mut sums_by_16 = vec![0f32; m.div_ceil(16) * blocks * 16];
        for (i, (x, q)) in x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let d = quantize_block(x, q);
            let total: i32 = q.iter().map(|&v| v as i32).sum();
            scales.push(d);
            sums.push(d * total as f32);
            offsets.push(-128 * total);
            let (row, b) = (i / blocks, i % blocks);
            sums_by_16[((row / 16) * blocks + b) * 16 + row % 16] = d * total as f32;
        }
        let pairs = blocks / 2;
        let mut pair_quants = vec![0i8; m * pairs * 2 * BLOCK];
        for (i, out) in pair_quants.chunks_exact_mut(2 * BLOCK).enumerate() {
            let (row, p) = (i / pairs, i % pairs);
            let first = &quants[row * cols + 2 * p * BLOCK..][..2 * BLOCK];
            for (j, out) in out.chunks_exact_mut(8).enumerate() {
                out[..4].copy_from_slice(&first[4 * j..][..4]);
                out[4..].copy_from_slice(&first[BLOCK + 4 * j..][..4]);
            }
        }
        Self {
            quants,
            scales,
            sums,
            pair_quants,
            offsets,
            sums_by_16,
        }
    }

    fn view(&self) -> XGroup<'_> {
        XGroup {
            quants: &self.quants,
            scales: &self.scales,
            sums: &self.sums,
            pair_quants: &self.pair_quants,
            offsets: &self.offsets,
            sums_by_16: &self.sums_by_16,
        }
    }
}

impl QMatrix {
    /// Quantizes row-major f32 weights `[rows, cols]` to int8 blocks; `cols` must be a multiple of 32.
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if cols % BLOCK != 0 || w.len() != rows * cols {
            candle_core::bail!(
                "q8 matrix: {rows}x{cols} (from {} values) needs columns in multiples of {BLOCK}",
                w.len()
            );
        }
        let mut quants = vec![0i8; rows * cols];
        let scales = w
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q))
            .collect();
        Ok(Self {
            rows,
            cols,
            scales,
            codes: Codes::Q8(quants),
        })
    }

    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::quantize_q8(&data, rows, cols)
    }

    /// Takes GGUF Q4_1 blocks (`rows * cols / 32` blocks of 20 bytes) without changing a value.
    pub fn from_q4_1(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if cols % BLOCK != 0 || bytes.len() != rows * cols / BLOCK * Q4_1_BYTES {
            candle_core::bail!(
                "q4_1 matrix: {rows}x{cols} does not match {} bytes of blocks",
                bytes.len()
            );
        }
        let n = bytes.len() / Q4_1_BYTES;
        let (mut scales, mut mins) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut nibbles = Vec::with_capacity(n * BLOCK / 2);
        for block in bytes.chunks_exact(Q4_1_BYTES) {
            scales.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
            mins.push(f16::from_le_bytes([block[2], block[3]]).to_f32());
            nibbles.extend_from_slice(&block[4..]);
        }
        Ok(Self {
            rows,
            cols,
            scales,
            codes: Codes::Q4 { nibbles, mins },
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Weight row `r` against a group of activation rows.
    unsafe fn row(&self, r: usize, kernels: &Kernels, x: &XGroup, outs: &mut [f32]) {
        let (cols, blocks) = (self.cols, self.cols / BLOCK);
        let scales = &self.scales[r * blocks..][..blocks];
        match &self.codes {
            Codes::Q8(quants) => (kernels.q8)(&quants[r * cols..][..cols], scales, x, outs),
            Codes::Q4 { nibbles, mins } => (kernels.q4)(
                &nibbles[r * cols / 2..][..cols / 2],
                scales,
                &mins[r * blocks..][..blocks],
                x,
                outs,
            ),
        }
    }

    /// `x`: `[m, cols]` row-major -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let act = Activations::new(x, self.cols);
        let kernels = kernels();
        // Computed transposed ([rows, m]) so that each weight row writes one contiguous run.
        let mut out_t = vec![0f32; self.rows * m];
        const ROWS_PER_TASK: usize = 16;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                // Activations 16 rows at a time, each group against all of the task's weight
                // rows, so that both stay in the L1 cache however many rows the step has.
                for first in (0..m).step_by(GROUP_AVX512) {
                    let n = GROUP_AVX512.min(m - first);
                    let x = act.view().rows(first, n, self.cols);
                    for j in 0..out.len() / m {
                        let out = &mut out[j * m + first..][..n];
                        // SAFETY: `kernels` only holds kernels whose CPU features are present.
                        unsafe { self.row(task * ROWS_PER_TASK + j, kernels, &x, out) }
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
        out
    }
}

/// Activation rows, back to back (see [`Activations`]).
#[derive(Clone, Copy)]
struct XGroup<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [f32],
    pair_quants: &'a [i8],
    offsets: &'a [i32],
    sums_by_16: &'a [f32],
}

impl XGroup<'_> {
    /// Rows `first..first + n` of rows `cols` wide (`sums_by_16` stays aligned only where
    /// `first` is a multiple of 16).
    #[inline]
    fn rows(&self, first: usize, n: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let paired = blocks / 2 * 2 * BLOCK;
        XGroup {
            quants: &self.quants[first * cols..][..n * cols],
            scales: &self.scales[first * blocks..][..n * blocks],
            sums: &self.sums[first * blocks..][..n * blocks],
            pair_quants: &self.pair_quants[first * paired..][..n * paired],
            offsets: &self.offsets[first * blocks..][..n * blocks],
            sums_by_16: &self.sums_by_16[first / 16 * blocks * 16..],
        }
    }
}

/// Kernels take one weight row and all activation rows, one output per activation row.
/// `(codes, scales, activations, outputs)`.
type Q8Kernel = unsafe fn(&[i8], &[f32], &XGroup, &mut [f32]);
/// `(nibbles, scales, mins, activations, outputs)`.
type Q4Kernel = unsafe fn(&[u8], &[f32], &[f32], &XGroup, &mut [f32]);

struct Kernels {
    q8: Q8Kernel,
    q4: Q4Kernel,
}

/// The kernels this CPU runs, fastest first (the scalar ones run anywhere).
fn candidates() -> Vec<(&'static str, Kernels)> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
            && has!("avx2")
            && has!("fma")
        {
            let k = Kernels {
                q8: avx512::q8,
                q4: avx512::q4,
            };
            found.push(("avx512-vnni", k));
        }
        if has!("avx2") && has!("fma") {
            let k = Kernels {
                q8: avx2::q8,
                q4: avx2::q4,
            };
            found.push(("avx2", k));
        }
    }
    let k = Kernels {
        q8: scalar::q8,
        q4: scalar::q4,
    };
    found.push(("scalar", k));
    found
}

/// The fastest kernels this CPU runs, chosen once.
fn kernels() -> &'static Kernels {
    static BEST: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    BEST.get_or_init(|| candidates().swap_remove(0).1)
}

/// Dot product with eight independent accumulators, so that it vectorises (with the features of
/// the kernel it is inlined into).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

mod scalar {
    use super::{dot, XGroup, BLOCK};

    pub unsafe fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
        let (cols, blocks) = (wq.len(), ws.len());
        for (k, o) in outs.iter_mut().enumerate() {
            let xq = &x.quants[k * cols..][..cols];
            *o = (0..blocks)
                .map(|b| {
                    let s: i32 = (0..BLOCK)
                        .map(|i| wq[b * BLOCK + i] as i32 * xq[b * BLOCK + i] as i32)
                        .sum();
                    s as f32 * (ws[b] * x.scales[k * blocks + b])
                })
                .sum();
        }
    }

    pub unsafe fn q4(nib: &[u8], ws: &[f32], mins: &[f32], x: &XGroup, outs: &mut [f32]) {
        let blocks = ws.len();
        let cols = blocks * BLOCK;
        for (k, o) in outs.iter_mut().enumerate() {
            let xq = &x.quants[k * cols..][..cols];
            let main: f32 = (0..blocks)
                .map(|b| {
                    let s: i32 = (0..BLOCK / 2)
                        .map(|i| {
                            let byte = nib[b * BLOCK / 2 + i];
                            (byte & 15) as i32 * xq[b * BLOCK + i] as i32
                                + (byte >> 4) as i32 * xq[b * BLOCK + BLOCK / 2 + i] as i32
                        })
                        .sum();
                    s as f32 * (ws[b] * x.scales[k * blocks + b])
                })
                .sum();
            *o = main + dot(mins, &x.sums[k * blocks..][..blocks]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
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
                let vx = _mm256_loadu_si256(
                    x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i
                );
                let sums =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(vx, vw)), ones);
                let scale =
                    _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
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
                let vx = _mm256_loadu_si256(
                    x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i
                );
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, vx), ones);
                let scale =
                    _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[k]);
            }
        }
        for k in 0..n {
            outs[k] = hsum(acc[k]) + dot(mins, &x.sums[k * blocks..][..blocks]);
        }
    }
}

/// AVX-512 VNNI: two blocks per instruction, unsigned-by-signed byte dot products accumulated
/// straight into 32-bit lanes (no 16-bit intermediate to saturate), and up to 16 activation rows
/// per pass over a weight row, each in its own register.
#[cfg(target_arch = "x86_64")]
mod avx512 {
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
                let vx = _mm512_loadu_si512(
                    x.pair_quants.as_ptr().add(k * paired + b * BLOCK) as *const _
                );
                let s = _mm512_mul_ps(d, two(x.scales.as_ptr().add(k * blocks + b)));
                let init = match offsets {
                    // Block b's in lane 0, b + 1's in lane 1.
                    Some(o) => _mm512_zextsi128_si512(_mm_loadl_epi64(
                        o.as_ptr().add(k * blocks + b) as *const _,
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
                let vx = _mm256_loadu_si256(
                    x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i
                );
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
                    nib.as_ptr().add(b * BLOCK / 2) as *const __m256i,
                ));
                _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, raw), shifts),
                    low4,
                )
            },
            |b| unpack_nibbles(nib.as_ptr().add(b * BLOCK / 2)),
        );
    }
}

/// `x @ w.T` for f32 `x` (`[m, cols]`) as a candle op, on the CPU.
pub struct QMatMul<'a>(pub &'a QMatrix);

impl CustomOp1 for QMatMul<'_> {
    fn name(&self) -> &'static str {
        "cpu-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, cols) = l.shape().dims2()?;
        if cols != self.0.cols {
            candle_core::bail!(
                "cpu-qmatmul: input has {cols} columns, weights {}",
                self.0.cols
            );
        }
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cpu-qmatmul: non-contiguous input".into()))?;
        let x = &s.as_slice::<f32>()?[start..end];
        Ok((
            CpuStorage::F32(self.0.matmul(x, m)),
            Shape::from((m, self.0.rows)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    fn check(q: &QMatrix, w: &Tensor, x: &Tensor) -> Result<()> {
        let got = x.apply_op1_no_bwd(&QMatMul(q))?;
        let want = x.matmul(&w.t()?)?;
        let err = (&got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err < 0.02 * scale, "max error {err} vs magnitude {scale}");
        // Row 2 computed alone equals row 2 computed among all, bit for bit.
        let alone = x
            .narrow(0, 2, 1)?
            .contiguous()?
            .apply_op1_no_bwd(&QMatMul(q))?;
        assert_eq!(alone.to_vec2::<f32>()?[0], got.to_vec2::<f32>()?[2]);
        // Every kernel this CPU runs agrees with the scalar one on every weight row.
        let cols = x.dim(1)?;
        let act = Activations::new(&x.flatten_all()?.to_vec1::<f32>()?, cols);
        let xg = act.view();
        let all = candidates();
        let (_, reference) = all.last().expect("the scalar kernels");
        for r in 0..q.rows {
            let mut want = vec![0f32; x.dim(0)?];
            unsafe { q.row(r, reference, &xg, &mut want) };
            for (name, k) in &all {
                let mut got = vec![0f32; x.dim(0)?];
                unsafe { q.row(r, k, &xg, &mut got) };
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-4 * b.abs().max(1.0),
                        "{name}: row {r}: {a} vs scalar {b}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn int8_weights_match_f32_matmul_and_are_row_independent() -> Result<()> {
        let dev = Device::Cpu;
        // 96 columns: one pair of blocks and an odd one; 128: pairs only.
        for cols in [96, 128] {
            let w = Tensor::randn(0f32, 1., (70, cols), &dev)?;
            let x = Tensor::randn(0f32, 1., (19, cols), &dev)?;
            check(&QMatrix::from_tensor(&w)?, &w, &x)?;
        }
        Ok(())
    }

    #[test]
    fn gguf_q4_1_blocks_match_their_dequantized_weights() -> Result<()> {
        let dev = Device::Cpu;
        for cols in [96, 128] {
            let w = Tensor::randn(0f32, 1., (70, cols), &dev)?;
            let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
            let q = QMatrix::from_q4_1(&qt.data()?, 70, cols)?;
            // Compare against the weights the blocks actually hold.
            check(
                &q,
                &qt.dequantize(&dev)?,
                &Tensor::randn(0f32, 1., (19, cols), &dev)?,
            )?;
        }
        Ok(())
    }
}
