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
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
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
        if !cols.is_multiple_of(BLOCK) || bytes.len() != rows * cols / BLOCK * Q4_1_BYTES {
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

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
