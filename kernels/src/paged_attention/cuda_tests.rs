//! The CUDA kernels against the plain-candle reference on the CPU (f32, from the same rounded
//! inputs), over every dtype, head_dim, query-head group and block size they take.

use candle_core::{DType, Device, Result, Tensor};

use super::cuda::meta_key;
use super::test_batches::{batch, cases, Case, BATCHES, PROMPT_GEOMETRIES};
use super::{paged_attention, prepare_attention, AttentionMeta};
use crate::test_util::{assert_close, cuda_device, DTYPES};

fn check(dev: &Device, c: &Case) -> Result<()> {
    let x = c.inputs(dev)?;
    let meta = AttentionMeta::new(x.seqs.clone());
    // As the forward pass does: the layout uploads first, under the key the kernel then asks for
    // (else every layer would build its own).
    let (tokens, heads, _) = x.q.dims3()?;
    prepare_attention(&meta, heads, &x.k)?;
    let uploaded = meta.device_cache().get().map(|m| m.key);
    assert_eq!(
        uploaded,
        Some(meta_key(x.q.dtype(), tokens, heads, &x.k)?),
        "{}: the prepared layout's key",
        c.describe()
    );
    // Twice: the second call reuses the uploaded metadata, as later layers do.
    for _ in 0..2 {
        let got = paged_attention(&x.q, &x.k, &x.v, &meta, x.scale)?;
        assert_close(&got, &x.want, c.dtype, &c.describe())?;
    }
    Ok(())
}

#[test]
fn matches_reference_across_shapes() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let geometries: Vec<_> = [64, 128]
        .into_iter()
        .flat_map(|head_dim| [1, 4, 8].map(|group| (head_dim, group)))
        .flat_map(|(head_dim, group)| [16, 32].map(|block_size| (head_dim, group, block_size)))
        .collect();
    for case in cases(&DTYPES, &geometries, &BATCHES) {
        check(&dev, &case)?;
    }
    Ok(())
}

/// Few sequences over long contexts: the context is split into partitions and merged, for a
/// decode step and (in f32; f16/bf16 prompt chunks take the tensor-core kernel) a prefill chunk.
#[test]
fn long_contexts_split_and_merge() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let shapes: [&[(usize, usize)]; 3] = [
        &[(1, 3000)],
        &[(1, 3000), (64, 3000), (1, 257)],
        &[(1, 1000), (1, 2047), (1, 4096)],
    ];
    let geometries = [(128, 4, 16), (64, 8, 32), (128, 1, 32)];
    for case in cases(&DTYPES, &geometries, &shapes) {
        check(&dev, &case)?;
    }
    Ok(())
}

/// Prompts of many query and key tiles on the tensor-core kernel (f16/bf16; f32 on the other),
/// beside decode steps, for every group size that fills its rows differently.
#[test]
fn long_prompts() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let shapes: [&[(usize, usize)]; 2] = [&[(1000, 1000)], &[(64, 300), (1, 50), (500, 1164)]];
    for case in cases(&DTYPES, &PROMPT_GEOMETRIES, &shapes) {
        check(&dev, &case)?;
    }
    Ok(())
}

/// A batch whose sequences skip a row is refused rather than read out of bounds.
#[test]
fn rejects_rows_not_covered() -> Result<()> {
    let Some(dev) = cuda_device() else {
        return Ok(());
    };
    let (mut seqs, num_blocks) = batch(&[(2, 4), (1, 3)], 16);
    seqs[1].query_start = 3;
    let q = Tensor::zeros((4, 2, 64), DType::BF16, &dev)?;
    let cache = Tensor::zeros((num_blocks, 16, 2, 64), DType::BF16, &dev)?;
    let meta = AttentionMeta::new(seqs);
    assert!(paged_attention(&q, &cache, &cache, &meta, 1.).is_err());
    Ok(())
}
