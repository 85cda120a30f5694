//! Launch plumbing shared by the CUDA kernels: the PTX that build.rs compiled from `cuda/*.cu`,
//! typed device views of tensors, and tensors over freshly written device memory.
//!
//! The kernels read and write 16 bytes at a time, so their operands go through [`packed`] first.

use candle_core::cuda::cudarc::driver::{CudaFunction, CudaSlice, CudaView};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

/// One compiled `cuda/*.cu` file.
pub(crate) struct Module {
    name: &'static str,
    ptx: &'static str,
}

macro_rules! module {
    ($file:literal) => {
        Module {
            name: concat!("candela-", $file),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        }
    };
}

pub(crate) const ACTIVATION: Module = module!("activation");
pub(crate) const ATTENTION: Module = module!("attention");
pub(crate) const CACHE: Module = module!("cache");
pub(crate) const MATMUL: Module = module!("matmul");
pub(crate) const NORM: Module = module!("norm");
pub(crate) const ROTARY: Module = module!("rotary");
pub(crate) const SAMPLING: Module = module!("sampling");

impl Module {
    /// The kernel `name`, loading the module on first use on this device.
    pub(crate) fn function(&self, dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(name, self.name, self.ptx)?
            .into_cuda_function())
    }
}

/// The kernels' name suffix for `dtype`, if they take it.
pub(crate) fn type_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// Whether `t` is on a CUDA device in a dtype the kernels take.
pub(crate) fn on_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && type_name(t.dtype()).is_some()
}

/// Values of `dtype` in one 16-byte load.
pub(crate) fn pack_len(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// Whether `t` is contiguous from a 16-byte aligned start, as the kernels read and write.
pub(crate) fn is_packed(t: &Tensor) -> bool {
    t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

/// `t` as the kernels read it (see [`is_packed`]): `t` itself or a copy.
pub(crate) fn packed(t: &Tensor) -> Result<Tensor> {
    if is_packed(t) {
        Ok(t.clone())
    } else {
        t.force_contiguous()
    }
}

/// For `t` of shape `[tokens, heads, head_dim]`: the distance in values between consecutive
/// tokens' rows, if each row's heads are contiguous and every row starts 16-byte aligned (`t`
/// itself, or a view of some heads of a wider row, like q, k or v of a fused QKV projection).
pub(crate) fn row_stride(t: &Tensor) -> Option<usize> {
    let (dims, strides) = (t.dims(), t.stride());
    let size = t.dtype().size_in_bytes();
    let aligned = |n: usize| (n * size).is_multiple_of(16);
    (dims.len() == 3
        && strides[2] == 1
        && (strides[1] == dims[2] || dims[1] == 1)
        && aligned(strides[0])
        && aligned(t.layout().start_offset()))
    .then_some(strides[0])
}

/// `t` as the kernels read `[tokens, heads, head_dim]` rows (see [`row_stride`]): `t` itself
/// (a view of a fused projection included) or a contiguous copy.
pub(crate) fn rows(t: &Tensor) -> Result<Tensor> {
    match row_stride(t) {
        Some(_) => Ok(t.clone()),
        None => t.force_contiguous(),
    }
}

/// A size as the kernels' `int` parameters take it.
pub(crate) fn int(n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| candle_core::Error::Msg(format!("{n} is past the kernels' i32 range")))
}

/// The device memory of a CUDA tensor from its first element.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("expected a CUDA tensor"),
    }
}

/// A tensor of `shape` over `slice`, which a kernel has just written.
pub(crate) fn tensor<T: CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Runs `$launch::<T>($args)` with `T` the Rust type of the float dtype `$dtype`.
macro_rules! dispatch_float {
    ($dtype:expr, $launch:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $launch::<f32>($($arg),*),
            candle_core::DType::F16 => $launch::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $launch::<half::bf16>($($arg),*),
            dtype => candle_core::bail!("no CUDA kernel for {dtype:?}"),
        }
    };
}
pub(crate) use dispatch_float;
