use std::collections::HashMap;

use super::{BlockHash, BlockId, BlockPool};
use crate::ids::{RequestId, TokenId};

#[derive(Debug, Default)]
struct Table {
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks already registered for reuse.
    hashes: Vec<BlockHash>,
}

/// Per-request block tables over a [`BlockPool`], with prefix caching.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<RequestId, Table>,
    /// Prompt tokens looked up in the prefix cache, and how many were found.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
            prefix_queried_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Fraction of blocks in use by running requests.
    pub fn usage(&self) -> f64 {
        1. - self.pool.num_free() as f64 / self.pool.num_blocks().max(1) as f64
    }

    pub fn block_table(&self, id: RequestId) -> &[BlockId] {
        self.tables
            .get(&id)
            .map(|t| t.blocks.as_slice())
            .unwrap_or(&[])
    }

    /// Longest run of cached full blocks that starts `tokens`. At least one token is always left
    /// to compute, since the step that computes it produces the next token's logits.
    pub fn cached_prefix(&mut self, tokens: &[TokenId]) -> Vec<BlockId> {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        let mut hits = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = BlockHash::chain(parent, chunk);
            match self.pool.lookup(hash, chunk) {
                Some(id) => hits.push(id),
                None => break,
            }
            parent = Some(hash);
        }
        self.prefix_queried_tokens += tokens.len() as u64;
        self.prefix_hit_tokens += (hits.len() * self.block_size) as u64;
        hits
    }

    /// Makes room for `total_tokens` tokens of request `id`. A request new to the cache first takes
    /// the `prefix` blocks found by [`cached_prefix`](Self::cached_prefix). Returns false, changing
    /// nothing, when the pool has too few free blocks.
    pub fn allocate(&mut self, id: RequestId, total_tokens: usize, prefix: &[BlockId]) -> bool {
        let held = self.tables.get(&id).map_or(0, |t| t.blocks.len());
        let new_table = held == 0;
        let have = if new_table { prefix.len() } else { held };
        let need = total_tokens.div_ceil(self.block_size).saturating_sub(have);
        // Free cached blocks that the prefix would take count as free but cannot be allocated too.
        let prefix_from_free = if new_table {
            prefix
                .iter()
                .filter(|&&b| self.pool.ref_count(b) == 0)
                .count()
        } else {
            0
        };
        if need + prefix_from_free > self.pool.num_free() {
            return false;
        }
        let table = self.tables.entry(id).or_default();
        if new_table {
            for &b in prefix {
                self.pool.acquire(b);
            }
            table.blocks.extend_from_slice(prefix);
        }
        let Some(fresh) = self.pool.allocate(need) else {
            unreachable!("free block count checked above")
        };
        table.blocks.extend(fresh);
        true
    }

    /// Registers the full blocks among the first `num_computed` tokens for reuse by later requests.
    pub fn commit(&mut self, id: RequestId, tokens: &[TokenId], num_computed: usize) {
        let Some(table) = self.tables.get_mut(&id) else {
            return;
        };
        let full = (num_computed / self.block_size).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = BlockHash::chain(table.hashes.last().copied(), chunk);
            self.pool.register(table.blocks[i], hash, chunk);
            table.hashes.push(hash);
        }
    }

    /// Releases all of a request's blocks (its tail first, so shared prefixes are evicted last).
    pub fn free(&mut self, id: RequestId) {
        if let Some(table) = self.tables.remove(&id) {
            self.pool.release(table.blocks.into_iter().rev());
        }
    }

    /// Checks that each block's refcount equals the number of tables holding it.
    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut counts: HashMap<BlockId, u32> = HashMap::new();
        for t in self.tables.values() {
            for &b in &t.blocks {
                *counts.entry(b).or_default() += 1;
            }
        }
        for i in 0..self.pool.num_blocks() {
            let b = BlockId(i as u32);
            assert_eq!(
                self.pool.ref_count(b),
                counts.get(&b).copied().unwrap_or(0),
                "refcount of {b:?}"
            );
        }
        let in_use = counts.len();
        assert_eq!(
            in_use + self.pool.num_free(),
            self.pool.num_blocks(),
            "blocks lost or double counted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_request_with_same_prefix_reuses_blocks() {
        let mut kv = KvCacheManager::new(16, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let a = RequestId(1);
        assert!(kv.cached_prefix(&prompt).is_empty());
        assert!(kv.allocate(a, 10, &[]));
        kv.commit(a, &prompt, 10);
        let mut other = prompt.clone();
        other.extend([99, 98]);
        let hit = kv.cached_prefix(&other);
        assert_eq!(hit.len(), 2, "two full blocks of 4 are shared");
        assert_eq!(hit, kv.block_table(a)[..2]);
        let b = RequestId(2);
        assert!(kv.allocate(b, other.len(), &hit));
        assert_eq!(kv.block_table(b).len(), 3);
        kv.check_invariants();
        kv.free(a);
        kv.free(b);
        kv.check_invariants();
        assert_eq!(kv.num_free_blocks(), 16);
        // Still cached after both finished.
        assert_eq!(kv.cached_prefix(&other).len(), 2);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_its_last_token() {
        let mut kv = KvCacheManager::new(8, 4);
        let prompt: Vec<u32> = (0..8).collect();
        assert!(kv.allocate(RequestId(1), 8, &[]));
        kv.commit(RequestId(1), &prompt, 8);
        assert_eq!(kv.cached_prefix(&prompt).len(), 1);
    }

    #[test]
    fn allocation_failure_changes_nothing() {
        let mut kv = KvCacheManager::new(3, 4);
        assert!(kv.allocate(RequestId(1), 8, &[]));
        assert!(!kv.allocate(RequestId(2), 8, &[]));
        assert!(kv.block_table(RequestId(2)).is_empty());
        assert_eq!(kv.num_free_blocks(), 1);
        kv.check_invariants();
    }
}
