//! Rotary position embedding (RoPE) of queries and keys.
//!
//! Every token brings its own cos/sin row (`[tokens, head_dim / 2]`, f32, gathered from the
//! model's tables at the token's position), so a ragged batch needs nothing more. On CUDA one
//! kernel rotates q and k together in f32 (and writes the cache, in [`rotary_and_cache`]); on
//! the CPU [`rotary_and_cache`] is one pass over f32 rows (`cpu.rs`); elsewhere
//! `candle_nn::rotary_emb`.

use candle_core::{Result, Tensor};

mod cpu;

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
    check_shapes("rotary_embedding", q, k, cos, sin)?;
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

/// Refuses q, k, cos and sin that do not describe the same tokens and heads of one size.
fn check_shapes(op: &str, q: &Tensor, k: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (tokens, _, head_dim) = q.dims3()?;
    let (k_tokens, _, k_head_dim) = k.dims3()?;
    if k_tokens != tokens
        || k_head_dim != head_dim
        || !head_dim.is_multiple_of(2)
        || cos.dims2()? != (tokens, head_dim / 2)
        || sin.dims2()? != (tokens, head_dim / 2)
    {
        candle_core::bail!(
            "{op}: q {:?}, k {:?}, cos {:?}, sin {:?}",
            q.shape(),
            k.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    Ok(())
}

/// Rotates `q` and `k` as [`rotary_embedding`] does and writes the rotated `k` and `v`
/// (`[tokens, kv_heads, head_dim]`) into their cache slots as [`crate::reshape_and_cache`]
/// does; returns the rotated `q`. On CUDA one launch does all of it, the keys going straight
/// from registers to the cache (a decode step otherwise spends two more launches a layer).
#[allow(clippy::too_many_arguments)]
pub fn rotary_and_cache(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &Tensor,
) -> Result<Tensor> {
    check_shapes("rotary_and_cache", q, k, cos, sin)?;
    if v.dims() != k.dims() || v_cache.dims() != k_cache.dims() {
        candle_core::bail!(
            "rotary_and_cache: k {:?}, v {:?}, k_cache {:?}, v_cache {:?}",
            k.shape(),
            v.shape(),
            k_cache.shape(),
            v_cache.shape()
        );
    }
    #[cfg(feature = "cuda")]
    if cuda::fused_fits(q, k, v, cos, sin, k_cache, v_cache, slots) {
        return cuda::rotary_and_cache(q, k, v, cos, sin, layout, k_cache, v_cache, slots);
    }
    if let Some(rows) = cpu::Rows::of(q, k, v, cos, sin, k_cache, v_cache, slots) {
        return rows.rotate_and_cache(layout, k_cache, v_cache);
    }
    let (q, k) = rotary_embedding(q, k, cos, sin, layout)?;
    crate::reshape_and_cache(&k, v, k_cache, v_cache, slots)?;
    Ok(q)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda::CudaDType;
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

    /// The kernel for `layout` and q's dtype, plain or writing the caches.
    fn function(q: &Tensor, layout: RopeLayout, cached: bool) -> Result<cu::Kernel> {
        let ty = cu::type_name(q.dtype()).expect("checked by fits");
        let layout = match layout {
            RopeLayout::HalfSplit => "",
            RopeLayout::Interleaved => "_interleaved",
        };
        let cache = if cached { "_cache" } else { "" };
        let dev = q.device().as_cuda_device()?;
        cu::ROTARY.function(dev, &format!("rotary{layout}{cache}_{ty}"))
    }

    /// A CTA per token, a thread per unit of its work: a pack of one head of q or k (a pair of
    /// packs when half-split), at most 256 threads.
    fn config(q: &Tensor, kv_heads: usize, layout: RopeLayout) -> Result<LaunchConfig> {
        let (tokens, heads, head_dim) = q.dims3()?;
        let units = (heads + kv_heads) * head_dim / cu::pack_len(q.dtype());
        let units = match layout {
            RopeLayout::HalfSplit => units / 2,
            RopeLayout::Interleaved => units,
        };
        Ok(LaunchConfig {
            grid_dim: (cu::int(tokens)? as u32, 1, 1),
            block_dim: (units.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        })
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
        let func = function(q, layout, false)?;
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
        let cfg = config(q, kv_heads, layout)?;
        let (heads_i, kv_heads_i, head_dim_i) =
            (cu::int(heads)?, cu::int(kv_heads)?, cu::int(head_dim)?);
        let stride = |t: &Tensor| cu::int(cu::row_stride(t).expect("cu::rows gave rows"));
        let (q_stride, k_stride) = (stride(q)?, stride(k)?);
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut q_out)
            .arg(&mut k_out)
            .arg(&q_view)
            .arg(&k_view);
        args.arg(&cos_view).arg(&sin_view);
        args.arg(&heads_i).arg(&kv_heads_i).arg(&head_dim_i);
        args.arg(&q_stride).arg(&k_stride);
        // SAFETY: argument types and order match `rotary_*` in cuda/rotary.cu; the strides come
        // from q's and k's layouts.
        unsafe { args.launch(cfg) }?;
        Ok((
            cu::tensor(q_out, dev, (tokens, heads, head_dim)),
            cu::tensor(k_out, dev, (tokens, kv_heads, head_dim)),
        ))
    }

    /// The fused kernel takes what both kernels take, with the caches in q's dtype and shaped
    /// for k and v.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_fits(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slots: &Tensor,
    ) -> bool {
        // A cache is `[blocks, block_size, kv_heads, head_dim]`, k and v `[tokens, kv_heads,
        // head_dim]`.
        let holds_rows = |cache: &Tensor| cache.dims().get(2..) == k.dims().get(1..);
        fits(q, k, cos, sin)
            && crate::cache::fits_cuda(k_cache, slots)
            && crate::cache::fits_cuda(v_cache, slots)
            && [v.dtype(), k_cache.dtype(), v_cache.dtype()]
                .iter()
                .all(|&d| d == q.dtype())
            && v.dims() == k.dims()
            && holds_rows(k_cache)
            && holds_rows(v_cache)
            && slots.dims() == [k.dim(0).unwrap_or(0)]
            && v.device().same_device(q.device())
    }

    /// A CTA per token: q's heads and k's rotated, k's and v's rows written to the token's slot.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rotary_and_cache(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: RopeLayout,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slots: &Tensor,
    ) -> Result<Tensor> {
        let (q, k, v) = (cu::rows(q)?, cu::rows(k)?, cu::rows(v)?);
        let (cos, sin, slots) = (cu::packed(cos)?, cu::packed(sin)?, slots.contiguous()?);
        dispatch_float!(
            q.dtype(),
            launch_fused(&q, &k, &v, &cos, &sin, layout, k_cache, v_cache, &slots)
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_fused<T: CudaDType + DeviceRepr>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layout: RopeLayout,
        k_cache: &Tensor,
        v_cache: &Tensor,
        slots: &Tensor,
    ) -> Result<Tensor> {
        let dev = q.device().as_cuda_device()?;
        let (tokens, heads, head_dim) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let func = function(q, layout, true)?;
        let ((qs, ql), (ks, kl)) = (q.storage_and_layout(), k.storage_and_layout());
        let (vs, vl) = v.storage_and_layout();
        let ((cs, cl), (ss, sl)) = (cos.storage_and_layout(), sin.storage_and_layout());
        let (slot_s, slot_l) = slots.storage_and_layout();
        let ((kcs, kcl), (vcs, vcl)) = (k_cache.storage_and_layout(), v_cache.storage_and_layout());
        let (q_view, k_view, v_view) = (
            cu::view::<T>(&qs, ql)?,
            cu::view::<T>(&ks, kl)?,
            cu::view::<T>(&vs, vl)?,
        );
        let (cos_view, sin_view) = (cu::view::<f32>(&cs, cl)?, cu::view::<f32>(&ss, sl)?);
        let slot_view = cu::view::<u32>(&slot_s, slot_l)?;
        // The caches are written through views of their storage: they are the engine's own,
        // touched only by kernels on the device's one stream (see `cuda_device`, which turns
        // cudarc's cross-stream event tracking off), and never by the host while a step runs.
        let (k_cache_view, v_cache_view) = (cu::view::<T>(&kcs, kcl)?, cu::view::<T>(&vcs, vcl)?);
        // SAFETY: the kernel writes every element of q_out.
        let mut q_out = unsafe { dev.alloc::<T>(q.elem_count())? };
        let cfg = config(q, kv_heads, layout)?;
        let row_len = kv_heads * head_dim;
        // Every u32 slot is below a count past u32::MAX.
        let num_slots = u32::try_from(k_cache.elem_count() / row_len).unwrap_or(u32::MAX);
        let (heads_i, kv_heads_i, head_dim_i) =
            (cu::int(heads)?, cu::int(kv_heads)?, cu::int(head_dim)?);
        let stride = |t: &Tensor| cu::int(cu::row_stride(t).expect("cu::rows gave rows"));
        let (q_stride, k_stride, v_stride) = (stride(q)?, stride(k)?, stride(v)?);
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut q_out).arg(&k_cache_view).arg(&v_cache_view);
        args.arg(&q_view).arg(&k_view).arg(&v_view);
        args.arg(&cos_view).arg(&sin_view).arg(&slot_view);
        args.arg(&heads_i).arg(&kv_heads_i).arg(&head_dim_i);
        args.arg(&q_stride)
            .arg(&k_stride)
            .arg(&v_stride)
            .arg(&num_slots);
        // SAFETY: argument types and order match `rotary_*cache_*` in cuda/rotary.cu; the
        // strides come from the layouts; the caches are packed `[num_slots, kv_heads *
        // head_dim]` (checked by fused_fits) and the kernel skips slots past them.
        unsafe { args.launch(cfg) }?;
        Ok(cu::tensor(q_out, dev, (tokens, heads, head_dim)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::{cpu, rotary_and_cache, rotary_embedding, RopeLayout};
    use crate::reshape_and_cache;

    /// Llama's tables at scattered positions: `[tokens, head_dim / 2]` each.
    pub(super) fn tables(positions: &[u32], head_dim: usize) -> Result<(Tensor, Tensor)> {
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

    /// The CPU's fused path leaves what candle's ops leave, bit for bit: rotated q, and rotated
    /// keys and the values in their slots of f16, bf16 or f32 caches, with q, k and v read in
    /// place from one fused row per token, or each alone.
    #[test]
    fn cpu_fused_path_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let positions = [0u32, 1, 17, 5, 4095, 2];
        let slots = Tensor::new(&[37u32, 0, 5, 63, 16, 9], &dev)?;
        let tokens = positions.len();
        for head_dim in [16, 64] {
            let (cos, sin) = tables(&positions, head_dim)?;
            let qkv = Tensor::randn(0f32, 1., (tokens, 12, head_dim), &dev)?;
            let fused = (
                qkv.narrow(1, 0, 8)?,
                qkv.narrow(1, 8, 2)?,
                qkv.narrow(1, 10, 2)?,
            );
            let alone = (
                fused.0.contiguous()?,
                fused.1.contiguous()?,
                fused.2.contiguous()?,
            );
            for cache_dtype in [DType::F16, DType::BF16, DType::F32] {
                for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                    for (q, k, v) in [&fused, &alone] {
                        let caches = || -> Result<(Tensor, Tensor)> {
                            let c = || Tensor::zeros((4, 16, 2, head_dim), cache_dtype, &dev);
                            Ok((c()?, c()?))
                        };
                        let ((k_want, v_want), (k_got, v_got)) = (caches()?, caches()?);
                        // candle's ops: the rotation, then the cache write.
                        let (q_want, k_rotated) = rotary_embedding(q, k, &cos, &sin, layout)?;
                        reshape_and_cache(&k_rotated, v, &k_want, &v_want, &slots)?;
                        assert!(
                            cpu::Rows::of(q, k, v, &cos, &sin, &k_got, &v_got, &slots).is_some(),
                            "the fused path takes these"
                        );
                        let q_got =
                            rotary_and_cache(q, k, v, &cos, &sin, layout, &k_got, &v_got, &slots)?;
                        let what = format!("{layout:?} {cache_dtype:?} head_dim {head_dim}");
                        let bits =
                            |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                        assert_eq!(bits(&q_got)?, bits(&q_want)?, "q, {what}");
                        assert_eq!(bits(&k_got)?, bits(&k_want)?, "k cache, {what}");
                        assert_eq!(bits(&v_got)?, bits(&v_want)?, "v cache, {what}");
                    }
                }
            }
        }
        // A slot past the cache is an error, and nothing is written.
        let (q, k, v) = (&fused_part(0, 8)?, &fused_part(8, 2)?, &fused_part(10, 2)?);
        let cache = Tensor::zeros((1, 4, 2, 16), DType::F16, &dev)?;
        let (cos, sin) = tables(&[0, 1, 2], 16)?;
        let far = Tensor::new(&[0u32, 4, 1], &dev)?;
        assert!(rotary_and_cache(
            q,
            k,
            v,
            &cos,
            &sin,
            RopeLayout::HalfSplit,
            &cache,
            &cache,
            &far
        )
        .is_err());
        assert_eq!(
            cache
                .abs()?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?,
            0.
        );
        Ok(())
    }

    /// Inputs the fused path must not take go to candle's ops: values that are a view of their
    /// own f32 cache (which the fused path would wait on forever) and heads of no elements.
    #[test]
    fn cpu_fused_path_leaves_odd_inputs_to_candle() -> Result<()> {
        let dev = Device::Cpu;
        let (cos, sin) = tables(&[0, 1, 2], 16)?;
        let slots = Tensor::new(&[0u32, 5, 9], &dev)?;
        let (q, k) = (&fused_part(0, 8)?, &fused_part(8, 2)?);
        let k_cache = Tensor::zeros((1, 16, 2, 16), DType::F32, &dev)?;
        let v_cache = Tensor::randn(0f32, 1., (1, 16, 2, 16), &dev)?;
        let v = v_cache.reshape((16, 2, 16))?.narrow(0, 4, 3)?;
        assert!(cpu::Rows::of(q, k, &v, &cos, &sin, &k_cache, &v_cache, &slots).is_none());
        let layout = RopeLayout::HalfSplit;
        let _ = rotary_and_cache(q, k, &v, &cos, &sin, layout, &k_cache, &v_cache, &slots);
        let none = Tensor::zeros((3, 0, 16), DType::F32, &dev)?;
        assert!(cpu::Rows::of(&none, k, k, &cos, &sin, &k_cache, &k_cache, &slots).is_none());
        Ok(())
    }

    /// `[3, n, 16]` of a fused f32 row per token.
    fn fused_part(at: usize, n: usize) -> Result<Tensor> {
        Tensor::randn(0f32, 1., (3, 12, 16), &Device::Cpu)?.narrow(1, at, n)
    }

    /// Shapes that do not describe the same tokens, heads and caches are refused before any
    /// cache is written.
    #[test]
    fn rotary_and_cache_refuses_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev);
        let (q, k, v) = (t(&[3, 4, 8])?, t(&[3, 2, 8])?, t(&[3, 2, 8])?);
        let (cos, sin) = (t(&[3, 4])?, t(&[3, 4])?);
        let cache = t(&[2, 4, 2, 8])?;
        let slots = Tensor::new(&[0u32, 1, 2], &dev)?;
        let run = |q: &Tensor, k: &Tensor, v: &Tensor, cos: &Tensor, v_cache: &Tensor| {
            let layout = RopeLayout::HalfSplit;
            rotary_and_cache(q, k, v, cos, &sin, layout, &cache, v_cache, &slots)
        };
        assert_eq!(run(&q, &k, &v, &cos, &cache)?.dims(), [3, 4, 8]);
        assert!(
            run(&t(&[2, 4, 8])?, &k, &v, &cos, &cache).is_err(),
            "tokens"
        );
        assert!(
            run(&q, &t(&[3, 2, 6])?, &v, &cos, &cache).is_err(),
            "head_dim"
        );
        assert!(run(&q, &k, &t(&[3, 1, 8])?, &cos, &cache).is_err(), "v");
        assert!(run(&q, &k, &v, &t(&[3, 3])?, &cache).is_err(), "cos");
        assert!(
            run(&q, &k, &v, &cos, &t(&[1, 4, 2, 8])?).is_err(),
            "v_cache"
        );
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::tests::tables;
    use super::{rotary_and_cache, rotary_embedding, RopeLayout};
    use crate::reshape_and_cache;
    use crate::test_util::{assert_close, cuda_device, randn, DTYPES};

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

    /// The fused kernel leaves what the CPU's rotary then cache write leave: rotated q, and
    /// rotated keys and the values in their slots (read in place from one fused row per token).
    #[test]
    fn fused_cache_write_matches_the_cpu() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let positions = [0u32, 1, 17, 5, 4095, 2];
        let slots = [37u32, 0, 5, 63, 16, 9];
        let tokens = positions.len();
        for dtype in DTYPES {
            for head_dim in [64, 128] {
                let (cos, sin) = tables(&positions, head_dim)?;
                let (qkv, qkv_ref) = randn(&[tokens, 12, head_dim], dtype, &dev)?;
                let part = |t: &Tensor, at: usize, n: usize| t.narrow(1, at, n);
                for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
                    let caches = |d: &Device| -> Result<(Tensor, Tensor)> {
                        let c = || Tensor::zeros((4, 16, 2, head_dim), dtype, d);
                        Ok((c()?, c()?))
                    };
                    let (k_want, v_want) = caches(&Device::Cpu)?;
                    // On the CPU in candle's ops: the rotation, then the cache write.
                    let (q_want, k_rotated) = rotary_embedding(
                        &part(&qkv_ref, 0, 8)?,
                        &part(&qkv_ref, 8, 2)?,
                        &cos,
                        &sin,
                        layout,
                    )?;
                    reshape_and_cache(
                        &k_rotated,
                        &part(&qkv_ref, 10, 2)?,
                        &k_want,
                        &v_want,
                        &Tensor::new(&slots[..], &Device::Cpu)?,
                    )?;
                    let (k_got, v_got) = caches(&dev)?;
                    let q_got = rotary_and_cache(
                        &part(&qkv, 0, 8)?,
                        &part(&qkv, 8, 2)?,
                        &part(&qkv, 10, 2)?,
                        &cos.to_device(&dev)?,
                        &sin.to_device(&dev)?,
                        layout,
                        &k_got,
                        &v_got,
                        &Tensor::new(&slots[..], &dev)?,
                    )?;
                    let what = format!("{layout:?} head_dim {head_dim}");
                    assert_close(&q_got, &q_want, dtype, &what)?;
                    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                    assert_close(&k_got, &f32(&k_want)?, dtype, &what)?;
                    assert_close(&v_got, &f32(&v_want)?, dtype, &what)?;
                }
            }
        }
        Ok(())
    }
}
