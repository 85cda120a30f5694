//! Cases the kernels' tests (on a GPU and on the CPU emulator) run: batches, shapes, inputs and
//! the reference output.

use candle_core::{DType, Device, Result, Tensor};

use super::{paged_attention_reference, SeqAttention};
use crate::test_util::randn;

/// One kernel test: a dtype, a head shape, a cache block size and a batch of
/// `(query_len, context_len)` sequences (over 2 kv heads).
pub(super) struct Case<'a> {
    pub(super) dtype: DType,
    pub(super) head_dim: usize,
    pub(super) group: usize,
    pub(super) block_size: usize,
    pub(super) shape: &'a [(usize, usize)],
}

/// A case's random inputs on the device under test (unused cache slots included: the kernels
/// must not read them), and the reference output computed in f32 from the same rounded values.
pub(super) struct Inputs {
    pub(super) seqs: Vec<SeqAttention>,
    pub(super) q: Tensor,
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    pub(super) scale: f32,
    pub(super) want: Tensor,
}

impl<'a> Case<'a> {
    /// `geometry`: `(head_dim, group, block_size)`.
    pub(super) fn new(
        dtype: DType,
        (head_dim, group, block_size): (usize, usize, usize),
        shape: &'a [(usize, usize)],
    ) -> Self {
        Self {
            dtype,
            head_dim,
            group,
            block_size,
            shape,
        }
    }

    pub(super) fn inputs(&self, dev: &Device) -> Result<Inputs> {
        let kv_heads = 2;
        let heads = kv_heads * self.group;
        let (seqs, num_blocks) = batch(self.shape, self.block_size);
        let tokens = seqs.iter().map(|s| s.query_len).sum();
        let cache = [num_blocks, self.block_size, kv_heads, self.head_dim];
        let (q, q_ref) = randn(&[tokens, heads, self.head_dim], self.dtype, dev)?;
        let (k, k_ref) = randn(&cache, self.dtype, dev)?;
        let (v, v_ref) = randn(&cache, self.dtype, dev)?;
        let scale = (self.head_dim as f32).powf(-0.5);
        let want = paged_attention_reference(&q_ref, &k_ref, &v_ref, &seqs, scale)?;
        Ok(Inputs {
            seqs,
            q,
            k,
            v,
            scale,
            want,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "head_dim {} group {} block {} batch {:?}",
            self.head_dim, self.group, self.block_size, self.shape
        )
    }
}

/// Every case of `dtypes` x `geometries` (`(head_dim, group, block_size)`) x `shapes`.
pub(super) fn cases<'a>(
    dtypes: &'a [DType],
    geometries: &'a [(usize, usize, usize)],
    shapes: &'a [&'a [(usize, usize)]],
) -> impl Iterator<Item = Case<'a>> + 'a {
    dtypes.iter().flat_map(move |&dtype| {
        geometries.iter().flat_map(move |&geometry| {
            shapes
                .iter()
                .map(move |&shape| Case::new(dtype, geometry, shape))
        })
    })
}

/// `(head_dim, group, block_size)` of the long-prompt tests: every group size that fills the
/// tensor-core kernel's rows differently, up to groups whose decode steps fill a CUDA-core item
/// alone (32 in f16/bf16).
pub(super) const PROMPT_GEOMETRIES: [(usize, usize, usize); 6] = [
    (128, 4, 16),
    (64, 1, 32),
    (128, 2, 16),
    (64, 8, 32),
    (64, 16, 16),
    (64, 32, 32),
];

/// A batch of `(query_len, context_len)` sequences, back to back, with block tables drawn from
/// a shuffled pool so that blocks are out of order.
pub(super) fn batch(shape: &[(usize, usize)], block_size: usize) -> (Vec<SeqAttention>, usize) {
    let blocks: usize = shape.iter().map(|&(_, c)| c.div_ceil(block_size)).sum();
    // A fixed permutation of 0..pool (pool coprime to 7), plus unused blocks at the end.
    let pool = (blocks + 3).next_multiple_of(7) + 1;
    let mut ids = (0..pool).map(|i| (i * 7 % pool) as u32);
    let mut row = 0;
    let seqs = shape
        .iter()
        .map(|&(query_len, context_len)| {
            let s = SeqAttention {
                query_start: row,
                query_len,
                context_len,
                block_table: ids
                    .by_ref()
                    .take(context_len.div_ceil(block_size))
                    .collect(),
                prompt_len: if query_len > 1 { context_len } else { 0 },
            };
            row += query_len;
            s
        })
        .collect();
    (seqs, pool)
}

/// Decode steps; prefill chunks over cached prefixes and fresh prompts; both mixed. Contexts
/// stop short of, at and past block boundaries.
pub(super) const BATCHES: [&[(usize, usize)]; 3] = [
    &[(1, 1), (1, 15), (1, 16), (1, 17), (1, 33), (1, 100)],
    &[(20, 50), (33, 33), (31, 64), (5, 5)],
    &[(1, 40), (17, 17), (1, 1), (40, 97), (1, 32)],
];
