//! Compute kernels for candela, exposed as functions over candle tensors.
//!
//! Each kernel has a fast implementation (a candle custom op: CPU and, with the `cuda` feature,
//! CUDA kernels compiled from `cuda/*.cu`) and a plain-candle path that runs on any device; the
//! tests check one against the other. Inputs the fast implementations do not take (another
//! device, dtype or shape) go the plain way, so the engine is device-generic.

mod activation;
mod cache;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
#[cfg(all(test, feature = "cuda-emu"))]
mod emu;
mod isa;
mod math;
mod matmul;
mod norm;
mod paged_attention;
mod quant_matmul;
mod rotary;
mod sampling;
#[cfg(all(test, any(feature = "cuda", feature = "cuda-emu")))]
mod test_util;

pub use activation::{silu_and_mul, silu_mul};
pub use cache::reshape_and_cache;
pub use device::{cuda_device, cuda_if_available, free_memory, keep_freed_memory};
pub use math::exp_nonpositive;
pub use matmul::{linear, linear_silu_and_mul, SKINNY_MAX_ROWS};
pub use norm::{add_rms_norm, rms_norm};
pub use paged_attention::{
    paged_attention, paged_attention_reference, prepare_attention, AttentionMeta, SeqAttention,
};
pub use quant_matmul::{
    has_vnni as quant_has_vnni, QMatMul as CpuQMatMul, QMatrix, BLOCK as QUANT_BLOCK,
};
pub use rotary::{rotary_and_cache, rotary_embedding, RopeLayout};
pub use sampling::{argmax, sample, sample_row, RowSampling};
