//! The CUDA kernels of cuda/attention.cu: launch configuration and the batch layout they read.
//!
//! A work item is a tile of up to `max_rows / group` query tokens of one sequence; a CTA takes
//! one item, one kv head and one partition of the context. When items times kv heads would not
//! fill the GPU, long contexts are split into partitions, merged by a second kernel. In f16 and
//! bf16, prompt chunks go to the tensor-core kernel instead (`MMA_ROWS / group` tokens an item),
//! unless `CANDELA_ATTENTION_MMA=0` (to compare the two).

use std::borrow::Cow;

use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
use candle_core::cuda::CudaDType;
use candle_core::{DType, Device, Result, Tensor};

use super::plan::{max_rows, mma_tile_tokens, DeviceMeta, Launches, MetaKey, THREADS};
use super::AttentionMeta;
use crate::cuda::{self as cu, dispatch_float};

/// Whether the kernels take these operands: f32/f16/bf16 alike, head_dim 64 or 128, a query
/// head group that fits a CTA, caches usable in place.
pub(super) fn fits(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor) -> Result<bool> {
    let (tokens, heads, head_dim) = q.dims3()?;
    let in_place = |c: &Tensor| c.device().same_device(q.device());
    Ok(cu::on_cuda(q)
        && tokens > 0
        && k_cache.dim(3)? == head_dim
        && k_cache.shape() == v_cache.shape()
        && fits_cache(q.dtype(), heads, k_cache)?
        && fits_cache(q.dtype(), heads, v_cache)?
        && in_place(k_cache)
        && in_place(v_cache))
}

/// Whether the kernels take queries of `heads` heads in `dtype` over `cache` (one of the two)
/// in place.
fn fits_cache(dtype: DType, heads: usize, cache: &Tensor) -> Result<bool> {
    let (_, block_size, kv_heads, head_dim) = cache.dims4()?;
    Ok(cu::on_cuda(cache)
        && cache.dtype() == dtype
        && cu::is_packed(cache)
        && block_size > 0
        && matches!(head_dim, 64 | 128)
        && kv_heads > 0
        && heads >= kv_heads
        && heads.is_multiple_of(kv_heads)
        && heads / kv_heads <= max_rows(dtype))
}

pub(super) fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
    scale: f32,
) -> Result<Tensor> {
    let q = cu::packed(q)?;
    let (tokens, heads, _) = q.dims3()?;
    let key = meta_key(q.dtype(), tokens, heads, k_cache)?;
    let device_meta = device_meta(meta, key, q.device())?;
    dispatch_float!(q.dtype(), launch(&q, k_cache, v_cache, &device_meta, scale))
}

/// Whether the tensor-core prefill kernel may run: the PTX was built for sm_80 or later (the
/// kernel needs mma.sync and cp.async) and `CANDELA_ATTENTION_MMA` is not `0`.
fn mma_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        cu::ptx_arch() >= 80 && std::env::var("CANDELA_ATTENTION_MMA").map_or(true, |v| v != "0")
    })
}

/// What the kernels need of the batch layout for `tokens` query rows of `heads` heads in
/// `dtype` over `k_cache`.
pub(super) fn meta_key(
    dtype: DType,
    tokens: usize,
    heads: usize,
    k_cache: &Tensor,
) -> Result<MetaKey> {
    let (num_blocks, block_size, kv_heads, _) = k_cache.dims4()?;
    let group = heads / kv_heads.max(1);
    Ok(MetaKey {
        tile_tokens: max_rows(dtype) / group.max(1),
        mma_tile_tokens: mma_tile_tokens(dtype, group, mma_enabled()),
        block_size,
        num_blocks,
        tokens,
    })
}

/// Builds and uploads `meta`'s device copy for queries of `heads` heads in the cache's dtype,
/// where the kernels take such queries (others take the reference path, which needs none).
pub(super) fn upload_meta(meta: &AttentionMeta, heads: usize, k_cache: &Tensor) -> Result<()> {
    if !fits_cache(k_cache.dtype(), heads, k_cache)? {
        return Ok(());
    }
    let tokens = meta.seqs().iter().map(|s| s.query_len).sum();
    let key = meta_key(k_cache.dtype(), tokens, heads, k_cache)?;
    device_meta(meta, key, k_cache.device()).map(drop)
}

/// `meta`'s device copy for `key`: the cached one, or built (and cached if it is the first).
fn device_meta<'a>(
    meta: &'a AttentionMeta,
    key: MetaKey,
    device: &Device,
) -> Result<Cow<'a, DeviceMeta>> {
    let cache = meta.device_cache();
    if let Some(cached) = cache.get() {
        if cached.key == key && cached.data.device().same_device(device) {
            return Ok(Cow::Borrowed(cached));
        }
    }
    let built = DeviceMeta::new(meta.seqs(), key, device)?;
    match cache.set(built) {
        Ok(()) => Ok(Cow::Borrowed(cache.get().expect("just set"))),
        Err(built) => Ok(Cow::Owned(built)),
    }
}

/// The CUDA-core and tensor-core kernels, each over grid (its work items, kv heads,
/// partitions), then with partitions the merge over (tokens, heads / 4), a warp per head. All
/// of THREADS.
fn launch<T: CudaDType + DeviceRepr>(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &DeviceMeta,
    scale: f32,
) -> Result<Tensor> {
    let dev = q.device().as_cuda_device()?;
    let (tokens, heads, head_dim) = q.dims3()?;
    let (_, block_size, kv_heads, _) = k_cache.dims4()?;
    let ty = cu::type_name(q.dtype()).expect("checked by fits");
    let plan = Launches::new(meta, heads, kv_heads);

    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k_cache.storage_and_layout();
    let (v_storage, v_layout) = v_cache.storage_and_layout();
    let (m_storage, m_layout) = meta.data.storage_and_layout();
    let q_view = cu::view::<T>(&q_storage, q_layout)?;
    let k_view = cu::view::<T>(&k_storage, k_layout)?;
    let v_view = cu::view::<T>(&v_storage, v_layout)?;
    let m_view = cu::view::<u32>(&m_storage, m_layout)?;
    let seq_info = m_view.slice(..meta.tables_at);
    let tables = m_view.slice(meta.tables_at..);
    let work = m_view.slice(meta.work_at..);
    let mma_work = m_view.slice(meta.mma_work_at..);
    let positions = m_view.slice(meta.positions_at..);

    // SAFETY (allocations): every row is written, by its CTA (of either kernel) or by the
    // merge; with partitions, the merge reads only the partials that CTAs (of either) wrote.
    let mut out = unsafe { dev.alloc::<T>(q.elem_count())? };
    let mut partials = match plan.num_parts {
        1 => None,
        _ => {
            let n = tokens * heads * plan.num_parts;
            unsafe { Some((dev.alloc::<f32>(n * head_dim)?, dev.alloc::<f32>(n * 2)?)) }
        }
    };
    let (heads_i, kv_heads_i, block_size_i) =
        (cu::int(heads)?, cu::int(kv_heads)?, cu::int(block_size)?);
    let (max_blocks, part_len, num_parts) = (
        cu::int(meta.max_blocks)?,
        cu::int(plan.part_len)?,
        cu::int(plan.num_parts)?,
    );
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let no_partials = 0u64; // null pointers: the CTAs write `out` themselves
    let config = |grid: [u32; 3]| LaunchConfig {
        grid_dim: (grid[0], grid[1], grid[2]),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();

    // Both kernels take the same arguments, each with its own work list.
    let kernels = [
        (plan.core, "paged_attention", &work),
        (plan.mma, "paged_prefill_mma", &mma_work),
    ];
    for (grid, kernel, items) in kernels {
        let Some(grid) = grid else { continue };
        let func = cu::ATTENTION.function(dev, &format!("{kernel}_{ty}_d{head_dim}"))?;
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut out);
        match &mut partials {
            Some((part_out, part_ml)) => args.arg(part_out).arg(part_ml),
            None => args.arg(&no_partials).arg(&no_partials),
        };
        args.arg(&q_view).arg(&k_view).arg(&v_view);
        args.arg(&seq_info).arg(&tables).arg(items);
        args.arg(&heads_i)
            .arg(&kv_heads_i)
            .arg(&block_size_i)
            .arg(&max_blocks);
        args.arg(&part_len).arg(&num_parts).arg(&scale_log2);
        // SAFETY: argument types and order match `paged_attention_*` and `paged_prefill_mma_*`
        // in cuda/attention.cu (the latter built for f16 and bf16, which `mma_tile_tokens`
        // requires, on sm_80 and later, which `mma_enabled` requires); DeviceMeta::new checked
        // every index the kernels derive from the metadata.
        unsafe { args.launch(config(grid)) }?;
    }
    if let (Some(grid), Some((part_out, part_ml))) = (plan.reduce, &partials) {
        let func =
            cu::ATTENTION.function(dev, &format!("paged_attention_reduce_{ty}_d{head_dim}"))?;
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut out)
            .arg(part_out)
            .arg(part_ml)
            .arg(&positions);
        args.arg(&heads_i).arg(&part_len).arg(&num_parts);
        // SAFETY: argument types and order match `paged_attention_reduce_*`.
        unsafe { args.launch(config(grid)) }?;
    }
    Ok(cu::tensor(out, dev, (tokens, heads, head_dim)))
}
