//! The CPU kernel: f32 queries over an f32 or f16 cache, one query token at a time over its
//! sequence's blocks, rows in parallel. Long contexts are split into parts of fixed size
//! ([`PART`]) that workers take apart, and the parts' partial softmaxes are merged. Prompt
//! tokens go in blocks of tokens over tiles of positions instead ([`tiled`]).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, WithDType};
use half::f16;
use rayon::prelude::*;

use super::SeqAttention;
use crate::exp_nonpositive;
use crate::isa::{self, Tier};
#[cfg(target_arch = "x86_64")]
use simd::{Avx2, Avx512};
use simd::{Element, Portable, Rows, Simd};
use tiled::{Block, TileScratch};

mod simd;
mod tiled;

/// The CPU kernel: rayon over batch rows, each row all heads over its context (or over a part
/// of it, see [`PART`]).
pub(super) struct CpuPagedAttention<'a> {
    pub(super) seqs: &'a [SeqAttention],
    pub(super) scale: f32,
    pub(super) tier: Tier,
    /// Most positions in a part of a split context ([`PART`]; tests take fewer).
    pub(super) part: usize,
    /// Every query token in [`tiled`] blocks, not only a prompt's (tests).
    pub(super) tile_all: bool,
}

/// Most positions a decoding row reads in one task: a longer context is split into parts of
/// even size, which workers take apart and which are then merged. The split depends on the
/// row's context alone, never on the rest of the step, so a token's attention is the same to
/// the bit alone or in a batch. A part's fixed costs (a task, its row offsets, the merge)
/// are small against the 10 µs or so that 256 positions of SmolLM2's 9 heads take, and a
/// lone stream at 1024 positions still keeps four workers busy.
pub(super) const PART: usize = 256;

/// One task: batch row `row` of sequence `seq` over its context positions `start..end`.
#[derive(Clone, Copy)]
struct Part {
    row: usize,
    seq: usize,
    start: usize,
    end: usize,
}

/// The instruction-set tiers this CPU has for the kernel, widest first.
pub(super) fn tiers() -> Vec<Tier> {
    let mut tiers = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx2") && has!("fma") && has!("f16c") {
            tiers.push(Tier::Avx512);
        }
        // F16C widens f16 cache rows; every AVX2 CPU has it.
        if has!("avx2") && has!("fma") && has!("f16c") {
            tiers.push(Tier::Avx2);
        }
    }
    tiers.push(Tier::Scalar);
    tiers
}

/// The widest of [`tiers`] within [`isa::cap`], found once.
pub(super) fn best_tier() -> Tier {
    static BEST: OnceLock<Tier> = OnceLock::new();
    *BEST.get_or_init(|| {
        let cap = isa::cap();
        tiers()
            .into_iter()
            .find(|&t| t <= cap)
            .unwrap_or(Tier::Scalar)
    })
}

impl CustomOp3 for CpuPagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, heads, head_dim) = q_l.shape().dims3()?;
        let (num_blocks, block_size, kv_heads, cache_head_dim) = k_l.shape().dims4()?;
        if v_l.shape() != k_l.shape()
            || cache_head_dim != head_dim
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
        {
            candle_core::bail!(
                "paged-attention: queries {:?} over caches {:?} and {:?}",
                q_l.shape(),
                k_l.shape(),
                v_l.shape()
            );
        }
        // The kernels read cache rows through raw offsets: every block a sequence reads must be
        // in the cache.
        for s in self.seqs {
            let blocks =
                &s.block_table[..s.context_len.div_ceil(block_size).min(s.block_table.len())];
            if blocks.len() * block_size < s.context_len
                || blocks.iter().any(|&b| b as usize >= num_blocks)
            {
                candle_core::bail!(
                    "paged-attention: a block table of {} blocks does not hold {} positions in a cache of {num_blocks}",
                    s.block_table.len(),
                    s.context_len
                );
            }
        }
        let q = contiguous::<f32>(q, q_l)?;
        match (k, v) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (k, v) = (contiguous::<f32>(k, k_l)?, contiguous::<f32>(v, v_l)?);
                self.run(q, k, v, (tokens, heads, head_dim), block_size, kv_heads)
            }
            (CpuStorage::F16(_), CpuStorage::F16(_)) => {
                let (k, v) = (contiguous::<f16>(k, k_l)?, contiguous::<f16>(v, v_l)?);
                self.run(q, k, v, (tokens, heads, head_dim), block_size, kv_heads)
            }
            _ => candle_core::bail!(
                "paged-attention: caches of {:?} and {:?} (f32 or f16 expected)",
                k.dtype(),
                v.dtype()
            ),
        }
    }
}

impl CpuPagedAttention<'_> {
    /// Every batch row over its sequence's context in caches of `E`.
    fn run<E: Element>(
        &self,
        q: &[f32],
        k: &[E],
        v: &[E],
        (tokens, heads, head_dim): (usize, usize, usize),
        block_size: usize,
        kv_heads: usize,
    ) -> Result<(CpuStorage, Shape)> {
        let row = heads * head_dim;
        // Each batch row -> (its sequence, its position).
        let mut owner = vec![None; tokens];
        for (si, s) in self.seqs.iter().enumerate() {
            let first_pos = s.context_len - s.query_len;
            for i in 0..s.query_len {
                owner[s.query_start + i] = Some((si, first_pos + i));
            }
        }
        let mut out = vec![0f32; tokens * row];
        let dims = Dims {
            heads,
            kv_heads,
            block_size,
            scale: self.scale,
        };
        // Prompt tokens: blocks of tokens, one KV head's query heads each.
        let group = heads / kv_heads;
        let tiled_len = |s: &SeqAttention| {
            if self.tile_all {
                s.query_len
            } else {
                let first_pos = s.context_len - s.query_len;
                s.prompt_len.min(s.context_len).saturating_sub(first_pos)
            }
        };
        // About two blocks per worker at least, on a machine of many cores.
        let tiled_tokens: usize = self.seqs.iter().map(tiled_len).sum();
        let most = (tiled_tokens * kv_heads).div_ceil(2 * rayon::current_num_threads());
        let mut blocks = Vec::new();
        for (seq, s) in self.seqs.iter().enumerate() {
            let n = tiled_len(s);
            if n == 0 {
                continue;
            }
            let per_block = tiled::block_tokens(n, group, most);
            owner[s.query_start..][..n].fill(None);
            let pos0 = s.context_len - s.query_len;
            for kv_head in 0..kv_heads {
                blocks.extend((0..n).step_by(per_block).map(|t| Block {
                    seq,
                    kv_head,
                    row: s.query_start + t,
                    pos0: pos0 + t,
                    tokens: (n - t).min(per_block),
                }));
            }
        }
        if !blocks.is_empty() {
            let attend = tiled_kernel::<E>(self.tier);
            let width = group * head_dim;
            let outs: Vec<Vec<f32>> = blocks
                .par_iter()
                .map_init(TileScratch::default, |scratch, b| {
                    let mut o = vec![0f32; b.tokens * width];
                    let table = &self.seqs[b.seq].block_table;
                    // SAFETY: `self.tier` is one this CPU has (`tiers`); the head size is a
                    // multiple of 16 (`supports`); `cpu_fwd` checked the tables.
                    unsafe { attend(&dims, head_dim, (q, k, v), table, b, &mut o, scratch) };
                    o
                })
                .collect();
            for (b, o) in blocks.iter().zip(&outs) {
                for (t, o) in o.chunks_exact(width).enumerate() {
                    out[(b.row + t) * row + b.kv_head * width..][..width].copy_from_slice(o);
                }
            }
        }
        let attend = kernel::<E>(head_dim / LANES, self.tier);
        let query = |part: &Part| Query {
            q: &q[part.row * row..][..row],
            k,
            v,
            table: &self.seqs[part.seq].block_table,
            start: part.start,
            end: part.end,
        };
        // Other tokens one at a time: rows of at most `part` positions whole, each task
        // writing its row's output normalized.
        let part = self.part.max(1);
        let whole = |t: usize| owner[t].filter(|&(_, pos)| pos < part);
        if (0..tokens).any(|t| whole(t).is_some()) {
            out.par_chunks_mut(row).enumerate().for_each_init(
                Scratch::default,
                |scratch, (t, out_row)| {
                    if let Some((seq, pos)) = whole(t) {
                        let part = Part {
                            row: t,
                            seq,
                            start: 0,
                            end: pos + 1,
                        };
                        // SAFETY: `self.tier` is one this CPU has (`tiers`).
                        unsafe { attend(&dims, &query(&part), out_row, None, scratch) }
                    }
                },
            );
        }
        // Longer rows in parts of even size: each task leaves its weighted sums unnormalized,
        // with each head's score maximum and softmax denominator; a row's parts are then
        // merged.
        let mut parts = Vec::new();
        for (t, o) in owner.iter().enumerate() {
            let Some((seq, pos)) = *o else { continue };
            let n = pos + 1;
            if n <= part {
                continue;
            }
            let size = n.div_ceil(n.div_ceil(part));
            parts.extend((0..n).step_by(size).map(|start| Part {
                row: t,
                seq,
                start,
                end: (start + size).min(n),
            }));
        }
        if !parts.is_empty() {
            let mut partial = vec![0f32; parts.len() * row];
            let mut stats = vec![[0f32; 2]; parts.len() * heads];
            partial
                .par_chunks_mut(row)
                .zip(stats.par_chunks_mut(heads))
                .zip(parts.par_iter())
                .for_each_init(Scratch::default, |scratch, ((out_part, stats), part)| {
                    // SAFETY: as above.
                    unsafe { attend(&dims, &query(part), out_part, Some(stats), scratch) }
                });
            let mut first = 0;
            while first < parts.len() {
                let t = parts[first].row;
                let last = first + parts[first..].iter().take_while(|p| p.row == t).count();
                merge(
                    &partial[first * row..last * row],
                    &stats[first * heads..last * heads],
                    &mut out[t * row..][..row],
                );
                first = last;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((tokens, heads, head_dim))))
    }
}

struct Dims {
    heads: usize,
    kv_heads: usize,
    block_size: usize,
    scale: f32,
}

/// Values per chunk of a head: the kernels keep a head as `[[f32; LANES]; C]`.
const LANES: usize = 16;

/// Whether the CPU kernel handles this head size (others take the reference path).
pub(super) fn supports(head_dim: usize) -> bool {
    head_dim.is_multiple_of(LANES) && (1..=16).contains(&(head_dim / LANES))
}

/// Sums a row's parts (`partial`: each part's heads back to back, unnormalized; `stats`: each
/// part's `[max score, softmax denominator]` per head) into its attention output `out`, as one
/// softmax over all their positions.
fn merge(partial: &[f32], stats: &[[f32; 2]], out: &mut [f32]) {
    let row = out.len();
    let parts = partial.len() / row;
    let heads = stats.len() / parts;
    let hd = row / heads;
    for (h, out_head) in out.chunks_exact_mut(hd).enumerate() {
        let max = (0..parts).fold(f32::NEG_INFINITY, |m, p| m.max(stats[p * heads + h][0]));
        let mut denominator = 0.;
        out_head.fill(0.);
        for p in 0..parts {
            let [part_max, part_sum] = stats[p * heads + h];
            let w = exp_nonpositive(part_max - max);
            denominator += w * part_sum;
            for (o, &x) in out_head.iter_mut().zip(&partial[p * row + h * hd..][..hd]) {
                *o += w * x;
            }
        }
        let inv = 1. / denominator;
        out_head.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One query token: its heads, the caches, its sequence's block table, and the positions
/// `start..end` of its context to attend over.
struct Query<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    table: &'a [u32],
    start: usize,
    end: usize,
}

/// Buffers one worker reuses from token to token.
#[derive(Default)]
struct Scratch {
    /// Scores, then softmax weights: one run of positions per query head of a group.
    scores: Vec<f32>,
    /// Each position's row offset in the caches (for KV head 0).
    rows: Vec<usize>,
    /// Each query head's softmax denominator, inverted.
    inv: Vec<f32>,
}

/// `(dims, query, output heads, per-head [max, denominator] of a part, scratch)`.
type AttendFn<E> = unsafe fn(&Dims, &Query<E>, &mut [f32], Option<&mut [[f32; 2]]>, &mut Scratch);

/// `attend_token::<C, _, E>` compiled for `tier`.
fn kernel<E: Element>(chunks: usize, tier: Tier) -> AttendFn<E> {
    macro_rules! pick {
        ($c:expr, $f:ident) => {
            match $c {
                1 => $f::<1, E>,
                2 => $f::<2, E>,
                3 => $f::<3, E>,
                4 => $f::<4, E>,
                5 => $f::<5, E>,
                6 => $f::<6, E>,
                7 => $f::<7, E>,
                8 => $f::<8, E>,
                9 => $f::<9, E>,
                10 => $f::<10, E>,
                11 => $f::<11, E>,
                12 => $f::<12, E>,
                13 => $f::<13, E>,
                14 => $f::<14, E>,
                15 => $f::<15, E>,
                _ => $f::<16, E>,
            }
        };
    }
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => pick!(chunks, attend_avx512),
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => pick!(chunks, attend_avx2),
        _ => pick!(chunks, attend_portable),
    }
}

/// `(dims, head size, (queries, keys, values), block table, block, its output, scratch)`.
type BlockFn<E> =
    unsafe fn(&Dims, usize, (&[f32], &[E], &[E]), &[u32], &Block, &mut [f32], &mut TileScratch);

/// [`tiled::attend_block`] compiled for `tier`.
fn tiled_kernel<E: Element>(tier: Tier) -> BlockFn<E> {
    match tier {
        #[cfg(target_arch = "x86_64")]
        Tier::Avx512 => block_avx512::<E>,
        #[cfg(target_arch = "x86_64")]
        Tier::Avx2 => block_avx2::<E>,
        _ => block_portable::<E>,
    }
}

/// `tiled::attend_block::<W, E>` compiled for an instruction set.
macro_rules! block_with {
    ($name:ident, $width:ty $(, $features:literal)?) => {
        $(#[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)])?
        unsafe fn $name<E: Element>(
            d: &Dims,
            hd: usize,
            qkv: (&[f32], &[E], &[E]),
            table: &[u32],
            b: &Block,
            out: &mut [f32],
            scratch: &mut TileScratch,
        ) {
            tiled::attend_block::<$width, E>(d, hd, qkv, table, b, out, scratch)
        }
    };
}

block_with!(block_avx512, Avx512, "avx512f,avx2,fma,f16c");
block_with!(block_avx2, Avx2, "avx2,fma,f16c");
block_with!(block_portable, Portable);

/// `attend_token::<C, S, E>` compiled for an instruction set.
macro_rules! attend_with {
    ($name:ident, $simd:ty $(, $features:literal)?) => {
        $(#[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)])?
        unsafe fn $name<const C: usize, E: Element>(
            d: &Dims,
            query: &Query<E>,
            out: &mut [f32],
            stats: Option<&mut [[f32; 2]]>,
            scratch: &mut Scratch,
        ) {
            attend_token::<C, $simd, E>(d, query, out, stats, scratch)
        }
    };
}

attend_with!(attend_avx512, Avx512, "avx512f,avx2,fma,f16c");
attend_with!(attend_avx2, Avx2, "avx2,fma,f16c");
attend_with!(attend_portable, Portable);

/// One query token (all heads) over positions `start..end` of its sequence, walking the block
/// table. Each KV head's group of query heads goes together: a run of keys is scored against
/// the whole group while it is in L1, then each head's softmax, then the group's weighted sums
/// of values. Without `stats` the sums are normalized (the whole context); with it they are
/// left as they are and each head's `[max score, denominator]` goes there, for [`merge`].
#[inline(always)]
unsafe fn attend_token<const C: usize, S: Simd, E: Element>(
    d: &Dims,
    query: &Query<E>,
    out: &mut [f32],
    mut stats: Option<&mut [[f32; 2]]>,
    scratch: &mut Scratch,
) {
    let Query {
        q,
        k,
        v,
        table,
        start,
        end,
    } = *query;
    let (hd, bs) = (C * LANES, d.block_size);
    let group = d.heads / d.kv_heads;
    let n = end - start;
    let Scratch { scores, rows, inv } = scratch;
    rows.clear();
    rows.extend((start..end).map(|p| (table[p / bs] as usize * bs + p % bs) * d.kv_heads * hd));
    scores.clear();
    scores.resize(group * n, 0.);
    S::prefetch_start(
        Rows {
            cache: k,
            offsets: rows,
        },
        hd,
    );
    for h in 0..d.kv_heads {
        let (keys, values) = (
            Rows {
                cache: &k[h * hd..],
                offsets: rows,
            },
            Rows {
                cache: &v[h * hd..],
                offsets: rows,
            },
        );
        let q_group = &q[h * group * hd..][..group * hd];
        S::score::<C, E>(q_group, group, keys, d.scale, scores);
        // The values' first rows arrive during the softmax, the next head's first keys during
        // the weighing.
        S::prefetch_start(values, hd);
        if h + 1 < d.kv_heads {
            S::prefetch_start(
                Rows {
                    cache: &k[(h + 1) * hd..],
                    offsets: rows,
                },
                hd,
            );
        }
        inv.clear();
        for (g, s) in scores.chunks_exact_mut(n).enumerate() {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for x in s.iter_mut() {
                *x = exp_nonpositive(*x - max);
            }
            let denominator = sum(s);
            match stats.as_deref_mut() {
                Some(stats) => stats[h * group + g] = [max, denominator],
                None => inv.push(1.0 / denominator),
            }
        }
        let out = &mut out[h * group * hd..][..group * hd];
        S::weigh::<C, E>(scores, group, values, out);
        for (o, &inv) in out.chunks_exact_mut(hd).zip(inv.iter()) {
            for o in o {
                *o *= inv;
            }
        }
    }
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("paged-attention: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Sum with sixteen running totals, so that it vectorises.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests;
