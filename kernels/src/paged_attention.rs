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
        let dims = Dims {
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale: self.scale,
        };
        let attend: fn(&Dims, &[f32], &[f32], &[f32], &[u32], usize, &mut [f32]) = {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    |d, q, k, v, t, p, o| unsafe { attend_token_avx2(d, q, k, v, t, p, o) }
                } else {
                    attend_token
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                attend_token
            }
        };
        out.par_chunks_mut(row)
            .enumerate()
            .for_each(|(t, out_row)| {
                if let Some((si, pos)) = owner[t] {
                    attend(
                        &dims,
                        &q[t * row..][..row],
                        k,
                        v,
                        &self.seqs[si].block_table,
                        pos,
                        out_row,
                    );
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((tokens, heads, head_dim))))
    }
}

struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    scale: f32,
}

/// The same code compiled with AVX2 and FMA enabled, for CPUs that have them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_token_avx2(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    table: &[u32],
    pos: usize,
    out: &mut [f32],
) {
    attend_token(d, q, k, v, table, pos, out)
}

/// One query token (all heads) over positions `0..=pos` of its sequence, walking the block table
/// block by block.
#[inline(always)]
fn attend_token(
    d: &Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    table: &[u32],
    pos: usize,
    out: &mut [f32],
) {
    let (hd, bs) = (d.head_dim, d.block_size);
    let group = d.heads / d.kv_heads;
    let mut scores = vec![0f32; pos + 1];
    // Offset of position p's row for kv head 0; kv head h adds h * head_dim.
    let base = |p: usize| ((table[p / bs] as usize * bs + p % bs) * d.kv_heads) * hd;
    let bases: Vec<usize> = (0..=pos).map(base).collect();
    for h in 0..d.heads {
        let kvh = h / group;
        let qv = &q[h * hd..][..hd];
        let mut max = f32::NEG_INFINITY;
        for (s, &b) in scores.iter_mut().zip(&bases) {
            *s = dot(qv, &k[b + kvh * hd..][..hd]) * d.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let o = &mut out[h * hd..][..hd];
        let inv = 1.0 / sum;
        for (s, &b) in scores.iter().zip(&bases) {
            let w = s * inv;
            for (o, x) in o.iter_mut().zip(&v[b + kvh * hd..][..hd]) {
                *o += w * x;
            }
        }
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("paged-attention: non-contiguous input".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// Dot product with eight independent accumulators so that the compiler vectorises it.
#[inline(always)]
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
