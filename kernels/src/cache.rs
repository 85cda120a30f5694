//! Writing new keys and values into their KV-cache slots.
//!
//! On CUDA a kernel copies each token's row to its slot (a CTA per token, 16-byte copies), one
//! launch per cache; elsewhere candle's `scatter_set`.

use candle_core::{Result, Tensor};

/// Writes `k` and `v` (`[tokens, kv_heads, head_dim]`) into the caches
/// (`[num_blocks, block_size, kv_heads, head_dim]`) at the flat slot indices `slots` (`[tokens]`,
/// u32, slot = block_id * block_size + offset). Caches are updated in place; `k` and `v` are
/// converted to the caches' dtype. On CUDA, slots past the cache are skipped.
pub fn reshape_and_cache(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &Tensor,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if cuda::fits(k_cache, slots) && cuda::fits(v_cache, slots) {
        cuda::write(k_cache, k, slots)?;
        return cuda::write(v_cache, v, slots);
    }
    let (tokens, kv_heads, head_dim) = k.dims3()?;
    let (num_blocks, block_size, _, _) = k_cache.dims4()?;
    let row = kv_heads * head_dim;
    let index = slots
        .reshape((tokens, 1))?
        .broadcast_as((tokens, row))?
        .contiguous()?;
    let flat_k = k_cache.reshape((num_blocks * block_size, row))?;
    let flat_v = v_cache.reshape((num_blocks * block_size, row))?;
    flat_k.scatter_set(
        &index,
        &k.reshape((tokens, row))?.to_dtype(k_cache.dtype())?,
        0,
    )?;
    flat_v.scatter_set(
        &index,
        &v.reshape((tokens, row))?.to_dtype(v_cache.dtype())?,
        0,
    )?;
    Ok(())
}

/// Whether the CUDA kernel writes `cache` at `slots` in place (see `rotary::rotary_and_cache`).
#[cfg(feature = "cuda")]
pub(crate) fn fits_cuda(cache: &Tensor, slots: &Tensor) -> bool {
    cuda::fits(cache, slots)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda::CudaDType;
    use candle_core::{
        CpuStorage, CudaStorage, DType, InplaceOp3, Layout, Result, Tensor, WithDType,
    };

    use crate::cuda as cu;

    /// The cache is written in place, so it must already be laid out as the kernel writes.
    pub(super) fn fits(cache: &Tensor, slots: &Tensor) -> bool {
        let row_bytes =
            cache.dims().iter().skip(2).product::<usize>() * cache.dtype().size_in_bytes();
        cu::on_cuda(cache)
            && cache.rank() == 4
            && cu::is_packed(cache)
            && row_bytes.is_multiple_of(16)
            && slots.dtype() == DType::U32
            && slots.device().same_device(cache.device())
    }

    /// Writes `rows` (`[tokens, kv_heads, head_dim]`) into `cache` at `slots`.
    pub(super) fn write(cache: &Tensor, rows: &Tensor, slots: &Tensor) -> Result<()> {
        let (tokens, kv_heads, head_dim) = rows.dims3()?;
        if tokens == 0 {
            return Ok(());
        }
        let (_, _, cache_kv_heads, cache_head_dim) = cache.dims4()?;
        if (kv_heads, head_dim) != (cache_kv_heads, cache_head_dim) || slots.dims1()? != tokens {
            candle_core::bail!(
                "reshape_and_cache: rows {:?}, slots {:?}, cache {:?}",
                rows.shape(),
                slots.shape(),
                cache.shape()
            );
        }
        let rows = cu::rows(&rows.to_dtype(cache.dtype())?)?;
        cache.inplace_op3(&rows, &slots.contiguous()?, &WriteCache)
    }

    struct WriteCache;

    impl InplaceOp3 for WriteCache {
        fn name(&self) -> &'static str {
            "write-cache"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            candle_core::bail!("write-cache runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            cache: &mut CudaStorage,
            cache_l: &Layout,
            rows: &CudaStorage,
            rows_l: &Layout,
            slots: &CudaStorage,
            slots_l: &Layout,
        ) -> Result<()> {
            cu::dispatch_float!(
                rows.dtype(),
                launch(cache, cache_l, rows, rows_l, slots, slots_l)
            )
        }
    }

    /// A CTA per token, a thread per 16-byte pack of its row.
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        cache: &mut CudaStorage,
        cache_l: &Layout,
        rows: &CudaStorage,
        rows_l: &Layout,
        slots: &CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let dev = cache.device.clone();
        let tokens = rows_l.dims()[0];
        let row_len = rows_l.shape().elem_count() / tokens;
        let row_stride = cu::int(rows_l.stride()[0])?;
        let num_slots = cache_l.shape().elem_count() / row_len;
        let name = format!(
            "write_cache_{}",
            cu::type_name(T::DTYPE).expect("checked by fits")
        );
        let func = cu::CACHE.function(&dev, &name)?;
        let rows = rows.as_cuda_slice::<T>()?.slice(rows_l.start_offset()..);
        let slots = slots
            .as_cuda_slice::<u32>()?
            .slice(slots_l.start_offset()..);
        let mut cache = cache
            .as_cuda_slice_mut::<T>()?
            .slice_mut(cache_l.start_offset()..);
        let threads = (row_len / cu::pack_len(T::DTYPE))
            .next_multiple_of(32)
            .min(256);
        // Every u32 slot is below a count past u32::MAX.
        let num_slots = u32::try_from(num_slots).unwrap_or(u32::MAX);
        let row_len = cu::int(row_len)?;
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut cache)
            .arg(&rows)
            .arg(&slots)
            .arg(&row_len)
            .arg(&row_stride)
            .arg(&num_slots);
        let cfg = LaunchConfig {
            grid_dim: (cu::int(tokens)? as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `write_cache_*` in cuda/cache.cu; `write`
        // passed rows whose heads are contiguous, `row_stride` apart; the kernel skips slots
        // past the cache.
        unsafe { args.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn writes_land_in_their_slots_and_nowhere_else() -> Result<()> {
        let dev = Device::Cpu;
        let k_cache = Tensor::zeros((4, 2, 1, 3), DType::F32, &dev)?;
        let v_cache = Tensor::zeros((4, 2, 1, 3), DType::F32, &dev)?;
        let k = Tensor::arange(1f32, 7., &dev)?.reshape((2, 1, 3))?;
        let v = (&k * 10.)?;
        let slots = Tensor::new(&[5u32, 0], &dev)?;
        reshape_and_cache(&k, &v, &k_cache, &v_cache, &slots)?;
        let flat: Vec<Vec<f32>> = k_cache.reshape((8, 3))?.to_vec2()?;
        assert_eq!(flat[5], vec![1., 2., 3.]);
        assert_eq!(flat[0], vec![4., 5., 6.]);
        let untouched: f32 = flat
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 5 && *i != 0)
            .map(|(_, r)| r.iter().sum::<f32>())
            .sum();
        assert_eq!(untouched, 0.);
        let vflat: Vec<Vec<f32>> = v_cache.reshape((8, 3))?.to_vec2()?;
        assert_eq!(vflat[5], vec![10., 20., 30.]);
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Device, Result, Tensor};

    use super::reshape_and_cache;
    use crate::test_util::{cuda_device, randn, DTYPES};

    /// The kernel writes exactly what scatter_set writes on the CPU, converting f32 rows to the
    /// cache's dtype on the way.
    #[test]
    fn matches_cpu_scatter() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let slots = [37u32, 0, 5, 63, 16];
        for dtype in DTYPES {
            for head_dim in [64, 128] {
                let shape = (4, 16, 2, head_dim);
                let (k, k_ref) = randn(&[slots.len(), 2, head_dim], DType::F32, &dev)?;
                let (v, v_ref) = randn(&[slots.len(), 2, head_dim], DType::F32, &dev)?;
                let caches = |d: &Device| -> Result<(Tensor, Tensor)> {
                    Ok((
                        Tensor::zeros(shape, dtype, d)?,
                        Tensor::zeros(shape, dtype, d)?,
                    ))
                };
                let (k_cache, v_cache) = caches(&dev)?;
                let (k_want, v_want) = caches(&Device::Cpu)?;
                let slot_t = Tensor::new(&slots[..], &dev)?;
                // In the cache's dtype, k and v are read in place as views of one fused row.
                let fused = Tensor::cat(&[&k, &v], 1)?.to_dtype(dtype)?;
                let (k, v) = (fused.narrow(1, 0, 2)?, fused.narrow(1, 2, 2)?);
                reshape_and_cache(&k, &v, &k_cache, &v_cache, &slot_t)?;
                let slot_cpu = Tensor::new(&slots[..], &Device::Cpu)?;
                reshape_and_cache(&k_ref, &v_ref, &k_want, &v_want, &slot_cpu)?;
                for (got, want) in [(k_cache, k_want), (v_cache, v_want)] {
                    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    let want = want.to_dtype(DType::F32)?;
                    let diff = (got - want)?.abs()?.flatten_all()?.max(0)?;
                    assert_eq!(
                        diff.to_scalar::<f32>()?,
                        0.,
                        "{dtype:?} head_dim {head_dim}"
                    );
                }
            }
        }
        Ok(())
    }
}
