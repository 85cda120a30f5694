use std::collections::{BTreeMap, HashMap};

/// Index of a KV-cache block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// Hash of a full block's tokens chained with the hash of the block before it, so that equal
/// hashes mean equal prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

impl BlockHash {
    pub fn chain(parent: Option<BlockHash>, tokens: &[u32]) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        tokens.hash(&mut h);
        BlockHash(h.finish())
    }
}

#[derive(Debug, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block holds a full, reusable prefix block. Kept after the last owner frees
    /// the block, until the block is evicted for a new allocation.
    cached: Option<(BlockHash, Box<[u32]>)>,
    /// Position in the free list when free.
    free_key: Option<u64>,
}

/// The blocks of the KV cache: refcounts, a free list ordered by eviction priority (least
/// recently freed first) and a map from prefix hash to the block holding that prefix.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    free: BTreeMap<u64, BlockId>,
    next_free_key: u64,
    by_hash: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let mut pool = Self {
            blocks: (0..num_blocks).map(|_| Block::default()).collect(),
            free: BTreeMap::new(),
            next_free_key: 0,
            by_hash: HashMap::new(),
        };
        for i in 0..num_blocks {
            pool.push_free(BlockId(i as u32));
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    fn push_free(&mut self, id: BlockId) {
        let key = self.next_free_key;
        self.next_free_key += 1;
        self.free.insert(key, id);
        self.blocks[id.0 as usize].free_key = Some(key);
    }

    /// Takes `n` blocks for exclusive use, evicting cached prefixes in LRU order; `None` (and no
    /// change) if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.free.len() < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free.pop_first()?;
            let block = &mut self.blocks[id.0 as usize];
            block.free_key = None;
            block.ref_count = 1;
            if let Some((hash, _)) = block.cached.take() {
                self.by_hash.remove(&hash);
            }
            out.push(id);
        }
        Some(out)
    }

    /// Drops one reference to each block. Blocks are given in the order they should be evicted
    /// (callers pass a request's table tail first, so shared prefixes outlive their tails).
    pub fn release(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let block = &mut self.blocks[id.0 as usize];
            debug_assert!(block.ref_count > 0, "double free of {id:?}");
            block.ref_count = block.ref_count.saturating_sub(1);
            if block.ref_count == 0 {
                self.push_free(id);
            }
        }
    }

    /// The cached block holding exactly this prefix block, if any.
    pub fn lookup(&self, hash: BlockHash, tokens: &[u32]) -> Option<BlockId> {
        let id = *self.by_hash.get(&hash)?;
        let (_, stored) = self.blocks[id.0 as usize].cached.as_ref()?;
        (**stored == *tokens).then_some(id)
    }

    /// Takes a reference to a cached block found by [`lookup`](Self::lookup).
    pub fn acquire(&mut self, id: BlockId) {
        let block = &mut self.blocks[id.0 as usize];
        if let Some(key) = block.free_key.take() {
            self.free.remove(&key);
        }
        block.ref_count += 1;
    }

    /// Registers a block that has just been filled so later requests can reuse it. A prefix that is
    /// already cached in another block keeps that block.
    pub fn register(&mut self, id: BlockId, hash: BlockHash, tokens: &[u32]) {
        if self.by_hash.contains_key(&hash) || self.blocks[id.0 as usize].cached.is_some() {
            return;
        }
        self.blocks[id.0 as usize].cached = Some((hash, tokens.into()));
        self.by_hash.insert(hash, id);
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks[id.0 as usize].ref_count
    }

    /// Blocks holding a reusable prefix (in use or not).
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_until_empty_then_refuse_without_change() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(pool.num_free(), 1);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        pool.release(a);
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn cached_block_survives_release_until_evicted() {
        let mut pool = BlockPool::new(2);
        let ids = pool.allocate(1).unwrap();
        let h = BlockHash::chain(None, &[1, 2]);
        pool.register(ids[0], h, &[1, 2]);
        pool.release(ids.clone());
        assert_eq!(pool.lookup(h, &[1, 2]), Some(ids[0]));
        assert_eq!(
            pool.lookup(h, &[1, 3]),
            None,
            "tokens are checked, not just the hash"
        );
        // The never-used block goes first; the cached one is evicted only when needed.
        let fresh = pool.allocate(1).unwrap();
        assert_ne!(fresh[0], ids[0]);
        assert!(pool.lookup(h, &[1, 2]).is_some());
        let evicting = pool.allocate(1).unwrap();
        assert_eq!(evicting[0], ids[0]);
        assert!(pool.lookup(h, &[1, 2]).is_none());
    }

    #[test]
    fn acquire_takes_a_free_cached_block_off_the_free_list() {
        let mut pool = BlockPool::new(2);
        let ids = pool.allocate(1).unwrap();
        let h = BlockHash::chain(None, &[7]);
        pool.register(ids[0], h, &[7]);
        pool.release(ids.clone());
        assert_eq!(pool.num_free(), 2);
        pool.acquire(ids[0]);
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.ref_count(ids[0]), 1);
        pool.acquire(ids[0]);
        assert_eq!(pool.ref_count(ids[0]), 2);
        pool.release([ids[0]]);
        assert_eq!(pool.num_free(), 1);
    }

    #[test]
    fn chained_hashes_distinguish_prefixes() {
        let a = BlockHash::chain(None, &[1, 2]);
        let b = BlockHash::chain(None, &[3, 4]);
        assert_ne!(
            BlockHash::chain(Some(a), &[5, 6]),
            BlockHash::chain(Some(b), &[5, 6])
        );
    }
}
