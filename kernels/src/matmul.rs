//! `x · wᵀ` for a linear layer's weight `w` of shape `[out, in]`.
//!
//! A decode step multiplies a few rows of activations by each weight matrix, and its time is the
//! time to read the weights once. On CUDA, products of up to [`SKINNY_MAX_ROWS`] rows in
//! f16/bf16/f32 go to a kernel of our own built for that (`cuda/matmul.cu`: whole rows of `w`
//! streamed in 16-byte packs, several in flight per thread); larger ones, and every other device,
//! take candle's matmul (cuBLAS on CUDA). `CANDELA_SKINNY_GEMM=0` sends every product to cuBLAS,
//! to compare the two.

use candle_core::{Result, Tensor};

/// Rows of `x` the skinny kernel takes (`SKINNY_MAX_ROWS` in cuda/matmul.cu).
pub const SKINNY_MAX_ROWS: usize = 8;

/// Warps per block of the skinny kernel (`SKINNY_WARPS`).
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emu")))]
pub(crate) const SKINNY_WARPS: usize = 4;

/// The skinny kernel's entry (without its dtype) and output columns per warp for `m` rows:
/// 2 columns up to 4 rows, 4 past that (see cuda/matmul.cu).
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emu")))]
pub(crate) fn skinny_shape(m: usize) -> (&'static str, usize) {
    if m > 4 {
        ("skinny_gemm_wide", 4)
    } else {
        ("skinny_gemm", 2)
    }
}

/// `x · wᵀ` for `x` of shape `[.., in]` and `w` of shape `[out, in]`: `[.., out]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::fits(x, w)? {
        return cuda::skinny_gemm(x, w, false);
    }
    x.broadcast_matmul(&w.t()?)
}

/// [`crate::silu_and_mul`] of [`linear`]: for `w` stacking a gate projection over an up
/// projection (`[2 * out, in]`), `silu(x · gateᵀ) * (x · upᵀ)`, `[.., out]`. Where the skinny
/// kernel takes the product, it applies the activation to its sums before it writes them (one
/// launch and one write of the MLP's widest activations fewer a layer).
pub fn linear_silu_and_mul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if w.dim(0)?.is_multiple_of(2) && cuda::fits(x, w)? {
        return cuda::skinny_gemm(x, w, true);
    }
    // Past here the skinny kernel has been ruled out (or an odd width is refused below).
    crate::silu_and_mul(&x.broadcast_matmul(&w.t()?)?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::cuda::CudaDType;
    use candle_core::{Result, Tensor, D};

    use super::{skinny_shape, SKINNY_MAX_ROWS, SKINNY_WARPS};
    use crate::cuda::{self as cu, dispatch_float};

    pub(super) fn enabled() -> bool {
        static ENABLED: OnceLock<bool> = OnceLock::new();
        *ENABLED.get_or_init(|| std::env::var("CANDELA_SKINNY_GEMM").map_or(true, |v| v != "0"))
    }

    /// A few rows of whole packs by a packed `[out, in]` weight of the same dtype and device.
    pub(super) fn fits(x: &Tensor, w: &Tensor) -> Result<bool> {
        if !cu::on_cuda(x) || !enabled() || w.rank() != 2 {
            return Ok(false);
        }
        let (out, k) = w.dims2()?;
        let rows = x.elem_count() / k.max(1);
        Ok(x.rank() >= 1
            && x.dim(D::Minus1)? == k
            && (1..=SKINNY_MAX_ROWS).contains(&rows)
            && out > 0
            && k.is_multiple_of(cu::pack_len(x.dtype()))
            && w.dtype() == x.dtype()
            && w.device().same_device(x.device())
            && cu::is_packed(w))
    }

    /// `x · wᵀ`, or with `silu` the activation of its halves (`w` has an even number of rows).
    pub(super) fn skinny_gemm(x: &Tensor, w: &Tensor, silu: bool) -> Result<Tensor> {
        let x = cu::packed(x)?;
        dispatch_float!(x.dtype(), launch(&x, w, silu))
    }

    fn launch<T: CudaDType + DeviceRepr>(x: &Tensor, w: &Tensor, silu: bool) -> Result<Tensor> {
        let dev = x.device().as_cuda_device()?;
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let width = if silu { n / 2 } else { n };
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("checked by fits") = width;
        let (entry, cols) = skinny_shape(m);
        let name = format!(
            "{entry}{}_{}",
            if silu { "_silu" } else { "" },
            cu::type_name(x.dtype()).expect("checked by fits")
        );
        let func = cu::MATMUL.function(dev, &name)?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let xs = cu::view::<T>(&x_storage, x_layout)?;
        let ws = cu::view::<T>(&w_storage, w_layout)?;
        // SAFETY: the kernel writes all m × width outputs.
        let mut y = unsafe { dev.alloc::<T>(m * width)? };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(SKINNY_WARPS * cols) as u32, 1, 1),
            block_dim: ((SKINNY_WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m, n, k) = (cu::int(m)?, cu::int(n)?, cu::int(k)?);
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut y).arg(&xs).arg(&ws);
        args.arg(&m).arg(&n).arg(&k).arg(&k);
        // SAFETY: argument types and order match `skinny_gemm_*` in cuda/matmul.cu; x and w are
        // packed, so every row starts 16-byte aligned and k is a whole number of packs.
        unsafe { args.launch(cfg) }?;
        drop((x_storage, w_storage));
        Ok(cu::tensor(y, dev, shape))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{DType, Device, Result};

    use super::{linear, linear_silu_and_mul, SKINNY_MAX_ROWS};
    use crate::test_util::{assert_close, cuda_device, randn, DTYPES};

    /// The skinny kernel against the same product in f32 on the CPU, for every row count it
    /// takes (and checked to take them; one past it goes to cuBLAS), an output width that is not a whole
    /// number of blocks, and inner sizes below and past one pass of the unrolled loop.
    #[test]
    fn skinny_products_match_the_cpu() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        for dtype in DTYPES {
            for (n, k) in [(37, 64), (300, 1032), (1024, 4096)] {
                let (w, w_ref) = randn(&[n, k], dtype, &dev)?;
                for m in (1..=SKINNY_MAX_ROWS + 1).step_by(2) {
                    let (x, x_ref) = randn(&[m, k], dtype, &dev)?;
                    let want = x_ref.matmul(&w_ref.t()?)?;
                    assert_eq!(
                        super::cuda::fits(&x, &w)?,
                        m <= SKINNY_MAX_ROWS && super::cuda::enabled(),
                        "{dtype:?} {m}x{k} by {n}: the kernel that takes it"
                    );
                    let got = linear(&x, &w)?.to_device(&Device::Cpu)?;
                    assert_close(&got, &want, dtype, &format!("{dtype:?} {m}x{k} by {n}"))?;
                }
            }
        }
        Ok(())
    }

    /// The activated product (the skinny kernel's up to its row limit, cuBLAS then the
    /// activation past it) against the activation of the f32 product on the CPU. x is scaled
    /// so that sums stay near 1: each factor's rounding error is multiplied by the other.
    #[test]
    fn activated_products_match_the_cpu() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        for dtype in DTYPES {
            for (half, k) in [(37, 64), (1000, 4096)] {
                let (w, w_ref) = randn(&[2 * half, k], dtype, &dev)?;
                for m in (1..=SKINNY_MAX_ROWS + 1).step_by(2) {
                    let (_, x) = randn(&[m, k], dtype, &Device::Cpu)?;
                    let x = (x / (k as f64).sqrt())?.to_dtype(dtype)?;
                    let x_ref = x.to_dtype(DType::F32)?;
                    let want = crate::silu_and_mul(&x_ref.matmul(&w_ref.t()?)?)?;
                    let got = linear_silu_and_mul(&x.to_device(&dev)?, &w)?;
                    let what = format!("{dtype:?} {m}x{k} by 2x{half}");
                    assert_close(&got.to_device(&Device::Cpu)?, &want, dtype, &what)?;
                }
            }
        }
        Ok(())
    }
}
