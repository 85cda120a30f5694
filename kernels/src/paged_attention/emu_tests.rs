//! The CUDA kernels of cuda/attention.cu on the CPU emulator (see `crate::emu`), launched as
//! `cuda.rs` launches them (same plan: metadata, work items, partitions, the tensor-core
//! kernel's items), against the plain-candle reference.

use candle_core::{DType, Device, Result, Tensor, WithDType};

use super::plan::{max_rows, mma_tile_tokens, DeviceMeta, Launches, MetaKey, THREADS};
use super::test_batches::{cases, Case, BATCHES, PROMPT_GEOMETRIES};
use crate::emu::{launch, ptr, ptr_mut, Arg};
use crate::test_util::assert_close;

fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Runs the kernels over `q` and the caches (all in `T`), returning `[tokens, heads, head_dim]`;
/// prompt chunks in f16/bf16 take the tensor-core kernel if `mma`.
fn run<T: WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &[super::SeqAttention],
    scale: f32,
    mma: bool,
) -> Result<Tensor> {
    let (tokens, heads, head_dim) = q.dims3()?;
    let (num_blocks, block_size, kv_heads, _) = k.dims4()?;
    let ty = match q.dtype() {
        DType::F32 => "f32",
        DType::F16 => "f16",
        _ => "bf16",
    };
    let group = heads / kv_heads;
    let key = MetaKey {
        tile_tokens: max_rows(q.dtype()) / group,
        mma_tile_tokens: mma_tile_tokens(q.dtype(), group, mma),
        block_size,
        num_blocks,
        tokens,
    };
    let meta = DeviceMeta::new(seqs, key, &Device::Cpu)?;
    let data = host::<u32>(&meta.data)?;
    let plan = Launches::new(&meta, heads, kv_heads);
    let (part_len, num_parts) = (plan.part_len, plan.num_parts);
    let (q, k, v) = (host::<T>(q)?, host::<T>(k)?, host::<T>(v)?);
    let mut out = vec![T::from_f64(f64::NAN); tokens * heads * head_dim];
    let n = tokens * heads * num_parts;
    let (mut part_out, mut part_ml) = (vec![f32::NAN; n * head_dim], vec![f32::NAN; n * 2]);
    let split = num_parts > 1;
    // Both kernels take the same arguments, each with its own work list.
    for (grid, kernel, items) in [
        (plan.core, "paged_attention", meta.work_at),
        (plan.mma, "paged_prefill_mma", meta.mma_work_at),
    ] {
        let Some(grid) = grid else { continue };
        let partial = |buf: &mut Vec<f32>| match split {
            true => ptr_mut(buf),
            false => Arg::Ptr(std::ptr::null()),
        };
        let args = [
            ptr_mut(&mut out),
            partial(&mut part_out),
            partial(&mut part_ml),
            ptr(&q),
            ptr(&k),
            ptr(&v),
            ptr(&data[..meta.tables_at]),
            ptr(&data[meta.tables_at..]),
            ptr(&data[items..]),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(block_size as i32),
            Arg::I32(meta.max_blocks as i32),
            Arg::I32(part_len.min(i32::MAX as usize) as i32),
            Arg::I32(num_parts as i32),
            Arg::F32(scale * std::f32::consts::LOG2_E),
        ];
        launch(
            &format!("{kernel}_{ty}_d{head_dim}"),
            grid,
            [THREADS, 1, 1],
            &args,
        );
    }
    if let Some(grid) = plan.reduce {
        let args = [
            ptr_mut(&mut out),
            ptr(&part_out),
            ptr(&part_ml),
            ptr(&data[meta.positions_at..]),
            Arg::I32(heads as i32),
            Arg::I32(part_len as i32),
            Arg::I32(num_parts as i32),
        ];
        launch(
            &format!("paged_attention_reduce_{ty}_d{head_dim}"),
            grid,
            [THREADS, 1, 1],
            &args,
        );
    }
    Tensor::from_vec(out, (tokens, heads, head_dim), &Device::Cpu)
}

/// The case with prompt chunks on the tensor-core kernel (f16/bf16), then unless `mma_only` on
/// the CUDA-core one too.
fn check_kernels(c: &Case, mma_only: bool) -> Result<()> {
    let x = c.inputs(&Device::Cpu)?;
    for mma in [true, false] {
        if !mma && (mma_only || c.dtype == DType::F32) {
            continue;
        }
        let (q, k, v, seqs, scale) = (&x.q, &x.k, &x.v, &x.seqs, x.scale);
        let got = match c.dtype {
            DType::F32 => run::<f32>(q, k, v, seqs, scale, mma)?,
            DType::F16 => run::<half::f16>(q, k, v, seqs, scale, mma)?,
            _ => run::<half::bf16>(q, k, v, seqs, scale, mma)?,
        };
        let what = format!("{} mma {mma}", c.describe());
        assert_close(&got, &x.want, c.dtype, &what)?;
    }
    Ok(())
}

fn check(c: &Case) -> Result<()> {
    check_kernels(c, false)
}

/// Decode steps, prefill chunks over cached prefixes and both mixed, for every dtype, head_dim
/// and query-head group the kernel takes.
#[test]
fn matches_reference_across_shapes() -> Result<()> {
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .enumerate()
    {
        for head_dim in [64, 128] {
            for group in [1, 4, 8] {
                let block_size = [16, 32][(i + group) % 2];
                for shape in BATCHES {
                    check(&Case::new(dtype, (head_dim, group, block_size), shape))?;
                }
            }
        }
    }
    Ok(())
}

/// Few sequences over long contexts: split into partitions and merged, decode and prefill (on
/// both kernels in bf16), and a short chunk over a long cached prefix.
#[test]
fn long_contexts_split_and_merge() -> Result<()> {
    let shapes: [&[(usize, usize)]; 3] =
        [&[(1, 1500)], &[(1, 900), (24, 700), (1, 257)], &[(9, 1200)]];
    let geometries = [(128, 4, 16), (64, 8, 32)];
    for case in cases(&[DType::F32, DType::BF16], &geometries, &shapes) {
        check(&case)?;
    }
    Ok(())
}

/// Prompts longer than one tile of queries and of keys, beside decode steps, with every group
/// size whose rows fill the tensor-core kernel's CTA differently.
#[test]
fn long_prompts_on_tensor_cores() -> Result<()> {
    let shapes: [&[(usize, usize)]; 2] = [&[(130, 130)], &[(64, 300), (1, 50), (100, 164)]];
    for case in cases(&[DType::F16, DType::BF16], &PROMPT_GEOMETRIES, &shapes) {
        check_kernels(&case, true)?;
    }
    Ok(())
}

/// Prompt CTAs of several key tiles (partitions of 128 keys) whose last item leaves warps 1..3
/// without work: the tensor-core kernel's double-buffered tiles, rescaled across tiles, with
/// idle warps (the other cases split contexts into one-tile partitions).
#[test]
fn multi_tile_prompts_with_idle_warps() -> Result<()> {
    let shapes: [&[(usize, usize)]; 1] = [&[(130, 2000)]];
    for case in cases(&[DType::BF16], &[(128, 4, 16), (64, 8, 32)], &shapes) {
        check_kernels(&case, true)?;
    }
    Ok(())
}

/// Enough CTAs that contexts are not split: every CTA walks its whole context, many key tiles,
/// on both kernels.
#[test]
fn whole_contexts_of_many_tiles() -> Result<()> {
    // 256 decode steps over 300 keys: 512 CTAs of the CUDA-core kernel, 10 tiles each.
    let decode: Vec<(usize, usize)> = (0..256).map(|i| (1, 290 + i % 20)).collect();
    for case in cases(&[DType::F32, DType::BF16], &[(64, 4, 16)], &[&decode[..]]) {
        check_kernels(&case, true)?;
    }
    // A 512-token prompt over 700 keys, group 32: 256 tensor-core items of 2 tokens, 512 CTAs.
    let prompt: [(usize, usize); 1] = [(511, 700)];
    for case in cases(&[DType::F16], &[(64, 32, 16)], &[&prompt[..]]) {
        check_kernels(&case, true)?;
    }
    Ok(())
}
