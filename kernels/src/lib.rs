//! Compute kernels for candela, exposed as functions over candle tensors.
//!
//! Each kernel has a fast implementation (a candle custom op) and a plain-candle reference that
//! runs on any device; the tests check one against the other. Devices without a fast
//! implementation yet fall back to the reference, so the engine is device-generic.

mod cache;
mod paged_attention;
mod quant_matmul;

pub use cache::reshape_and_cache;
pub use paged_attention::{paged_attention, paged_attention_reference, SeqAttention};
pub use quant_matmul::{QMatMul as CpuQMatMul, QMatrix, BLOCK as QUANT_BLOCK};
