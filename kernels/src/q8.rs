//! A CPU matrix multiply over int8 weights (Q8_0 blocks: 32 int8 values and one f32 scale) for
//! the few-row steps of decoding.
//!
//! Each weight row is loaded once per step and multiplied against every activation row while it
//! sits in L1, so a step of 16 sequences costs little more memory traffic than a step of one.
//! The result of a row depends only on that row (activations are quantized per row, blocks are
//! summed in a fixed order), never on how many rows share the step.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Weights `[rows, cols]` as int8 blocks with one scale per block.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    quants: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantizes one block to int8 with a shared scale (`amax / 127`).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, v) in q.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
    }
    d
}

impl Q8Matrix {
    /// Quantizes row-major f32 weights `[rows, cols]`; `cols` must be a multiple of 32.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
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
            quants,
            scales,
        })
    }

    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::quantize(&data, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x`: `[m, cols]` row-major -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let mut xq = vec![0i8; m * self.cols];
        let xs: Vec<f32> = x
            .chunks_exact(BLOCK)
            .zip(xq.chunks_exact_mut(BLOCK))
            .map(|(x, q)| quantize_block(x, q))
            .collect();
        let dots = kernel();
        // out is [m, rows]; compute it transposed ([rows, m]) so each weight row writes a contiguous
        // run, then transpose back.
        let mut out_t = vec![0f32; self.rows * m];
        const ROWS_PER_TASK: usize = 16;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                let r0 = task * ROWS_PER_TASK;
                for (j, out_row) in out.chunks_exact_mut(m).enumerate() {
                    let r = r0 + j;
                    let w = (
                        &self.quants[r * self.cols..][..self.cols],
                        &self.scales[r * blocks..][..blocks],
                    );
                    // Up to GROUP activation rows share each load of a weight block.
                    for (g, outs) in out_row.chunks_mut(GROUP).enumerate() {
                        let (first, n) = (g * GROUP, outs.len());
                        let x = (
                            &xq[first * self.cols..][..n * self.cols],
                            &xs[first * blocks..][..n * blocks],
                        );
                        dots(w, x, outs);
                    }
                }
            });
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
        out
    }
}

/// Activation rows that share one pass over a weight row.
const GROUP: usize = 4;

type Row<'a> = (&'a [i8], &'a [f32]);

/// One weight row against `outs.len()` (at most [`GROUP`]) activation rows stored back to back.
type DotsFn = fn(Row<'_>, Row<'_>, &mut [f32]);

/// The fastest kernel this CPU runs (the feature check is cached by std).
fn kernel() -> DotsFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return |w, x, outs| unsafe { avx2::dots(w, x, outs) };
        }
    }
    |w, x, outs| {
        let (cols, blocks) = (w.0.len(), w.1.len());
        for (k, o) in outs.iter_mut().enumerate() {
            *o = dot_scalar(
                w.0,
                w.1,
                &x.0[k * cols..][..cols],
                &x.1[k * blocks..][..blocks],
            );
        }
    }
}

fn dot_scalar(a: &[i8], sa: &[f32], b: &[i8], sb: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (k, (qa, qb)) in a.chunks_exact(BLOCK).zip(b.chunks_exact(BLOCK)).enumerate() {
        let s: i32 = qa.iter().zip(qb).map(|(&x, &y)| x as i32 * y as i32).sum();
        acc += s as f32 * sa[k] * sb[k];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    use super::{Row, GROUP};

    /// Per activation row: sum over blocks of (int8 dot) * weight scale * activation scale. The
    /// int8 products use the sign-transfer trick (|w| unsigned times x with w's sign) so that
    /// `maddubs` can take them. Every row goes through the same instructions in the same order
    /// whatever the group size, so its result does not depend on its neighbours.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(w: Row<'_>, x: Row<'_>, outs: &mut [f32]) {
        let n = outs.len().min(GROUP);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); GROUP];
        let ((wq, ws), (xq, xs)) = (w, x);
        let (cols, blocks) = (wq.len(), ws.len());
        for blk in 0..blocks {
            let vw = _mm256_loadu_si256(wq.as_ptr().add(blk * BLOCK) as *const __m256i);
            let abs_w = _mm256_sign_epi8(vw, vw);
            let w_scale = *ws.get_unchecked(blk);
            for k in 0..n {
                let vx =
                    _mm256_loadu_si256(xq.as_ptr().add(k * cols + blk * BLOCK) as *const __m256i);
                let pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(vx, vw));
                let sums = _mm256_madd_epi16(pairs, ones);
                let scale = _mm256_set1_ps(w_scale * *xs.get_unchecked(k * blocks + blk));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[k]);
            }
        }
        for k in 0..n {
            let hi = _mm256_extractf128_ps(acc[k], 1);
            let lo = _mm256_castps256_ps128(acc[k]);
            let s = _mm_add_ps(hi, lo);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            outs[k] = _mm_cvtss_f32(s);
        }
    }
}

/// `x @ w.T` for f32 `x` (`[m, cols]`) as a candle op, on the CPU.
pub struct Q8MatMul<'a>(pub &'a Q8Matrix);

impl CustomOp1 for Q8MatMul<'_> {
    fn name(&self) -> &'static str {
        "q8-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, cols) = l.shape().dims2()?;
        if cols != self.0.cols {
            candle_core::bail!(
                "q8-matmul: input has {cols} columns, weights {}",
                self.0.cols
            );
        }
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("q8-matmul: non-contiguous input".into()))?;
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
    use candle_core::Device;

    #[test]
    fn matches_f32_matmul_and_is_row_independent() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols) = (70, 96);
        let w = Tensor::randn(0f32, 1., (rows, cols), &dev)?;
        let x = Tensor::randn(0f32, 1., (5, cols), &dev)?;
        let q = Q8Matrix::from_tensor(&w)?;
        let got = x.apply_op1_no_bwd(&Q8MatMul(&q))?;
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
            .apply_op1_no_bwd(&Q8MatMul(&q))?;
        assert_eq!(alone.to_vec2::<f32>()?[0], got.to_vec2::<f32>()?[2]);
        // The SIMD kernel and the scalar one agree.
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let simd = q.matmul(&xs, 5);
        let mut xq = vec![0i8; 5 * cols];
        let xs_scales: Vec<f32> = xs
            .chunks_exact(BLOCK)
            .zip(xq.chunks_exact_mut(BLOCK))
            .map(|(a, b)| quantize_block(a, b))
            .collect();
        let blocks = cols / BLOCK;
        let scalar = dot_scalar(
            &q.quants[..cols],
            &q.scales[..blocks],
            &xq[..cols],
            &xs_scales[..blocks],
        );
        assert!((scalar - simd[0]).abs() < 1e-3 * scalar.abs().max(1.0));
        Ok(())
    }
}
