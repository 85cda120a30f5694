//! Attention of a ragged batch of query tokens over a paged KV cache.
//!
//! The batch holds the new tokens of many sequences back to back (`[tokens, heads, head_dim]`):
//! prefill chunks and single decode tokens alike. Each sequence's keys and values live in
//! fixed-size blocks named by its block table; the new tokens' K/V must already be written
//! (see [`crate::reshape_and_cache`]). Attention is causal: a query at position `p` sees the
//! keys at positions `0..=p` of its own sequence.
//!
//! Kernels: f32 queries over an f32 or f16 cache on the CPU ([`cpu`]), f32/f16/bf16 with
//! head_dim 64 or 128 on CUDA ([`cuda`]);
//! anything else runs [`paged_attention_reference`]. A batch's layout comes as an
//! [`AttentionMeta`], built once per step and shared by every layer, so that the CUDA path
//! uploads it once rather than once per layer.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(all(test, feature = "cuda-emu"))]
mod emu_tests;
mod meta;
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emu")))]
mod plan;
#[cfg(all(test, any(feature = "cuda", feature = "cuda-emu")))]
mod test_batches;

use candle_core::{DType, Device, Result, Tensor, D};

use cpu::CpuPagedAttention;
pub use meta::AttentionMeta;

/// Where one sequence's queries sit in the batch and where its context lives in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqAttention {
    /// Row of the sequence's first new token in the batch.
    pub query_start: usize,
    /// Number of new tokens of this sequence in the batch.
    pub query_len: usize,
    /// Tokens of context once this step's tokens are written (cached + new).
    pub context_len: usize,
    /// Cache block ids holding positions `[i * block_size, (i + 1) * block_size)`.
    pub block_table: Vec<u32>,
    /// Tokens in the sequence's prompt. The CPU kernel takes query tokens at positions below
    /// it in tiles however few a step holds, and the tokens after it (generated ones, also
    /// when a preempted sequence recomputes them) one at a time as when they were decoded, so
    /// that no token's attention, nor the greedy answer, depends on how its sequence was
    /// chunked, cached or batched.
    pub prompt_len: usize,
}

/// Uploads the batch layout that the CUDA kernels read (one host-to-device copy per forward
/// pass) now, for queries of `heads` heads over `k_cache`. Call it before the pass launches its
/// first kernel: the first attention call would otherwise make the upload in the middle of the
/// pass, and a copy from pageable host memory may wait for the work queued before it, leaving
/// the GPU idle while the host catches up. Does nothing off CUDA.
pub fn prepare_attention(meta: &AttentionMeta, heads: usize, k_cache: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::cuda::on_cuda(k_cache) && k_cache.rank() == 4 {
        return cuda::upload_meta(meta, heads, k_cache);
    }
    let _ = (meta, heads, k_cache);
    Ok(())
}

/// Causal paged attention. `q`: `[tokens, heads, head_dim]`; caches:
/// `[num_blocks, block_size, kv_heads, head_dim]`. Returns `[tokens, heads, head_dim]`.
/// `meta`'s sequences must cover the batch rows in order.
///
/// ```
/// use candela_kernels::{paged_attention, AttentionMeta, SeqAttention};
/// use candle_core::{DType, Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // One sequence decoding its 3rd token: 2 heads sharing 1 kv head, blocks of 2 tokens.
/// let k_cache = Tensor::randn(0f32, 1., (4, 2, 1, 8), &dev)?;
/// let v_cache = Tensor::randn(0f32, 1., (4, 2, 1, 8), &dev)?;
/// let meta = AttentionMeta::new(vec![SeqAttention {
///     query_start: 0,
///     query_len: 1,
///     context_len: 3,
///     block_table: vec![2, 0],
///     prompt_len: 2,
/// }]);
/// let q = Tensor::randn(0f32, 1., (1, 2, 8), &dev)?;
/// let out = paged_attention(&q, &k_cache, &v_cache, &meta, 8f32.powf(-0.5))?;
/// assert_eq!(out.dims(), &[1, 2, 8]);
/// # Ok(())
/// # }
/// ```
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::fits(q, k_cache, v_cache)? {
        return cuda::paged_attention(q, k_cache, v_cache, meta, scale);
    }
    let fast_cpu = matches!(q.device(), Device::Cpu)
        && cpu::supports(q.dim(2)?)
        && q.dtype() == DType::F32
        && matches!(k_cache.dtype(), DType::F32 | DType::F16)
        && v_cache.dtype() == k_cache.dtype();
    if fast_cpu {
        let op = CpuPagedAttention {
            seqs: meta.seqs(),
            scale,
            tier: cpu::best_tier(),
            part: cpu::PART,
            tile_all: false,
        };
        q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
    } else {
        paged_attention_reference(q, k_cache, v_cache, meta.seqs(), scale)
    }
}

/// The same computation in plain candle ops, on any device and dtype: gathers each sequence's
/// context from its blocks and runs masked softmax attention. The reference for tests and the
/// path for devices without a dedicated kernel.
pub fn paged_attention_reference(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    scale: f32,
) -> Result<Tensor> {
    let (_, heads, head_dim) = q.dims3()?;
    let (num_blocks, block_size, kv_heads, _) = k_cache.dims4()?;
    let group = heads / kv_heads;
    let flat_k = k_cache.reshape((num_blocks * block_size, kv_heads, head_dim))?;
    let flat_v = v_cache.reshape((num_blocks * block_size, kv_heads, head_dim))?;
    let mut outs = Vec::with_capacity(seqs.len());
    for s in seqs {
        let slots: Vec<u32> = (0..s.context_len)
            .map(|p| s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32)
            .collect();
        let slots = Tensor::new(slots.as_slice(), q.device())?;
        let expand = |t: &Tensor| -> Result<Tensor> {
            // [ctx, kv, d] -> [heads, ctx, d], each kv head shared by `group` query heads.
            let t = t.index_select(&slots, 0)?.to_dtype(q.dtype())?;
            let t = t
                .unsqueeze(2)?
                .expand((s.context_len, kv_heads, group, head_dim))?;
            t.reshape((s.context_len, heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k, v) = (expand(&flat_k)?, expand(&flat_v)?);
        let qs = q
            .narrow(0, s.query_start, s.query_len)?
            .transpose(0, 1)?
            .contiguous()?;
        let scores = (qs.matmul(&k.t()?)? * scale as f64)?;
        let first_pos = s.context_len - s.query_len;
        let mask: Vec<f32> = (0..s.query_len)
            .flat_map(|i| {
                (0..s.context_len).map(move |j| {
                    if j <= first_pos + i {
                        0.
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, s.query_len, s.context_len), q.device())?;
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(&mask)?;
        let probs = candle_nn_softmax(&scores)?.to_dtype(q.dtype())?;
        outs.push(probs.matmul(&v)?.transpose(0, 1)?);
    }
    Tensor::cat(&outs, 0)
}

fn candle_nn_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
