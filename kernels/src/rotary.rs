//! Rotary position embedding (RoPE) of queries and keys.
//!
//! Every token brings its own cos/sin row (`[tokens, head_dim / 2]`, f32, gathered from the
//! model's tables at the token's position), so a ragged batch needs nothing more. On CUDA one
//! kernel rotates q and k together in f32; elsewhere `candle_nn::rotary_emb`.

use candle_core::{Result, Tensor};

/// Which dims of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x[i], x[i + head_dim / 2])`: Hugging Face checkpoints (`rotary_emb::rope`).
    HalfSplit,
    /// `(x[2i], x[2i + 1])`: GGUF files, whose Q/K weights are permuted for it
    /// (`rotary_emb::rope_i`).
    Interleaved,
}

/// Rotates `q` (`[tokens, heads, head_dim]`) and `k` (`[tokens, kv_heads, head_dim]`) by each
/// token's angles, `cos` and `sin` (`[tokens, head_dim / 2]`, f32). Returns the rotated `(q, k)`.
///
/// ```
/// use candela_kernels::{rotary_embedding, RopeLayout};
/// use candle_core::{DType, Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1., (3, 4, 8), &dev)?;
/// let k = Tensor::randn(0f32, 1., (3, 2, 8), &dev)?;
/// // Three tokens at position 0: no rotation.
/// let cos = Tensor::ones((3, 4), DType::F32, &dev)?;
/// let sin = Tensor::zeros((3, 4), DType::F32, &dev)?;
/// let (q2, _) = rotary_embedding(&q, &k, &cos, &sin, RopeLayout::HalfSplit)?;
/// assert_eq!(q2.to_vec3::<f32>()?, q.to_vec3::<f32>()?);
/// # Ok(())
/// # }
/// ```
pub fn rotary_embedding(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
) -> Result<(Tensor, Tensor)> {
    let (tokens, _, head_dim) = q.dims3()?;
    let (k_tokens, _, k_head_dim) = k.dims3()?;
    if k_tokens != tokens
        || k_head_dim != head_dim
        || !head_dim.is_multiple_of(2)
        || cos.dims2()? != (tokens, head_dim / 2)
        || sin.dims2()? != (tokens, head_dim / 2)
    {
        candle_core::bail!(
            "rotary_embedding: q {:?}, k {:?}, cos {:?}, sin {:?}",
            q.shape(),
            k.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    #[cfg(feature = "cuda")]
    if cuda::fits(q, k, cos, sin) {
        return cuda::rotary_embedding(q, k, cos, sin, layout);
    }
    let rotate = |x: &Tensor| -> Result<Tensor> {
        // candle's rope takes [batch, heads, seq, dim] and per-batch [batch, seq, dim / 2] tables:
        // each token is a batch of one position.
        let (tokens, heads, dim) = x.dims3()?;
        let x = x.contiguous()?.reshape((tokens, heads, 1, dim))?;
        let table = |t: &Tensor| t.to_dtype(x.dtype())?.reshape((tokens, 1, dim / 2));
        let (cos, sin) = (table(cos)?, table(sin)?);
        let rotated = match layout {
            RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
        };
        rotated.reshape((tokens, heads, dim))
    };
    Ok((rotate(q)?, rotate(k)?))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaDType, WrapErr};
    use candle_core::{DType, Result, Tensor};

    use super::RopeLayout;
    use crate::cuda::{self as cu, dispatch_float};

    /// A thread rotates a 16-byte pack (of each half, in the half-split layout).
    pub(super) fn fits(q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
        let half = q.dims().last().map_or(0, |d| d / 2);
        let on = |t: &Tensor| t.device().same_device(q.device());
        cu::on_cuda(q)
            && q.elem_count() > 0
            && k.elem_count() > 0
            && k.dtype() == q.dtype()
            && cos.dtype() == DType::F32
            && sin.dtype() == DType::F32
            && on(k)
            && on(cos)
            && on(sin)
            && half.is_multiple_of(cu::pack_len(q.dtype()))
    }

    pub(super) fn rotary_embedding(
        q: &Tensor,
        k: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: RopeLayout,
    ) -> Result<(Tensor, Tensor)> {
        let (q, k) = (cu::rows(q)?, cu::rows(k)?);
        let (cos, sin) = (cu::packed(cos)?, cu::packed(sin)?);
        dispatch_float!(q.dtype(), launch(&q, &k, &cos, &sin, layout))
    }

    /// A CTA per token over all its heads, q's then k's.
    fn launch<T: CudaDType + DeviceRepr>(
        q: &Tensor,
        k: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: RopeLayout,
    ) -> Result<(Tensor, Tensor)> {
        let dev = q.device().as_cuda_device()?;
        let (tokens, heads, head_dim) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let ty = cu::type_name(q.dtype()).expect("checked by fits");
        let name = match layout {
            RopeLayout::HalfSplit => format!("rotary_{ty}"),
            RopeLayout::Interleaved => format!("rotary_interleaved_{ty}"),
        };
        let func = cu::ROTARY.function(dev, &name)?;
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (c_storage, c_layout) = cos.storage_and_layout();
        let (s_storage, s_layout) = sin.storage_and_layout();
        let q_view = cu::view::<T>(&q_storage, q_layout)?;
        let k_view = cu::view::<T>(&k_storage, k_layout)?;
        let cos_view = cu::view::<f32>(&c_storage, c_layout)?;
        let sin_view = cu::view::<f32>(&s_storage, s_layout)?;
        // SAFETY: the kernel writes every element of both.
        let (mut q_out, mut k_out) = unsafe {
            (
                dev.alloc::<T>(q.elem_count())?,
                dev.alloc::<T>(k.elem_count())?,
            )
        };
        // Units of work per token: packs of all heads (pairs of packs when half-split).
        let units = (heads + kv_heads) * head_dim / cu::pack_len(q.dtype());
        let units = match layout {
            RopeLayout::HalfSplit => units / 2,
            RopeLayout::Interleaved => units,
        };
        let cfg = LaunchConfig {
            grid_dim: (cu::int(tokens)? as u32, 1, 1),
            block_dim: (units.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads_i, kv_heads_i, head_dim_i) =
            (cu::int(heads)?, cu::int(kv_heads)?, cu::int(head_dim)?);
        let stride = |t: &Tensor| cu::int(cu::row_stride(t).expect("cu::rows gave rows"));
        let (q_stride, k_stride) = (stride(q)?, stride(k)?);
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        args.arg(&mut q_out)
            .arg(&mut k_out)
            .arg(&q_view)
            .arg(&k_view);
        args.arg(&cos_view).arg(&sin_view);
        args.arg(&heads_i).arg(&kv_heads_i).arg(&head_dim_i);
        args.arg(&q_stride).arg(&k_stride);
        // SAFETY: argument types and order match `rotary_*` in cuda/rotary.cu; the strides come
        // from q's and k's layouts.
        unsafe { args.launch(cfg) }.w()?;
        Ok((
            cu::tensor(q_out, dev, (tokens, heads, head_dim)),
            cu::tensor(k_out, dev, (tokens, kv_heads, head_dim)),
        ))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::{rotary_embedding, RopeLayout};
    use crate::test_util::{assert_close, cuda_device, randn, DTYPES};

    /// Llama's tables at scattered positions: `[tokens, head_dim / 2]` each.
    fn tables(positions: &[u32], head_dim: usize) -> Result<(Tensor, Tensor)> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1. / 10_000f32.powf(2. * i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), &Device::Cpu)?;
        let pos = Tensor::new(positions, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((positions.len(), 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    #[test]
    fn both_layouts_match_candle() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let positions = [0u32, 1, 17, 5, 4095, 2];
        let tokens = positions.len();
        for dtype in DTYPES {
            for head_dim in [64, 128] {
                let (cos, sin) = tables(&positions, head_dim)?;
                let (q, q_ref) = randn(&[tokens, 8, head_dim], dtype, &dev)?;
                let (k, k_ref) = randn(&[tokens, 2, head_dim], dtype, &dev)?;
                // q and k also as views of one fused row per token, read in place.
                let fused = Tensor::cat(&[&q, &k, &k], 1)?;
                let (q_view, k_view) = (fused.narrow(1, 0, 8)?, fused.narrow(1, 8, 2)?);
                for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                    let (q_want, k_want) = rotary_embedding(&q_ref, &k_ref, &cos, &sin, layout)?;
                    let (cos, sin) = (cos.to_device(&dev)?, sin.to_device(&dev)?);
                    for (q, k) in [(&q, &k), (&q_view, &k_view)] {
                        let (q_got, k_got) = rotary_embedding(q, k, &cos, &sin, layout)?;
                        let what = format!("{layout:?} head_dim {head_dim} {:?}", q.stride());
                        assert_close(&q_got, &q_want, dtype, &what)?;
                        assert_close(&k_got, &k_want, dtype, &what)?;
                    }
                }
            }
        }
        Ok(())
    }
}
