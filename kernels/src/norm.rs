//! RMSNorm, alone and fused with the residual add that precedes it in a pre-norm transformer.
//!
//! Numerics follow `candle_nn::ops::rms_norm`: an f32 sum of squares and one rounding of
//! `x * rsqrt(mean(x²) + eps) * weight`. The fused form rounds `x + residual` to the input dtype
//! first, as a separate add would, so fused and unfused agree.

use candle_core::{Result, Tensor};

/// `x * rsqrt(mean(x², last dim) + eps) * weight`; `weight`: `[hidden]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::fits(x, weight)? {
        return cuda::rms_norm(x, None, weight, eps).map(|(normed, _)| normed);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
}

/// Adds `residual` to `x` and normalises the sum: returns `(x + residual, rms_norm(x + residual))`,
/// the new residual stream and the next block's input, in one pass over memory on CUDA.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    if x.shape() != residual.shape() {
        candle_core::bail!(
            "add_rms_norm: x {:?} and residual {:?} differ",
            x.shape(),
            residual.shape()
        );
    }
    #[cfg(feature = "cuda")]
    if cuda::fits(x, weight)? && residual.dtype() == x.dtype() {
        return cuda::rms_norm(x, Some(residual), weight, eps)
            .map(|(normed, sum)| (sum.expect("asked for the sum"), normed));
    }
    let sum = (x + residual)?;
    let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda::CudaDType;
    use candle_core::{Result, Tensor, D};

    use crate::cuda::{self as cu, dispatch_float};

    /// Each thread of a CTA (at most 1024) holds up to this many packs of its row in registers.
    const MAX_PACKS_PER_THREAD: usize = 4;

    pub(super) fn fits(x: &Tensor, weight: &Tensor) -> Result<bool> {
        let hidden = x.dim(D::Minus1)?;
        if weight.dims1()? != hidden {
            candle_core::bail!("rms_norm: weight {:?} for rows of {hidden}", weight.shape());
        }
        let pack = cu::pack_len(x.dtype());
        Ok(cu::on_cuda(x)
            && x.elem_count() > 0
            && weight.dtype() == x.dtype()
            && weight.device().same_device(x.device())
            && hidden.is_multiple_of(pack)
            && hidden / pack <= 1024 * MAX_PACKS_PER_THREAD)
    }

    /// Returns the normed rows, and with `residual` also `x + residual`.
    pub(super) fn rms_norm(
        x: &Tensor,
        residual: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x = cu::packed(x)?;
        let residual = residual.map(cu::packed).transpose()?;
        let weight = cu::packed(weight)?;
        dispatch_float!(x.dtype(), launch(&x, residual.as_ref(), &weight, eps))
    }

    /// One CTA a row, a thread a pack (up to 1024 threads, then several packs each).
    fn launch<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        residual: Option<&Tensor>,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = x.device().as_cuda_device()?;
        let hidden = x.dim(D::Minus1)?;
        let rows = x.elem_count() / hidden;
        let ty = cu::type_name(x.dtype()).expect("checked by fits");
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let x_view = cu::view::<T>(&x_storage, x_layout)?;
        let w_view = cu::view::<T>(&w_storage, w_layout)?;
        let threads = (hidden / cu::pack_len(x.dtype()))
            .next_multiple_of(32)
            .min(1024);
        let cfg = LaunchConfig {
            grid_dim: (cu::int(rows)? as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let hidden = cu::int(hidden)?;
        let stream = dev.cuda_stream();
        // SAFETY (allocations): the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(x.elem_count())? };
        let sum = match residual {
            None => {
                let func = cu::NORM.function(dev, &format!("rms_norm_{ty}"))?;
                let mut args = cu::Launch::new(&stream, &func);
                args.arg(&mut out)
                    .arg(&x_view)
                    .arg(&w_view)
                    .arg(&hidden)
                    .arg(&eps);
                // SAFETY: argument types and order match `rms_norm_*` in cuda/norm.cu.
                unsafe { args.launch(cfg) }?;
                None
            }
            Some(residual) => {
                let (r_storage, r_layout) = residual.storage_and_layout();
                let r_view = cu::view::<T>(&r_storage, r_layout)?;
                let mut sum = unsafe { dev.alloc::<T>(x.elem_count())? };
                let func = cu::NORM.function(dev, &format!("add_rms_norm_{ty}"))?;
                let mut args = cu::Launch::new(&stream, &func);
                args.arg(&mut out).arg(&mut sum).arg(&x_view).arg(&r_view);
                args.arg(&w_view).arg(&hidden).arg(&eps);
                // SAFETY: argument types and order match `add_rms_norm_*` in cuda/norm.cu.
                unsafe { args.launch(cfg) }?;
                Some(cu::tensor(sum, dev, x.shape()))
            }
        };
        Ok((cu::tensor(out, dev, x.shape()), sum))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Result};

    use super::{add_rms_norm, rms_norm};
    use crate::test_util::{assert_close, cuda_device, randn, DTYPES};

    #[test]
    fn plain_and_fused_match_candle() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let eps = 1e-5;
        for dtype in DTYPES {
            // 576: SmolLM's hidden size (not a multiple of 32 packs); 8192: several packs a thread.
            for hidden in [64, 576, 4096, 8192] {
                let what = format!("hidden {hidden}");
                let (x, x_ref) = randn(&[7, hidden], dtype, &dev)?;
                let (r, r_ref) = randn(&[7, hidden], dtype, &dev)?;
                let (w, w_ref) = randn(&[hidden], dtype, &dev)?;
                let want = candle_nn::ops::rms_norm(&x_ref, &w_ref, eps)?;
                assert_close(&rms_norm(&x, &w, eps)?, &want, dtype, &what)?;
                // The kernel rounds the sum to dtype, as a separate add would.
                let sum_ref = (x_ref + r_ref)?.to_dtype(dtype)?.to_dtype(DType::F32)?;
                let want = candle_nn::ops::rms_norm(&sum_ref, &w_ref, eps)?;
                let (sum, normed) = add_rms_norm(&x, &r, &w, eps)?;
                assert_close(&sum, &sum_ref, dtype, &what)?;
                assert_close(&normed, &want, dtype, &what)?;
            }
        }
        Ok(())
    }

    #[test]
    fn rows_of_a_3d_tensor_and_of_a_view() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let (x, x_ref) = randn(&[2, 3, 256], DType::BF16, &dev)?;
        let (w, w_ref) = randn(&[256], DType::BF16, &dev)?;
        let want = candle_nn::ops::rms_norm(&x_ref, &w_ref, 1e-6)?;
        assert_close(&rms_norm(&x, &w, 1e-6)?, &want, DType::BF16, "3d")?;
        // A non-contiguous view is copied first.
        let view = x.narrow(1, 1, 2)?;
        let want = candle_nn::ops::rms_norm(&x_ref.narrow(1, 1, 2)?.contiguous()?, &w_ref, 1e-6)?;
        assert_close(&rms_norm(&view, &w, 1e-6)?, &want, DType::BF16, "view")
    }
}
