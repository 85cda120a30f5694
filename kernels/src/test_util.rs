//! Helpers of the CUDA tests: a device when there is one, inputs rounded the way the kernels see
//! them, and closeness per dtype.

use candle_core::{DType, Device, Result, Tensor};

/// The first CUDA device, one for all the tests of the process, or `None` (with a note) on
/// machines without one: the test then passes without checking anything. With
/// `CANDELA_REQUIRE_GPU=1` (as scripts/gpu-bench.sh runs them) a device that does not open fails
/// the test instead, so that a broken driver or library cannot pass for a machine without a GPU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn cuda_device() -> Option<Device> {
    static DEVICE: std::sync::OnceLock<std::result::Result<Device, String>> =
        std::sync::OnceLock::new();
    match DEVICE.get_or_init(|| crate::cuda_device(0).map_err(|e| e.to_string())) {
        Ok(dev) => Some(dev.clone()),
        Err(e) => {
            let reason = e.lines().next().unwrap_or_default();
            assert!(
                std::env::var_os("CANDELA_REQUIRE_GPU").is_none_or(|v| v != "1"),
                "CANDELA_REQUIRE_GPU=1 but the CUDA device did not open: {e}"
            );
            println!("no CUDA device: skipped ({reason})");
            None
        }
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Standard-normal values of `shape` in `dtype` on `dev`, and the same values (after rounding to
/// `dtype`) in f32 on the CPU, for the reference.
pub(crate) fn randn(shape: &[usize], dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let x = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(dtype)?;
    Ok((x.to_device(dev)?, x.to_dtype(DType::F32)?))
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, with tolerances for `dtype`'s
/// precision (`got` in `dtype` on any device, `want` in f32).
pub(crate) fn assert_close(got: &Tensor, want: &Tensor, dtype: DType, what: &str) -> Result<()> {
    let (rtol, atol) = match dtype {
        DType::F32 => (1e-4, 1e-4),
        DType::F16 => (4e-3, 4e-3),
        _ => (2e-2, 2e-2),
    };
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let finite = got
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite());
    assert!(finite, "{what} ({dtype:?}): non-finite output");
    let excess = ((got - want)?.abs()? - (want.abs()? * rtol)?)?;
    let worst = excess.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert!(
        worst <= atol,
        "{what} ({dtype:?}): off by {worst} past rtol {rtol}"
    );
    Ok(())
}
