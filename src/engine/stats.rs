use std::sync::atomic::{AtomicU64, Ordering};

/// Engine gauges and counters, written by the engine thread and read by anyone.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV-cache blocks in use, and in all.
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Wall time of the steps, and the part of it the engine thread spent before it first had
    /// to wait for the device: scheduling, building the batch and launching the forward pass,
    /// in microseconds. On a GPU, launch time close to the whole step means the step is bound
    /// by the host (launch overhead); far below it means the GPU is the bound. On the CPU the
    /// forward pass runs inside the launch, so the two are close by construction.
    pub step_micros: AtomicU64,
    pub step_launch_micros: AtomicU64,
    pub preemptions: AtomicU64,
    /// Tokens run through the model (prefill + decode), and tokens sampled.
    pub computed_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
}

impl EngineStats {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}
