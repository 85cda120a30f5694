//! Batches the kernels' tests (on a GPU and on the CPU emulator) run over.

use super::SeqAttention;

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
