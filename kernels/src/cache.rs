//! Writing new keys and values into their KV-cache slots.

use candle_core::{Result, Tensor};

/// Writes `k` and `v` (`[tokens, kv_heads, head_dim]`) into the caches
/// (`[num_blocks, block_size, kv_heads, head_dim]`) at the flat slot indices `slots` (`[tokens]`,
/// u32, slot = block_id * block_size + offset). Caches are updated in place.
pub fn reshape_and_cache(
    k: &Tensor,
    v: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &Tensor,
) -> Result<()> {
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
