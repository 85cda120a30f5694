//! A CPU matrix multiply over block-quantized weights, for every batch shape from one decoding
//! sequence to a prompt chunk of hundreds of tokens: int8 blocks (32 values, one scale), 4-bit
//! blocks (GGUF's Q4_1: 32 values, a scale and a minimum; GGUF's Q4_K: 6-bit scales and minimums
//! per 32 values, f16 ones per 256) or 6-bit ones (GGUF's Q6_K: an int8 scale per 16 values and
//! an f16 one per 256), against activations quantized to int8 per block of 32.
//!
//! Weights are repacked at load into panels of 16 rows: for each block, the rows' first four
//! values side by side, then their next four, and so on ([`Codes`]); 4-bit blocks keep their
//! f16 scales and minimums beside their codes, so that a panel is one stream of memory. One 64-byte vector then
//! holds four values of each of 16 rows, and a single VNNI instruction multiplies it by four
//! values of one activation row broadcast to every lane: 16 rows × 4 products summed into 16
//! integer lanes, which accumulate over the block before the one conversion to f32 that the
//! block's scales need. A tile of panels × activation rows keeps its accumulators in registers,
//! so each weight vector loaded serves several rows and each activation word several panels.
//!
//! A row's result depends only on that row (and its number of terms): activations are quantized
//! per row, and every output lane goes through the same additions in the same order whichever
//! tile computes it. A request therefore produces the same text alone or among many. (Across
//! instruction sets the last bits differ: the scalar kernel does not fuse multiply-adds, and only
//! the AVX-512 one splits long rows into passes.)

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;
/// Weight rows per panel: one 512-bit vector of 32-bit lanes.
const PANEL: usize = 16;
/// Bytes of a GGUF Q4_1 block: f16 scale, f16 min, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;
/// Bytes of one panel's codes for one block.
const Q8_PANEL_BLOCK: usize = PANEL * BLOCK;
/// Bytes of one panel's 4-bit codes for one block, and where its 16 f16 scales and 16 f16
/// minimums follow them ([`Q4_PANEL_BLOCK`] bytes in all: five cache lines).
const Q4_CODES: usize = PANEL * BLOCK / 2;
const Q4_SCALES: usize = Q4_CODES;
const Q4_MINS: usize = Q4_SCALES + 2 * PANEL;
const Q4_PANEL_BLOCK: usize = Q4_MINS + 2 * PANEL;
/// Blocks per K-quant super-block (256 values).
const SUPER: usize = 8;
/// A 6-bit (Q6_K) panel-super-block: its 16 rows' f16 `d` (half a cache line), then eight
/// panel-blocks: the codes' low 4 bits as a 4-bit one's, their high 2 bits (two steps a vector)
/// and each row's two int8 sub-block scales (`[half][row]`), six and a half cache lines each:
/// 6.5625 bits a weight, as in the GGUF file.
const Q6_D: usize = 0;
const Q6_HEAD: usize = 2 * PANEL;
const Q6_HIGH: usize = Q4_CODES;
const Q6_SCALES: usize = Q6_HIGH + PANEL * BLOCK / 4;
const Q6_BLOCK: usize = Q6_SCALES + 2 * PANEL;
const Q6_PANEL_SUPER: usize = Q6_HEAD + SUPER * Q6_BLOCK;
/// A Q4_K panel-super-block: its 16 rows' f16 `d` and `-dmin` (one cache line), then eight
/// panel-blocks of 4-bit codes (as a 4-bit panel-block's), each followed by its rows' 6-bit
/// sub-block scales and minimums as bytes: 37 cache lines for 4096 weights, 4.625 bits a weight
/// (GGUF's own 4.5; as Q4_1 blocks, 5).
const Q4K_D: usize = 0;
const Q4K_NEG_DMIN: usize = 2 * PANEL;
const Q4K_HEAD: usize = 4 * PANEL;
const Q4K_SC: usize = Q4_CODES;
const Q4K_MN: usize = Q4K_SC + PANEL;
const Q4K_BLOCK: usize = Q4K_MN + PANEL;
const Q4K_PANEL_SUPER: usize = Q4K_HEAD + SUPER * Q4K_BLOCK;

/// Where panel-block `pb` (`panel * blocks + block`) of a Q4_K matrix starts, and where its
/// super-block's head does.
#[inline(always)]
fn q4k_at(pb: usize) -> (usize, usize) {
    let head = pb / SUPER * Q4K_PANEL_SUPER;
    (head + Q4K_HEAD + pb % SUPER * Q4K_BLOCK, head)
}

/// [`q4k_at`] for a 6-bit matrix.
#[inline(always)]
fn q6_at(pb: usize) -> (usize, usize) {
    let head = pb / SUPER * Q6_PANEL_SUPER;
    (head + Q6_HEAD + pb % SUPER * Q6_BLOCK, head)
}

/// Codes in panel order, `[panel][block][step][16 rows][4 bytes]`.
enum Codes {
    /// `w + 128` as unsigned bytes, 8 steps per block: step `j` holds values `4j..4j + 4` of
    /// each row. (VNNI multiplies unsigned by signed bytes; the offset comes back out exactly,
    /// see [`Activations::offsets`].) `scales`: `[panel][block][16]`.
    Q8 { codes: Vec<u8>, scales: Vec<f32> },
    /// Values 0..16, 4 steps per block: step `j`'s low nibbles hold values `4j..4j + 4` of each
    /// row and its high nibbles values `16 + 4j..16 + 4j + 4` (GGUF keeps values `i` and
    /// `16 + i` in one byte too): `w = scale * q + min`. Each panel-block's codes are followed
    /// by its 16 scales and 16 minimums as GGUF's f16 (see [`Q4_PANEL_BLOCK`]).
    Q4(Vec<u8>),
    /// GGUF's Q4_K, values unchanged: `w = d * sc * q - dmin * mn`, codes as [`Codes::Q4`]'s,
    /// byte `sc` and `mn` per block, f16 `d` and `-dmin` per super-block (see
    /// [`Q4K_PANEL_SUPER`]).
    Q4K(Vec<u8>),
    /// GGUF's Q6_K: values 0..64 in the 4-bit layout, their high 2 bits beside them,
    /// `w = d * scale * (q - 32)` with an int8 `scale` per 16 values (each half of a block) and
    /// an f16 `d` per super-block (see [`Q6_PANEL_SUPER`]).
    Q6(Vec<u8>),
}

/// Weights `[rows, cols]` in quantized blocks along each row, repacked in panels of 16 rows
/// (the last panel padded with zero rows).
pub struct QMatrix {
    rows: usize,
    cols: usize,
    codes: Codes,
}

/// Quantizes one block to int8 with a shared scale (`amax / 127`); returns the scale and the
/// sum of the codes. Written so that it vectorises (see [`Kernels::quantize`]).
#[inline(always)]
fn quantize_block(x: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, i32) {
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut total = 0;
    for (q, v) in q.iter_mut().zip(x) {
        // Round half away from zero, as f32::round does, without the libm call (|r| <= 127, so
        // adding 0.5 is exact).
        let r = v * inv;
        let r = (r + 0.5f32.copysign(r)) as i32;
        *q = r as i8;
        total += r;
    }
    (d, total)
}

/// One int8 activation row being written (see [`Activations`]).
struct RowOut<'a> {
    quants: &'a mut [i8],
    scales: &'a mut [f32],
    sums: &'a mut [f32],
    offsets: &'a mut [i32],
}

impl RowOut<'_> {
    /// Block `b`'s scale and the sum of its codes.
    #[inline(always)]
    fn set(&mut self, b: usize, d: f32, total: i32) {
        self.scales[b] = d;
        self.sums[b] = d * total as f32;
        // Wrapping: a NaN activation makes the total meaningless, not a panic.
        self.offsets[b] = total.wrapping_mul(-128);
    }
}

/// Quantizes one row of activations as one int8 row, or two: its codes, and its rounding error's.
#[inline(always)]
fn quantize_row(x: &[f32], mut first: RowOut, mut rest: Option<RowOut>) {
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        let x: &[f32; BLOCK] = x.try_into().unwrap();
        let mut q = [0i8; BLOCK];
        let (d, total) = quantize_block(x, &mut q);
        first.quants[b * BLOCK..][..BLOCK].copy_from_slice(&q);
        first.set(b, d, total);
        if let Some(rest) = &mut rest {
            // Fused, as the SIMD quantizers compute it (the same codes on every CPU).
            let error: [f32; BLOCK] = std::array::from_fn(|i| (-d).mul_add(q[i] as f32, x[i]));
            let (d, total) = quantize_block(&error, &mut q);
            rest.quants[b * BLOCK..][..BLOCK].copy_from_slice(&q);
            rest.set(b, d, total);
        }
    }
}

/// Quantizes weights: the same rounding as the activations'.
fn quantize_weights(w: &[f32], quants: &mut [i8]) -> Vec<f32> {
    let blocks = w.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK));
    blocks
        .map(|(x, q)| quantize_block(x.try_into().unwrap(), q.try_into().unwrap()).0)
        .collect()
}

/// Activation rows quantized per block, with what the kernels precompute from them.
///
/// A row goes in as one int8 row, or as two: its codes, then the codes of what they leave out
/// (`x - scale * q`, quantized the same way), so that a product carries about 15 bits of the
/// activations instead of 7: close to f32's results for twice the integer work. The kernels add
/// the two rows' results as they store them.
struct Activations {
    /// Int8 rows per input row: 1 or 2.
    terms: usize,
    /// Int8 rows: `terms` per input row.
    m: usize,
    cols: usize,
    /// Per input row, its row in the output.
    out_rows: Vec<usize>,
    quants: Vec<i8>,
    /// `[m, blocks]`.
    scales: Vec<f32>,
    /// `[m, blocks]`: scale * sum of the block's values (for Q4's minimum).
    sums: Vec<f32>,
    /// `[m, blocks]`: -128 * the sum of the block's values. Int8 weights go in offset by +128;
    /// starting each block's dot product from this takes the offset back out, exactly.
    offsets: Vec<i32>,
    /// `[m, blocks, 2]`: -32 * the sum of each half of the block's values, for 6-bit weights
    /// (stored `w + 32`, a scale per half); empty for other weights.
    halves: Vec<i32>,
}

impl Activations {
    /// Rows `out_rows` of `x` (`[_, cols]`), `terms` int8 rows each.
    fn new(
        x: &[f32],
        cols: usize,
        out_rows: Vec<usize>,
        terms: usize,
        quantize: QuantizeKernel,
        with_halves: bool,
    ) -> Self {
        let (m, blocks) = (terms * out_rows.len(), cols / BLOCK);
        let mut quants = vec![0i8; m * cols];
        let (mut scales, mut sums) = (vec![0f32; m * blocks], vec![0f32; m * blocks]);
        let mut offsets = vec![0i32; m * blocks];
        // Rows in parallel once there are enough of them to pay for it.
        let per_task = if m * cols < 1 << 16 {
            out_rows.len().max(1)
        } else {
            ((1 << 14) / cols).max(1)
        };
        let (rows_per, blocks_per) = (terms * per_task * cols, terms * per_task * blocks);
        out_rows
            .par_chunks(per_task)
            .zip(quants.par_chunks_mut(rows_per))
            .zip(scales.par_chunks_mut(blocks_per))
            .zip(sums.par_chunks_mut(blocks_per))
            .zip(offsets.par_chunks_mut(blocks_per))
            .for_each(|((((rows, q), s), u), o)| {
                let mut outs = q
                    .chunks_exact_mut(cols)
                    .zip(s.chunks_exact_mut(blocks))
                    .zip(u.chunks_exact_mut(blocks))
                    .zip(o.chunks_exact_mut(blocks))
                    .map(|(((quants, scales), sums), offsets)| RowOut {
                        quants,
                        scales,
                        sums,
                        offsets,
                    });
                for &r in rows {
                    let first = outs.next().expect("a row per term");
                    let rest = if terms == 2 { outs.next() } else { None };
                    // SAFETY: `quantize` comes from `Kernels`, which only holds what this CPU
                    // runs.
                    unsafe { quantize(&x[r * cols..][..cols], first, rest) };
                }
            });
        let halves = if with_halves {
            let half = |q: &[i8]| -32 * q.iter().map(|&q| i32::from(q)).sum::<i32>();
            // In parallel for prompt chunks; a few rows stay one task on this thread.
            quants
                .par_chunks(BLOCK / 2)
                .with_min_len(1 << 12)
                .map(half)
                .collect()
        } else {
            Vec::new()
        };
        Self {
            terms,
            m,
            cols,
            out_rows,
            quants,
            scales,
            sums,
            offsets,
            halves,
        }
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// The output row of int8 row `i`.
    #[inline(always)]
    fn out_row(&self, i: usize) -> usize {
        // SAFETY: kernels only ask for rows below `m`.
        unsafe { *self.out_rows.get_unchecked(i / self.terms) }
    }

    /// [`Self::out_row`] for kernels compiled for `T` terms, which divide by a constant rather
    /// than by the runtime `terms` (a 64-bit division per row stored, several % of a tile).
    #[inline(always)]
    fn out_row_of<const T: usize>(&self, i: usize) -> usize {
        debug_assert_eq!(T, self.terms);
        // SAFETY: kernels only ask for rows below `m`.
        unsafe { *self.out_rows.get_unchecked(i / T) }
    }
}

/// Refuses `bytes` that are not `rows x cols` values in GGUF blocks of `values` values and
/// `block_bytes` bytes each, block by block along each row.
fn check_block_bytes(
    kind: &str,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    values: usize,
    block_bytes: usize,
) -> Result<()> {
    if rows == 0
        || cols == 0
        || !cols.is_multiple_of(values)
        || bytes.len() != rows * cols / values * block_bytes
    {
        candle_core::bail!(
            "{kind} matrix: {rows}x{cols} does not match {} bytes of blocks",
            bytes.len()
        );
    }
    Ok(())
}

/// Row-major codes (`block_bytes` per block, `blocks` per row) in panel order: 4 bytes of each of
/// 16 rows per step, panels padded with `pad`.
fn to_panels(codes: &[u8], rows: usize, blocks: usize, block_bytes: usize, pad: u8) -> Vec<u8> {
    let panels = rows.div_ceil(PANEL);
    let steps = block_bytes / 4;
    let mut out = vec![pad; panels * blocks * PANEL * block_bytes];
    for r in 0..rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        for b in 0..blocks {
            let src = &codes[(r * blocks + b) * block_bytes..][..block_bytes];
            let dst = (p * blocks + b) * PANEL * block_bytes;
            for j in 0..steps {
                out[dst + (j * PANEL + lane) * 4..][..4].copy_from_slice(&src[4 * j..][..4]);
            }
        }
    }
    out
}

/// Per-block values `[rows, blocks]` as `[panel][block][16]`, zero past the last row.
fn f32_panels(v: &[f32], rows: usize, blocks: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.div_ceil(PANEL) * blocks * PANEL];
    for r in 0..rows {
        for b in 0..blocks {
            out[((r / PANEL) * blocks + b) * PANEL + r % PANEL] = v[r * blocks + b];
        }
    }
    out
}

impl QMatrix {
    /// Quantizes row-major f32 weights `[rows, cols]` to int8 blocks; `cols` must be a multiple of 32.
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            candle_core::bail!(
                "q8 matrix: {rows}x{cols} (from {} values) needs columns in multiples of {BLOCK}",
                w.len()
            );
        }
        let mut quants = vec![0i8; rows * cols];
        let scales = quantize_weights(w, &mut quants);
        let unsigned: Vec<u8> = quants.iter().map(|&q| (q as u8) ^ 0x80).collect();
        let blocks = cols / BLOCK;
        Ok(Self {
            rows,
            cols,
            codes: Codes::Q8 {
                // Padding rows hold w = 0, that is 128.
                codes: to_panels(&unsigned, rows, blocks, BLOCK, 0x80),
                scales: f32_panels(&scales, rows, blocks),
            },
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

    /// Takes GGUF blocks of 4 or 6 bits as they are: Q4_1, Q4_0, Q4_K and Q6_K without changing
    /// a value (see `gguf.rs`). `None` for other types, or where a Q4_0 scale does not fit an
    /// f16.
    pub fn from_gguf_blocks(
        dtype: GgmlDType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        let blocks = match dtype {
            GgmlDType::Q4_1 => return Self::from_q4_1(bytes, rows, cols).map(Some),
            GgmlDType::Q4_0 => gguf::q4_0_as_q4_1(bytes),
            GgmlDType::Q4K => return gguf::q4_k_panels(bytes, rows, cols).map(Some),
            GgmlDType::Q6K => return gguf::q6_k_panels(bytes, rows, cols).map(Some),
            _ => None,
        };
        blocks
            .map(|blocks| Self::from_q4_1(&blocks, rows, cols))
            .transpose()
    }

    /// Takes GGUF Q4_1 blocks (`rows * cols / 32` blocks of 20 bytes) without changing a value.
    pub fn from_q4_1(bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        check_block_bytes("q4_1", bytes, rows, cols, BLOCK, Q4_1_BYTES)?;
        let blocks = cols / BLOCK;
        // Padding rows: codes, scale and minimum all zero, so w = 0.
        let mut out = vec![0u8; rows.div_ceil(PANEL) * blocks * Q4_PANEL_BLOCK];
        for (r, row) in bytes.chunks_exact(blocks * Q4_1_BYTES).enumerate() {
            let (p, lane) = (r / PANEL, r % PANEL);
            for (b, block) in row.chunks_exact(Q4_1_BYTES).enumerate() {
                let dst = &mut out[(p * blocks + b) * Q4_PANEL_BLOCK..][..Q4_PANEL_BLOCK];
                for j in 0..Q4_CODES / PANEL / 4 {
                    dst[(j * PANEL + lane) * 4..][..4].copy_from_slice(&block[4 + 4 * j..][..4]);
                }
                dst[Q4_SCALES + 2 * lane..][..2].copy_from_slice(&block[..2]);
                dst[Q4_MINS + 2 * lane..][..2].copy_from_slice(&block[2..4]);
            }
        }
        Ok(Self {
            rows,
            cols,
            codes: Codes::Q4(out),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product reads from the weights: codes, scales and minimums.
    pub fn bytes(&self) -> usize {
        match &self.codes {
            Codes::Q8 { codes, scales } => codes.len() + 4 * scales.len(),
            Codes::Q4(data) | Codes::Q4K(data) | Codes::Q6(data) => data.len(),
        }
    }

    /// The rows of `parts` one after another (e.g. a gate and an up projection, multiplied in
    /// one pass), or `None` if they cannot be stacked as they are: different widths or block
    /// types, or a part other than the last ending inside a panel.
    pub fn concat_rows(parts: &[&QMatrix]) -> Option<QMatrix> {
        let (first, rest) = parts.split_first()?;
        let (last, _) = parts.split_last()?;
        let whole = |m: &&QMatrix| std::ptr::eq(*m, *last) || m.rows.is_multiple_of(PANEL);
        if !parts.iter().all(|m| m.cols == first.cols && whole(m)) {
            return None;
        }
        let mut codes = match &first.codes {
            Codes::Q8 { codes, scales } => Codes::Q8 {
                codes: codes.clone(),
                scales: scales.clone(),
            },
            Codes::Q4(data) => Codes::Q4(data.clone()),
            Codes::Q4K(data) => Codes::Q4K(data.clone()),
            Codes::Q6(data) => Codes::Q6(data.clone()),
        };
        for m in rest {
            match (&mut codes, &m.codes) {
                (
                    Codes::Q8 { codes, scales },
                    Codes::Q8 {
                        codes: c,
                        scales: s,
                    },
                ) => {
                    codes.extend_from_slice(c);
                    scales.extend_from_slice(s);
                }
                (Codes::Q4(all), Codes::Q4(data))
                | (Codes::Q4K(all), Codes::Q4K(data))
                | (Codes::Q6(all), Codes::Q6(data)) => all.extend_from_slice(data),
                _ => return None,
            }
        }
        Some(QMatrix {
            rows: parts.iter().map(|m| m.rows).sum(),
            cols: first.cols,
            codes,
        })
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    /// Panels `first..` as the kernels see them.
    fn view(&self, first: usize) -> Panels<'_> {
        let blocks = self.blocks();
        match &self.codes {
            Codes::Q8 { codes, scales } => Panels::Q8 {
                codes: &codes[first * blocks * Q8_PANEL_BLOCK..],
                scales: &scales[first * blocks * PANEL..],
            },
            Codes::Q4(data) => Panels::Q4(&data[first * blocks * Q4_PANEL_BLOCK..]),
            Codes::Q4K(data) => Panels::Q4K(&data[first * blocks / SUPER * Q4K_PANEL_SUPER..]),
            Codes::Q6(data) => Panels::Q6(&data[first * blocks / SUPER * Q6_PANEL_SUPER..]),
        }
    }

    /// Panels `panels` against every activation row, with the given kernels.
    ///
    /// # Safety
    /// `kernels` must be runnable on this CPU and `out` must have room for every row.
    unsafe fn run(&self, kernels: &Kernels, panels: Range<usize>, x: &Activations, out: Out) {
        let out = Out {
            ptr: out.ptr.add(panels.start * PANEL),
            ..out
        };
        (kernels.tile)(&self.view(panels.start), panels.len(), x, out)
    }

    /// `x`: `[m, cols]` row-major -> `[m, rows]`, `m = precise_rows.len()`; rows marked in
    /// `precise_rows` take two int8 terms (see [`Activations`]), the others one.
    pub fn matmul(&self, x: &[f32], precise_rows: &[bool]) -> Vec<f32> {
        let m = precise_rows.len();
        assert_eq!(
            x.len(),
            m * self.cols,
            "qmatmul: {m} rows of {} columns",
            self.cols
        );
        let kernels = kernels();
        let (panels, padded) = (self.panels(), self.panels() * PANEL);
        // Not zeroed (for the output head at 16 rows, 3 MB a step): every tile stores each of
        // its rows' outputs of its panels, and the tasks and rows below cover every panel and
        // every row; a tile only reads back what an earlier pass of it stored.
        let mut out: Vec<f32> = Vec::with_capacity(m * padded);
        let ptr = Out {
            ptr: out.as_mut_ptr(),
            stride: padded,
        };
        for terms in [2, 1] {
            let rows: Vec<usize> = (0..m)
                .filter(|&i| precise_rows[i] == (terms == 2))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let six_bit = matches!(self.codes, Codes::Q6(_));
            let act = Activations::new(x, self.cols, rows, terms, kernels.quantize, six_bit);
            // Even numbers of panels per task (the AVX-512 kernel takes them in pairs), a few
            // tasks per thread so that they balance.
            let per_task = panels
                .div_ceil(4 * rayon::current_num_threads())
                .next_multiple_of(2);
            (0..panels.div_ceil(per_task))
                .into_par_iter()
                .for_each(|t| {
                    let range = t * per_task..((t + 1) * per_task).min(panels);
                    // SAFETY: `kernels` only holds kernels whose CPU features are present; `out` has
                    // `m` rows of every panel, and tasks write disjoint panels.
                    unsafe { self.run(kernels, range, &act, ptr) }
                });
        }
        // SAFETY: every row of every panel was written (see above).
        unsafe { out.set_len(m * padded) };
        if padded != self.rows {
            out = out
                .chunks_exact(padded)
                .flat_map(|row| &row[..self.rows])
                .copied()
                .collect();
        }
        out
    }
}

/// Consecutive panels of a [`QMatrix`], from the first one a kernel is given.
#[derive(Clone, Copy)]
enum Panels<'a> {
    Q8 {
        codes: &'a [u8],
        scales: &'a [f32],
    },
    /// Panel-blocks of [`Q4_PANEL_BLOCK`] bytes: codes, f16 scales, f16 minimums.
    Q4(&'a [u8]),
    /// Panel-super-blocks of [`Q4K_PANEL_SUPER`] bytes (see [`q4k_at`]).
    Q4K(&'a [u8]),
    /// Panel-super-blocks of [`Q6_PANEL_SUPER`] bytes (see [`q6_at`]).
    Q6(&'a [u8]),
}

/// A tile's place: panels from `p0`, int8 rows from `i0` (the first term of an input row), and
/// the blocks of this pass.
struct Tile {
    p0: usize,
    i0: usize,
    blocks: Range<usize>,
}

/// Where a kernel writes: output row `i`'s 16 outputs of the kernel's panel `p` start at
/// `ptr + i * stride + p * 16`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: tasks given the same `Out` write disjoint panels of it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Row `i`'s 16 outputs of panel `p`.
    #[inline(always)]
    unsafe fn at(&self, i: usize, p: usize) -> *mut f32 {
        self.ptr.add(i * self.stride + p * PANEL)
    }
}

/// How many blocks a tile takes per pass over the activations, so that its `bytes_per_block` of
/// weights stay in the L1 cache while every row goes past: the blocks split evenly into passes.
/// A tile resumes its sums from the output between passes (the same additions in the same order).
fn blocks_per_pass(blocks: usize, bytes_per_block: usize) -> usize {
    const BUDGET: usize = 12 << 10;
    blocks.div_ceil((blocks * bytes_per_block).div_ceil(BUDGET).max(1))
}

/// Asks for `lines` cache lines from `at` into the L2 cache. The first tile of rows reads each
/// weight from memory; the kernels ask for the panels they will read next while they multiply,
/// as the hardware prefetchers lose the stream when a tile re-reads a panel from the L1 cache
/// for each tile of rows (measured: the int8 output head at 16 rows 15 % faster, at one row
/// 30 %).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(at: *const u8, lines: usize) {
    for l in 0..lines {
        // `wrapping_add`: past the last panel the address is outside the weights, which a
        // prefetch may name (it never faults).
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
            at.wrapping_add(64 * l) as *const i8,
        );
    }
}

/// `(panels from the first, how many, activations, out)`: every activation row against that
/// many panels.
type TileKernel = unsafe fn(&Panels, usize, &Activations, Out);

/// [`quantize_row`] compiled for an instruction set.
type QuantizeKernel = unsafe fn(&[f32], RowOut, Option<RowOut>);

struct Kernels {
    tile: TileKernel,
    quantize: QuantizeKernel,
}

/// The kernels this CPU runs, fastest first (the scalar ones run anywhere), within
/// [`isa::cap`].
fn candidates() -> Vec<(&'static str, Kernels)> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;

        use crate::isa::{self, Tier};
        let cap = isa::cap();
        if cap >= Tier::Avx512
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vnni")
            && has!("fma")
        {
            let k = Kernels {
                tile: avx512::tile,
                quantize: avx512::quantize,
            };
            found.push(("avx512-vnni", k));
        }
        if cap >= Tier::Avx2 && has!("avx2") && has!("fma") && has!("f16c") {
            let k = Kernels {
                tile: avx2::tile,
                quantize: avx2::quantize,
            };
            found.push(("avx2", k));
        }
    }
    let k = Kernels {
        tile: scalar::tile,
        quantize: scalar::quantize,
    };
    found.push(("scalar", k));
    found
}

/// The fastest kernels this CPU runs, chosen once, and their name.
fn best() -> &'static (&'static str, Kernels) {
    static BEST: std::sync::OnceLock<(&'static str, Kernels)> = std::sync::OnceLock::new();
    BEST.get_or_init(|| candidates().swap_remove(0))
}

fn kernels() -> &'static Kernels {
    &best().1
}

/// Whether the kernel this CPU runs multiplies with VNNI, where a row in two int8 terms costs
/// little more than in one (with AVX2 alone, about twice as much).
pub fn has_vnni() -> bool {
    best().0 == "avx512-vnni"
}

/// `with_rows!(n, MAX, f[A, B](args))` calls `f::<A, B, N>(args)` with N = n in 1..=MAX (2 or
/// 6), so that each tile height gets its own unrolled code.
macro_rules! with_rows {
    ($n:expr, 2, $f:ident [$($p:tt),*] ($($arg:expr),*)) => {
        match $n {
            1 => $f::<$($p,)* 1>($($arg),*),
            _ => $f::<$($p,)* 2>($($arg),*),
        }
    };
    ($n:expr, 6, $f:ident [$($p:tt),*] ($($arg:expr),*)) => {
        match $n {
            1 => $f::<$($p,)* 1>($($arg),*),
            2 => $f::<$($p,)* 2>($($arg),*),
            3 => $f::<$($p,)* 3>($($arg),*),
            4 => $f::<$($p,)* 4>($($arg),*),
            5 => $f::<$($p,)* 5>($($arg),*),
            _ => $f::<$($p,)* 6>($($arg),*),
        }
    };
}

mod gguf;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// `x @ w.T` for f32 `x` (`[m, cols]`) as a candle op, on the CPU; rows marked in
/// `precise_rows` (`m` of them) take two int8 terms, the others one.
pub struct QMatMul<'a> {
    pub weights: &'a QMatrix,
    pub precise_rows: &'a [bool],
}

impl CustomOp1 for QMatMul<'_> {
    fn name(&self) -> &'static str {
        "cpu-qmatmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, cols) = l.shape().dims2()?;
        let w = self.weights;
        if cols != w.cols || m != self.precise_rows.len() {
            candle_core::bail!(
                "cpu-qmatmul: input is {m}x{cols}, weights take {} columns and {} rows were described",
                w.cols,
                self.precise_rows.len()
            );
        }
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cpu-qmatmul: non-contiguous input".into()))?;
        let x = &s.as_slice::<f32>()?[start..end];
        Ok((
            CpuStorage::F32(w.matmul(x, self.precise_rows)),
            Shape::from((m, w.rows)),
        ))
    }
}

#[cfg(test)]
mod tests;
