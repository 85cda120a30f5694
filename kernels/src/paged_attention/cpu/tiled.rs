//! Prompt chunks: a sequence's query tokens in blocks, each block against its context a tile
//! of positions at a time (flash-attention style, with a running softmax).
//!
//! One token at a time, every query token of a chunk reads and widens the whole context's keys
//! and values: at the end of a 4096-token prompt a 128-token chunk of SmolLM2 reads 3 MB per
//! token and layer, from beyond the L2 cache. A block takes one KV head's query heads for a run
//! of tokens (up to 64 query vectors) together: each tile of 64 positions is widened to f32
//! once, then both products are small matrix products that keep their sums in registers and
//! need no sum across a vector's lanes:
//!
//! - scores `s[p][j] = Σ_d k[p][d] · q[d][j]`, with the block's queries transposed once (a
//!   query vector per lane `j`), so each key value is broadcast against the lanes;
//! - weighted values `o[d][j] += Σ_p v[p][d] · w[p][j]`, the same product over the weights.
//!
//! With a query vector per lane, each one's running maximum, softmax denominator and rescaling
//! are plain loops over lanes too.

use super::simd::{Element, Width};
use super::Dims;
use crate::exp_nonpositive;

/// Positions per tile: its keys and values widened (64 of 128 floats: 64 KB) stay in L2.
const KEYS: usize = 64;
/// Most query vectors a block takes (tokens times the KV head's group): 64 fill AVX-512's
/// register tile of four vectors.
const BLOCK_ROWS: usize = 64;
/// Rows of the register tile: keys while scoring, head dimensions while weighing.
const R: usize = 4;

/// Query tokens per block for `tokens` query tokens of a sequence and `group` query heads per
/// KV head: as few blocks as [`BLOCK_ROWS`] allows, of even sizes, and none of more than `most`
/// tokens (where a step's blocks would be too few to keep every worker busy).
pub(super) fn block_tokens(tokens: usize, group: usize, most: usize) -> usize {
    let most = (BLOCK_ROWS / group.max(1)).clamp(1, most.max(1));
    tokens.div_ceil(tokens.div_ceil(most).max(1)).max(1)
}

/// One task: `tokens` query tokens of a sequence from batch row `row` (at context position
/// `pos0`, each next token one further), the query heads of KV head `kv_head`.
#[derive(Clone, Copy)]
pub(super) struct Block {
    pub(super) seq: usize,
    pub(super) kv_head: usize,
    pub(super) row: usize,
    pub(super) pos0: usize,
    pub(super) tokens: usize,
}

/// Buffers one worker reuses from block to block (`mp`: the block's query vectors rounded up
/// to whole vectors).
#[derive(Default)]
pub(super) struct TileScratch {
    /// The queries, scaled, transposed: `[head_dim][mp]`.
    qt: Vec<f32>,
    /// A tile's keys and values, widened: `[KEYS][head_dim]` each.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// A tile's scores, then weights: `[KEYS][mp]`.
    scores: Vec<f32>,
    /// Running weighted sums of values: `[head_dim][mp]`.
    acc: Vec<f32>,
    /// Per lane: the last position it sees, its running maximum, denominator, and a tile's
    /// rescale factor.
    last: Vec<usize>,
    max: Vec<f32>,
    sum: Vec<f32>,
    scale: Vec<f32>,
}

/// The block's attention output, normalized, `[tokens][group][head_dim]`, into `out`.
///
/// # Safety
/// The CPU must have `W`'s instruction set; `head_dim` is a multiple of `W::L` and of [`R`];
/// the block table names blocks in the caches for every position up to `pos0 + tokens`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend_block<W: Width, E: Element>(
    d: &Dims,
    hd: usize,
    (q, k, v): (&[f32], &[E], &[E]),
    table: &[u32],
    b: &Block,
    out: &mut [f32],
    s: &mut TileScratch,
) {
    let group = d.heads / d.kv_heads;
    let m = b.tokens * group;
    let mp = m.next_multiple_of(W::L);
    let row = d.heads * hd;
    s.qt.clear();
    s.qt.resize(hd * mp, 0.);
    for t in 0..b.tokens {
        let q_row = &q[(b.row + t) * row + b.kv_head * group * hd..][..group * hd];
        for (g, head) in q_row.chunks_exact(hd).enumerate() {
            for (i, &x) in head.iter().enumerate() {
                s.qt[i * mp + t * group + g] = x * d.scale;
            }
        }
    }
    // Padding lanes (zero queries) see what the last token sees; their output is dropped.
    s.last.clear();
    s.last
        .extend((0..mp).map(|j| b.pos0 + (j / group).min(b.tokens - 1)));
    for (buf, fill) in [
        (&mut s.max, f32::NEG_INFINITY),
        (&mut s.sum, 0.),
        (&mut s.scale, 0.),
    ] {
        buf.clear();
        buf.resize(mp, fill);
    }
    s.acc.clear();
    s.acc.resize(hd * mp, 0.);
    s.keys.resize(KEYS * hd, 0.);
    s.values.resize(KEYS * hd, 0.);
    s.scores.resize(KEYS * mp, 0.);

    let (bs, stride) = (d.block_size, d.kv_heads * hd);
    let end = b.pos0 + b.tokens;
    for first in (0..end).step_by(KEYS) {
        let n = (end - first).min(KEYS);
        // The tile's rows, widened; key rows past `n` up to whole register tiles are zero.
        for p in 0..n {
            let pos = first + p;
            let at =
                (*table.get_unchecked(pos / bs) as usize * bs + pos % bs) * stride + b.kv_head * hd;
            let (kr, vr) = (k.as_ptr().add(at), v.as_ptr().add(at));
            let (kd, vd) = (
                s.keys.as_mut_ptr().add(p * hd),
                s.values.as_mut_ptr().add(p * hd),
            );
            for c in (0..hd).step_by(W::L) {
                W::store(kd.add(c), W::load::<E>(kr.add(c)));
                W::store(vd.add(c), W::load::<E>(vr.add(c)));
            }
        }
        let rows = n.next_multiple_of(R);
        s.keys[n * hd..rows * hd].fill(0.);
        matmul::<W>(
            Lhs {
                a: s.keys.as_ptr(),
                row_stride: hd,
                step: 1,
            },
            (rows, hd),
            s.qt.as_ptr(),
            mp,
            s.scores.as_mut_ptr(),
            false,
        );
        let scores = &mut s.scores[..n * mp];
        // Causal: a lane sees positions up to its token's own.
        if first + n - 1 > b.pos0 {
            for (p, sp) in scores.chunks_exact_mut(mp).enumerate() {
                for (x, &last) in sp.iter_mut().zip(&s.last) {
                    if first + p > last {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        // Every lane sees position 0, so its maximum is finite from the first tile on; a lane's
        // first rescale factor is exp(-inf) = 0 of sums that are 0.
        s.scale.copy_from_slice(&s.max);
        for sp in scores.chunks_exact(mp) {
            for (m, &x) in s.max.iter_mut().zip(sp) {
                *m = m.max(x);
            }
        }
        for ((f, &m), sum) in s.scale.iter_mut().zip(&s.max).zip(&mut s.sum) {
            *f = exp_nonpositive(*f - m);
            *sum *= *f;
        }
        for sp in scores.chunks_exact_mut(mp) {
            for ((x, &m), sum) in sp.iter_mut().zip(&s.max).zip(&mut s.sum) {
                *x = exp_nonpositive(*x - m);
                *sum += *x;
            }
        }
        for ad in s.acc.chunks_exact_mut(mp) {
            for (a, &f) in ad.iter_mut().zip(&s.scale) {
                *a *= f;
            }
        }
        matmul::<W>(
            Lhs {
                a: s.values.as_ptr(),
                row_stride: 1,
                step: hd,
            },
            (hd, n),
            s.scores.as_ptr(),
            mp,
            s.acc.as_mut_ptr(),
            true,
        );
    }
    for (j, &sum) in s.sum[..m].iter().enumerate() {
        let inv = 1. / sum;
        let o = &mut out[j * hd..][..hd];
        for (i, o) in o.iter_mut().enumerate() {
            *o = s.acc[i * mp + j] * inv;
        }
    }
}

/// The left factor of [`matmul`]: element `(r, i)` at `a[r * row_stride + i * step]`.
#[derive(Clone, Copy)]
struct Lhs {
    a: *const f32,
    row_stride: usize,
    step: usize,
}

/// `c[r][j] (+)= Σ_i a(r, i) · b[i][j]` for `r < rows` (a multiple of [`R`]), `i < inner` and
/// `j < mp` (whole vectors; `b` and `c` rows are `mp` floats apart), in register tiles of `R`
/// rows by up to 4 vectors: each `a` value is broadcast, each `b` vector loaded once per `R` rows.
#[inline(always)]
unsafe fn matmul<W: Width>(
    a: Lhs,
    (rows, inner): (usize, usize),
    b: *const f32,
    mp: usize,
    c: *mut f32,
    accumulate: bool,
) {
    // 16 accumulators of AVX-512's 32 registers, 8 of AVX2's 16.
    let widest = if W::L >= 16 { 4 } else { 2 };
    for r0 in (0..rows).step_by(R) {
        let a = Lhs {
            a: a.a.add(r0 * a.row_stride),
            ..a
        };
        let mut j = 0;
        while j < mp {
            let (b, c) = (b.add(j), c.add(r0 * mp + j));
            let vectors = ((mp - j) / W::L).min(widest);
            match vectors {
                1 => tile::<W, 1>(a, inner, b, mp, c, accumulate),
                2 => tile::<W, 2>(a, inner, b, mp, c, accumulate),
                3 => tile::<W, 3>(a, inner, b, mp, c, accumulate),
                _ => tile::<W, 4>(a, inner, b, mp, c, accumulate),
            }
            j += vectors * W::L;
        }
    }
}

/// One register tile of [`matmul`]: `R` rows by `N` vectors.
#[inline(always)]
unsafe fn tile<W: Width, const N: usize>(
    a: Lhs,
    inner: usize,
    b: *const f32,
    mp: usize,
    c: *mut f32,
    accumulate: bool,
) {
    let mut acc = [[W::zero(); N]; R];
    if accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (n, x) in acc.iter_mut().enumerate() {
                *x = W::loadu(c.add(r * mp + n * W::L));
            }
        }
    }
    for i in 0..inner {
        let bi = b.add(i * mp);
        let bv: [W::V; N] = std::array::from_fn(|n| W::loadu(bi.add(n * W::L)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = *a.a.add(r * a.row_stride + i * a.step);
            for (x_acc, &bv) in acc.iter_mut().zip(&bv) {
                *x_acc = W::fmadd(x, bv, *x_acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (n, &x) in acc.iter().enumerate() {
            W::store(c.add(r * mp + n * W::L), x);
        }
    }
}
