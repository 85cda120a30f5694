//! A CPU matrix multiply over block-quantized weights for the few-row steps of decoding:
//! int8 blocks (Q8_0: 32 values, one scale) or the GGUF's own 4-bit blocks (Q4_1: 32 nibbles, a
//! scale and a minimum), against activations quantized to int8 per block of 32.
//!
//! Each weight block is loaded once per step and multiplied against up to four activation rows
//! while it sits in registers, so a step of many sequences costs little more memory traffic than a
//! step of one. A row's result depends only on that row (activations are quantized per row, blocks
//! are summed in a fixed order, every row runs the same instructions), never on how many rows
//! share the step.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Activation rows that share one pass over a weight row.
const GROUP: usize = 4;
/// Bytes of a GGUF Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

enum Weights {
    Q8 {
        quants: Vec<i8>,
        scales: Vec<f32>,
    },
    /// GGUF's own blocks, unchanged: f16 scale, f16 min, then 16 bytes whose low nibbles are
    /// values 0..16 and high nibbles values 16..32.
    Q4_1 {
        blocks: Vec<u8>,
    },
}

/// Weights `[rows, cols]` in quantized blocks along each row.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    weights: Weights,
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

/// Activations quantized per block: values, scales, and scale * sum of the values (for Q4_1's min).
struct Activations {
    quants: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
}

impl Activations {
    fn new(x: &[f32]) -> Self {
        let mut quants = vec![0i8; x.len()];
        let mut sums = Vec::with_capacity(x.len() / BLOCK);
        let scales = x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .map(|(x, q)| {
                let d = quantize_block(x, q);
                sums.push(d * q.iter().map(|&v| v as i32).sum::<i32>() as f32);
                d
            })
            .collect();
        Self {
            quants,
            scales,
            sums,
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
            weights: Weights::Q8 { quants, scales },
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

    /// Takes GGUF Q4_1 blocks as they are (`rows * cols / 32` blocks of 20 bytes).
    pub fn from_q4_1(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        if cols % BLOCK != 0 || bytes.len() != rows * cols / BLOCK * Q4_1_BYTES {
            candle_core::bail!(
                "q4_1 matrix: {rows}x{cols} does not match {} bytes of blocks",
                bytes.len()
            );
        }
        Ok(Self {
            rows,
            cols,
            weights: Weights::Q4_1 {
                blocks: bytes.to_vec(),
            },
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x`: `[m, cols]` row-major -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (cols, blocks) = (self.cols, self.cols / BLOCK);
        let act = Activations::new(x);
        let kernels = kernels();
        // Computed transposed ([rows, m]) so that each weight row writes one contiguous run.
        let mut out_t = vec![0f32; self.rows * m];
        const ROWS_PER_TASK: usize = 16;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                for (j, out_row) in out.chunks_exact_mut(m).enumerate() {
                    let r = task * ROWS_PER_TASK + j;
                    for (g, outs) in out_row.chunks_mut(GROUP).enumerate() {
                        let (first, n) = (g * GROUP, outs.len());
                        let xg = XGroup {
                            quants: &act.quants[first * cols..][..n * cols],
                            scales: &act.scales[first * blocks..][..n * blocks],
                            sums: &act.sums[first * blocks..][..n * blocks],
                        };
                        match &self.weights {
                            Weights::Q8 { quants, scales } => (kernels.q8)(
                                &quants[r * cols..][..cols],
                                &scales[r * blocks..][..blocks],
                                &xg,
                                outs,
                            ),
                            Weights::Q4_1 { blocks: raw } => {
                                let row_bytes = blocks * Q4_1_BYTES;
                                (kernels.q4_1)(&raw[r * row_bytes..][..row_bytes], &xg, outs)
                            }
                        }
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

/// Up to [`GROUP`] activation rows, back to back.
pub(crate) struct XGroup<'a> {
    quants: &'a [i8],
    scales: &'a [f32],
    sums: &'a [f32],
}

struct Kernels {
    q8: fn(&[i8], &[f32], &XGroup, &mut [f32]),
    /// One row of raw Q4_1 blocks.
    q4_1: fn(&[u8], &XGroup, &mut [f32]),
}

/// The fastest kernels this CPU runs (the feature checks are cached by std).
fn kernels() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &str| match f {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            _ => false,
        };
        if has("avx2") && has("fma") && has("f16c") {
            return Kernels {
                q8: |w, s, x, o| unsafe { avx2::q8(w, s, x, o) },
                q4_1: if has("avx512vnni") && has("avx512vl") {
                    |w, x, o| unsafe { avx2::q4_1_vnni(w, x, o) }
                } else {
                    |w, x, o| unsafe { avx2::q4_1(w, x, o) }
                },
            };
        }
    }
    Kernels {
        q8: scalar::q8,
        q4_1: scalar::q4_1,
    }
}

/// Scale and min of a raw Q4_1 block.
#[inline(always)]
fn q4_1_scale_min(block: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([block[0], block[1]]).to_f32(),
        f16::from_le_bytes([block[2], block[3]]).to_f32(),
    )
}

mod scalar {
    use super::{q4_1_scale_min, XGroup, BLOCK, Q4_1_BYTES};

    pub fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
        let (cols, blocks) = (wq.len(), ws.len());
        for (k, o) in outs.iter_mut().enumerate() {
            let xq = &x.quants[k * cols..][..cols];
            *o = (0..blocks)
                .map(|b| {
                    let s: i32 = (0..BLOCK)
                        .map(|i| wq[b * BLOCK + i] as i32 * xq[b * BLOCK + i] as i32)
                        .sum();
                    s as f32 * ws[b] * x.scales[k * blocks + b]
                })
                .sum();
        }
    }

    pub fn q4_1(raw: &[u8], x: &XGroup, outs: &mut [f32]) {
        let blocks = raw.len() / Q4_1_BYTES;
        let cols = blocks * BLOCK;
        for (k, o) in outs.iter_mut().enumerate() {
            let xq = &x.quants[k * cols..][..cols];
            let (mut main, mut mins) = (0f32, 0f32);
            for (b, block) in raw.chunks_exact(Q4_1_BYTES).enumerate() {
                let (d, m) = q4_1_scale_min(block);
                let s: i32 = (0..16)
                    .map(|i| {
                        let byte = block[4 + i];
                        (byte & 15) as i32 * xq[b * BLOCK + i] as i32
                            + (byte >> 4) as i32 * xq[b * BLOCK + 16 + i] as i32
                    })
                    .sum();
                main += s as f32 * d * x.scales[k * blocks + b];
                mins += m * x.sums[k * blocks + b];
            }
            *o = main + mins;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{XGroup, BLOCK, GROUP, Q4_1_BYTES};

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Int8 weights: the sign-transfer trick (|w| unsigned times x with w's sign) lets `maddubs`
    /// multiply two signed blocks.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8(wq: &[i8], ws: &[f32], x: &XGroup, outs: &mut [f32]) {
        let n = outs.len().min(GROUP);
        let (cols, blocks) = (wq.len(), ws.len());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); GROUP];
        for b in 0..blocks {
            let vw = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i);
            let abs_w = _mm256_sign_epi8(vw, vw);
            let w_scale = *ws.get_unchecked(b);
            for k in 0..n {
                let vx = _mm256_loadu_si256(
                    x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i
                );
                let sums =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(vx, vw)), ones);
                let scale = _mm256_set1_ps(w_scale * *x.scales.get_unchecked(k * blocks + b));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[k]);
            }
        }
        for k in 0..n {
            outs[k] = hsum(acc[k]);
        }
    }

    /// Q4_1 weights read straight from GGUF blocks: w = d * q + m with q in 0..16 (unsigned, so
    /// `maddubs` takes them directly); the min contributes m * (scale * sum of the activation
    /// block), precomputed per activation block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1(raw: &[u8], x: &XGroup, outs: &mut [f32]) {
        q4_1_body(raw, x, outs, |q, vx| {
            _mm256_madd_epi16(_mm256_maddubs_epi16(q, vx), _mm256_set1_epi16(1))
        })
    }

    /// The same with AVX-512 VNNI's fused unsigned-by-signed dot product; the integer sums are
    /// identical to the AVX2 path's, so results do not depend on which one runs.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn q4_1_vnni(raw: &[u8], x: &XGroup, outs: &mut [f32]) {
        q4_1_body(raw, x, outs, |q, vx| {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, vx)
        })
    }

    #[inline(always)]
    unsafe fn q4_1_body(
        raw: &[u8],
        x: &XGroup,
        outs: &mut [f32],
        dot: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let n = outs.len().min(GROUP);
        let blocks = raw.len() / Q4_1_BYTES;
        let cols = blocks * BLOCK;
        let low4 = _mm_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); GROUP];
        let mut mins = [0f32; GROUP];
        for b in 0..blocks {
            let block = raw.as_ptr().add(b * Q4_1_BYTES);
            // f16 scale and min -> f32 lanes 0 and 1.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                block as *const i32,
            )));
            let d = _mm256_set1_ps(_mm_cvtss_f32(dm));
            let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            let nib = _mm_loadu_si128(block.add(4) as *const __m128i);
            let q = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(nib, 4), low4),
                _mm_and_si128(nib, low4),
            );
            for k in 0..n {
                let vx = _mm256_loadu_si256(
                    x.quants.as_ptr().add(k * cols + b * BLOCK) as *const __m256i
                );
                let scale =
                    _mm256_mul_ps(d, _mm256_set1_ps(*x.scales.get_unchecked(k * blocks + b)));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot(q, vx)), scale, acc[k]);
                mins[k] += m * *x.sums.get_unchecked(k * blocks + b);
            }
        }
        for k in 0..n {
            outs[k] = hsum(acc[k]) + mins[k];
        }
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
        // Row 2 computed alone equals row 2 computed among five, bit for bit.
        let alone = x
            .narrow(0, 2, 1)?
            .contiguous()?
            .apply_op1_no_bwd(&QMatMul(q))?;
        assert_eq!(alone.to_vec2::<f32>()?[0], got.to_vec2::<f32>()?[2]);
        // The SIMD kernels agree with the scalar ones.
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let act = Activations::new(&xs);
        let blocks = q.cols / BLOCK;
        let xg = XGroup {
            quants: &act.quants[..4 * q.cols],
            scales: &act.scales[..4 * blocks],
            sums: &act.sums[..4 * blocks],
        };
        let (mut fast, mut slow) = ([0f32; 4], [0f32; 4]);
        let k = kernels();
        match &q.weights {
            Weights::Q8 { quants, scales } => {
                (k.q8)(&quants[..q.cols], &scales[..blocks], &xg, &mut fast);
                scalar::q8(&quants[..q.cols], &scales[..blocks], &xg, &mut slow);
            }
            Weights::Q4_1 { blocks: raw } => {
                let row = &raw[..blocks * Q4_1_BYTES];
                (k.q4_1)(row, &xg, &mut fast);
                scalar::q4_1(row, &xg, &mut slow);
                // Where AVX-512 VNNI runs, it gives exactly what the AVX2 path gives.
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("f16c")
                {
                    let (mut a, mut b) = ([0f32; 4], [0f32; 4]);
                    unsafe {
                        avx2::q4_1(row, &xg, &mut a);
                        avx2::q4_1_vnni(row, &xg, &mut b);
                    }
                    assert_eq!(a, b);
                }
            }
        }
        for (a, b) in fast.iter().zip(&slow) {
            assert!(
                (a - b).abs() < 1e-3 * b.abs().max(1.0),
                "simd {a} vs scalar {b}"
            );
        }
        Ok(())
    }

    #[test]
    fn int8_weights_match_f32_matmul_and_are_row_independent() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (70, 96), &dev)?;
        let x = Tensor::randn(0f32, 1., (5, 96), &dev)?;
        check(&QMatrix::from_tensor(&w)?, &w, &x)
    }

    #[test]
    fn gguf_q4_1_blocks_match_their_dequantized_weights() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (70, 96), &dev)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let q = QMatrix::from_q4_1(&qt.data()?, 70, 96)?;
        // Compare against the weights the blocks actually hold.
        check(
            &q,
            &qt.dequantize(&dev)?,
            &Tensor::randn(0f32, 1., (5, 96), &dev)?,
        )
    }
}
