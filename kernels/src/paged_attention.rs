//! Attention of a ragged batch of query tokens over a paged KV cache.
//!
//! The batch holds the new tokens of many sequences back to back (`[tokens, heads, head_dim]`):
//! prefill chunks and single decode tokens alike. Each sequence's keys and values live in
//! fixed-size blocks named by its block table; the new tokens' K/V must already be written
//! (see [`crate::reshape_and_cache`]). Attention is causal: a query at position `p` sees the
//! keys at positions `0..=p` of its own sequence.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

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
}

/// Causal paged attention. `q`: `[tokens, heads, head_dim]`; caches:
/// `[num_blocks, block_size, kv_heads, head_dim]`. Returns `[tokens, heads, head_dim]`.
/// `seqs` must cover the batch rows in order.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    seqs: &[SeqAttention],
    scale: f32,
) -> Result<Tensor> {
    let fast_cpu = matches!(q.device(), Device::Cpu)
        && q.dtype() == DType::F32
        && k_cache.dtype() == DType::F32
        && v_cache.dtype() == DType::F32;
    if fast_cpu {
        let op = CpuPagedAttention { seqs, scale };
        q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)
    } else {
        paged_attention_reference(q, k_cache, v_cache, seqs, scale)
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

struct CpuPagedAttention<'a> {
    seqs: &'a [SeqAttention],
    scale: f32,
}

impl CustomOp3 for CpuPagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, heads, head_dim) = q_l.shape().dims3()?;
        let (_, block_size, kv_heads, _) = k_l.shape().dims4()?;
        let (q, k, v) = (
            contiguous_f32(q, q_l)?,
            contiguous_f32(k, k_l)?,
            contiguous_f32(v, v_l)?,
        );
        let group = heads / kv_heads;
        let row = heads * head_dim;
        // Each batch row -> (its sequence, its position).
        let mut owner = vec![None; tokens];
        for (si, s) in self.seqs.iter().enumerate() {
            let first_pos = s.context_len - s.query_len;
            for i in 0..s.query_len {
                owner[s.query_start + i] = Some((si, first_pos + i));
            }
        }
        let mut out = vec![0f32; tokens * row];
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(t, out_row)| {
                let Some((si, pos)) = owner[t] else { return };
                let table = &self.seqs[si].block_table;
                let mut scores = vec![0f32; pos + 1];
                let kv_offset = |p: usize, kvh: usize| {
                    let slot = table[p / block_size] as usize * block_size + p % block_size;
                    (slot * kv_heads + kvh) * head_dim
                };
                for h in 0..heads {
                    let kvh = h / group;
                    let qv = &q[t * row + h * head_dim..][..head_dim];
                    let mut max = f32::NEG_INFINITY;
                    for (p, s) in scores.iter_mut().enumerate() {
                        *s = dot(qv, &k[kv_offset(p, kvh)..][..head_dim]) * self.scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut out_row[h * head_dim..][..head_dim];
                    for (p, s) in scores.iter().enumerate() {
                        let w = s / sum;
                        for (o, x) in o.iter_mut().zip(&v[kv_offset(p, kvh)..][..head_dim]) {
                            *o += w * x;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((tokens, heads, head_dim))))
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("paged-attention: non-contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Dot product with eight independent accumulators so that the compiler vectorises it.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reshape_and_cache;

    /// Two sequences, one mid-prefill over a cached prefix and one decoding, GQA 4:2, blocks out of order.
    #[test]
    fn cpu_kernel_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv_heads, d, bs, nb) = (4, 2, 16, 4, 8);
        let k_cache = Tensor::zeros((nb, bs, kv_heads, d), DType::F32, &dev)?;
        let v_cache = Tensor::zeros((nb, bs, kv_heads, d), DType::F32, &dev)?;
        // Fill the caches with a full history for both sequences.
        let tables = [vec![5u32, 1, 3], vec![2u32, 7]];
        let lens = [11usize, 6];
        for (table, &len) in tables.iter().zip(&lens) {
            let slots: Vec<u32> = (0..len)
                .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                .collect();
            let k = Tensor::randn(0f32, 1., (len, kv_heads, d), &dev)?;
            let v = Tensor::randn(0f32, 1., (len, kv_heads, d), &dev)?;
            reshape_and_cache(
                &k,
                &v,
                &k_cache,
                &v_cache,
                &Tensor::new(slots.as_slice(), &dev)?,
            )?;
        }
        let seqs = vec![
            SeqAttention {
                query_start: 0,
                query_len: 5,
                context_len: 11,
                block_table: tables[0].clone(),
            },
            SeqAttention {
                query_start: 5,
                query_len: 1,
                context_len: 6,
                block_table: tables[1].clone(),
            },
        ];
        let q = Tensor::randn(0f32, 1., (6, heads, d), &dev)?;
        let scale = 1. / (d as f32).sqrt();
        let fast = paged_attention(&q, &k_cache, &v_cache, &seqs, scale)?;
        let reference = paged_attention_reference(&q, &k_cache, &v_cache, &seqs, scale)?;
        let diff = (fast - reference)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max abs diff {diff}");
        Ok(())
    }
}
