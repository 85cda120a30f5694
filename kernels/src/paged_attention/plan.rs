//! The host side of the attention kernels' launch, shared by the CUDA launch and the kernels'
//! tests on the CPU emulator: the CTA shape, the batch layout as the kernels read it, which
//! sequences go to the tensor-core kernel, and how long contexts are split into partitions.

use candle_core::{DType, Device, Result, Tensor};

use super::SeqAttention;

/// Threads of a CTA of both kernels.
pub(super) const THREADS: u32 = 128;
/// Keys per tile of the tensor-core kernel (the CUDA-core kernel's tiles are half as long):
/// partitions are whole tiles of both.
const KEYS: usize = 64;
/// Below this many CTAs (about four per SM of an H100) long contexts are split.
const TARGET_CTAS: usize = 512;
/// The shortest partition worth a CTA of its own, in keys: one tile of the tensor-core kernel.
/// A CTA waits on about one tile's loads at a time, so at batch 1 over a 1024-key context 16
/// partitions of 64 keys (128 CTAs with 8 kv heads) take about a quarter of the time of 4 of
/// 256; the merge reads 16 partial rows where it read 4.
const MIN_PARTITION: usize = KEYS;

/// Rows (query tokens times the query heads of one kv head) of a CTA: `max_rows` in
/// cuda/attention.cu, which shared memory bounds.
pub(super) fn max_rows(dtype: DType) -> usize {
    if dtype == DType::F32 {
        16
    } else {
        32
    }
}

/// Rows of a CTA of the tensor-core prefill kernel (`MMA_ROWS` in cuda/attention.cu).
pub(super) const MMA_ROWS: usize = 64;

/// Tokens per work item of the tensor-core prefill kernel, or 0 where it does not run: f32, or
/// a query-head group that does not divide its rows.
pub(super) fn mma_tile_tokens(dtype: DType, group: usize, enabled: bool) -> usize {
    if enabled && dtype != DType::F32 && group > 0 && MMA_ROWS.is_multiple_of(group) {
        MMA_ROWS / group
    } else {
        0
    }
}

/// Whether a sequence with `query_len` new tokens goes to the tensor-core kernel: when it needs
/// more than one item of the CUDA-core kernel (`tile_tokens`) and fills at least half of a
/// tensor-core CTA's rows. Decode steps and short chunks stay on the CUDA-core kernel.
pub(super) fn takes_mma(query_len: usize, tile_tokens: usize, mma_tile_tokens: usize) -> bool {
    mma_tile_tokens > 0 && query_len > tile_tokens && 2 * query_len >= mma_tile_tokens
}

/// What a [`DeviceMeta`] was built for: rows per work item of each kernel (`mma_tile_tokens` 0:
/// no tensor-core items), cache geometry, batch rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MetaKey {
    pub(super) tile_tokens: usize,
    pub(super) mma_tile_tokens: usize,
    pub(super) block_size: usize,
    pub(super) num_blocks: usize,
    pub(super) tokens: usize,
}

/// The batch layout as the kernels read it, in one u32 tensor (one host-to-device copy): per
/// sequence `[query_start, query_len, context_len]`, then the block tables padded to
/// `[num_seqs, max_blocks]`, then per work item `[sequence, first row, tokens]` (the
/// CUDA-core kernel's items, then the tensor-core kernel's), then each row's position.
#[derive(Clone, Debug)]
pub(super) struct DeviceMeta {
    pub(super) key: MetaKey,
    pub(super) data: Tensor,
    pub(super) tables_at: usize,
    pub(super) work_at: usize,
    pub(super) mma_work_at: usize,
    pub(super) positions_at: usize,
    pub(super) num_work: usize,
    pub(super) num_mma_work: usize,
    pub(super) max_blocks: usize,
    pub(super) max_context: usize,
}

impl DeviceMeta {
    /// Checks what the kernels index with (they would read out of bounds otherwise) and uploads.
    pub(super) fn new(seqs: &[SeqAttention], key: MetaKey, device: &Device) -> Result<Self> {
        let bs = key.block_size;
        let mut rows = 0;
        for (i, s) in seqs.iter().enumerate() {
            let blocks = s.context_len.div_ceil(bs);
            if s.query_start != rows || s.query_len > s.context_len || s.block_table.len() < blocks
            {
                candle_core::bail!(
                    "paged_attention: sequence {i} ({s:?}) does not follow row {rows} or does not \
                     fit its context in blocks of {bs}"
                );
            }
            if let Some(b) = s.block_table[..blocks]
                .iter()
                .find(|&&b| b as usize >= key.num_blocks)
            {
                candle_core::bail!(
                    "paged_attention: sequence {i} names block {b} of {}",
                    key.num_blocks
                );
            }
            rows += s.query_len;
        }
        if rows != key.tokens {
            candle_core::bail!(
                "paged_attention: sequences cover {rows} rows of {}",
                key.tokens
            );
        }
        let max_context = seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
        if i32::try_from(max_context).is_err() {
            candle_core::bail!(
                "paged_attention: a context of {max_context} is past the kernels' i32 range"
            );
        }
        let max_blocks = max_context.div_ceil(bs).max(1);

        // Every value is below 2^31: rows and contexts were checked, block ids are below the
        // cache's block count.
        let mut data: Vec<u32> = Vec::new();
        for s in seqs {
            data.extend([s.query_start, s.query_len, s.context_len].map(|x| x as u32));
        }
        let tables_at = data.len();
        for s in seqs {
            let blocks = s.context_len.div_ceil(bs);
            data.extend_from_slice(&s.block_table[..blocks]);
            data.extend(std::iter::repeat_n(0, max_blocks - blocks));
        }
        let work_items = |data: &mut Vec<u32>, mma: bool| {
            let tile = if mma {
                key.mma_tile_tokens
            } else {
                key.tile_tokens
            };
            for (i, s) in seqs.iter().enumerate() {
                if takes_mma(s.query_len, key.tile_tokens, key.mma_tile_tokens) != mma {
                    continue;
                }
                // A causal tile's work grows with its position: the last tiles go first, so
                // that the long CTAs do not start at the end of the launch.
                for first in (0..s.query_len).step_by(tile).rev() {
                    let tokens = tile.min(s.query_len - first);
                    data.extend([i, s.query_start + first, tokens].map(|x| x as u32));
                }
            }
        };
        let work_at = data.len();
        work_items(&mut data, false);
        let mma_work_at = data.len();
        work_items(&mut data, true);
        let positions_at = data.len();
        let num_work = (mma_work_at - work_at) / 3;
        let num_mma_work = (positions_at - mma_work_at) / 3;
        for s in seqs {
            let first = s.context_len - s.query_len;
            data.extend((first..s.context_len).map(|p| p as u32));
        }
        let len = data.len();
        Ok(Self {
            key,
            data: Tensor::from_vec(data, len, device)?,
            tables_at,
            work_at,
            mma_work_at,
            positions_at,
            num_work,
            num_mma_work,
            max_blocks,
            max_context,
        })
    }
}

/// The launches of one attention call: grids of the CUDA-core kernel, of the tensor-core kernel
/// (`None`: not launched) and of the merge of their partitions, and the partitions, which both
/// kernels share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Launches {
    pub(super) core: Option<[u32; 3]>,
    pub(super) mma: Option<[u32; 3]>,
    pub(super) reduce: Option<[u32; 3]>,
    pub(super) part_len: usize,
    pub(super) num_parts: usize,
}

impl Launches {
    pub(super) fn new(meta: &DeviceMeta, heads: usize, kv_heads: usize) -> Self {
        let ctas = (meta.num_work + meta.num_mma_work) * kv_heads;
        let (part_len, num_parts) = partitions(ctas, meta.max_context);
        let grid =
            |items: usize| (items > 0).then_some([items as u32, kv_heads as u32, num_parts as u32]);
        Self {
            core: grid(meta.num_work),
            mma: grid(meta.num_mma_work),
            reduce: (num_parts > 1).then_some([
                meta.key.tokens as u32,
                heads.div_ceil(4) as u32,
                1,
            ]),
            part_len,
            num_parts,
        }
    }
}

/// `(partition length, partitions)` for a launch of `ctas` CTAs per partition.
fn partitions(ctas: usize, max_context: usize) -> (usize, usize) {
    let whole = (i32::MAX as usize, 1);
    if ctas >= TARGET_CTAS || max_context <= MIN_PARTITION {
        return whole;
    }
    let len = max_context
        .div_ceil(TARGET_CTAS.div_ceil(ctas))
        .next_multiple_of(KEYS)
        .max(MIN_PARTITION);
    match max_context.div_ceil(len) {
        1 => whole,
        parts => (len, parts),
    }
}
