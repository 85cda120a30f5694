//! Paged KV-cache bookkeeping: which block holds which tokens of which request.
//!
//! Two layers (the tensors themselves belong to the runner): [`BlockPool`] owns block ids,
//! refcounts, the free list in eviction order and the prefix-hash map; [`KvCacheManager`] keeps
//! each request's block table and turns token counts into allocations and prefix-cache hits.

mod block_pool;
mod manager;

pub use block_pool::{BlockHash, BlockId, BlockPool};
pub use manager::KvCacheManager;
