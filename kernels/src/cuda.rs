//! Launch plumbing shared by the CUDA kernels: the PTX that build.rs compiled from `cuda/*.cu`,
//! typed device views of tensors, and tensors over freshly written device memory.
//!
//! The kernels read and write 16 bytes at a time, so their operands go through [`packed`] first.

use std::collections::HashSet;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::cuda::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, SyncOnDrop,
};
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
    pub(crate) fn function(&self, dev: &CudaDevice, name: &str) -> Result<Kernel> {
        let func = dev
            .get_or_load_custom_func(name, self.name, self.ptx)?
            .into_cuda_function();
        Ok(Kernel {
            func,
            name: name.to_string(),
        })
    }
}

/// A loaded kernel and its name (for errors).
pub(crate) struct Kernel {
    func: CudaFunction,
    name: String,
}

/// The virtual architecture the PTX was built for (`CUDA_COMPUTE_CAP` at build time), e.g. 90.
pub(crate) fn ptx_arch() -> u32 {
    env!("CANDELA_CUDA_ARCH").parse().unwrap_or(0)
}

/// Whether candela's kernels launch as programmatic dependent launches: the PTX was built for
/// sm_90 or later (so every kernel starts with `griddepcontrol.wait`, see `begin_kernel` in
/// cuda/common.cuh, and runs only on GPUs that have it) and `CANDELA_PDL` is not `0`.
///
/// A kernel so launched may be scheduled while the kernel before it in the stream is still
/// finishing: its blocks become resident as the other's drain, and wait, before touching any
/// memory, until that kernel has completed and its writes are visible. The launch latency and
/// ramp of each kernel (some microseconds, against a decode step's few hundred launches) hide
/// behind the tail of the one before, and the skinny GEMM meanwhile prefetches its first
/// weights into L2.
///
/// Should the driver refuse the attribute, the launch is retried without it and no later launch
/// asks for it (with a note on stderr).
pub(crate) fn dependent_launch() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| {
        ptx_arch() >= 90 && std::env::var("CANDELA_PDL").map_or(true, |v| v != "0")
    });
    enabled && !PDL_REFUSED.load(Ordering::Relaxed)
}

static PDL_REFUSED: AtomicBool = AtomicBool::new(false);

/// One launch of a candela kernel, built like cudarc's `LaunchArgs` (the same `arg` calls, in the
/// kernel's parameter order) and launched with `cuLaunchKernelEx`, so that it can carry the
/// programmatic-dependent-launch attribute (see [`dependent_launch`]).
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    kernel: &'a Kernel,
    /// Each parameter's bytes (all of candela's parameters are pointers or 4-byte scalars).
    values: Vec<u64>,
    /// Each parameter's size in bytes, checked against the kernel's (see [`check_params`]).
    sizes: Vec<usize>,
    /// Held until the launch is queued: with cudarc's event tracking on, they record the
    /// kernel's reads and writes on drop.
    guards: Vec<SyncOnDrop<'a>>,
}

/// A kernel parameter: a device buffer or a scalar.
pub(crate) trait KernelArg<'a> {
    fn push(self, launch: &mut Launch<'a>);
}

impl<'a, T> KernelArg<'a> for &'a CudaSlice<T> {
    fn push(self, launch: &mut Launch<'a>) {
        let (ptr, guard) = self.device_ptr(launch.stream);
        launch.push_pointer(ptr, guard);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaSlice<T> {
    fn push(self, launch: &mut Launch<'a>) {
        let (ptr, guard) = self.device_ptr_mut(launch.stream);
        launch.push_pointer(ptr, guard);
    }
}

impl<'a, T> KernelArg<'a> for &'a CudaView<'_, T> {
    fn push(self, launch: &mut Launch<'a>) {
        let (ptr, guard) = self.device_ptr(launch.stream);
        launch.push_pointer(ptr, guard);
    }
}

impl<'a, T> KernelArg<'a> for &'a mut CudaViewMut<'_, T> {
    fn push(self, launch: &mut Launch<'a>) {
        let (ptr, guard) = self.device_ptr_mut(launch.stream);
        launch.push_pointer(ptr, guard);
    }
}

macro_rules! scalar_arg {
    ($($ty:ty),*) => {$(
        impl<'a> KernelArg<'a> for &$ty {
            fn push(self, launch: &mut Launch<'a>) {
                let mut value = 0u64;
                // SAFETY: a value of at most 8 bytes into the start of a u64 (the kernel reads
                // the parameter's size from the address it is given).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (self as *const $ty).cast::<u8>(),
                        (&mut value as *mut u64).cast::<u8>(),
                        size_of::<$ty>(),
                    )
                };
                launch.values.push(value);
                launch.sizes.push(size_of::<$ty>());
            }
        }
    )*};
}
scalar_arg!(i32, u32, f32, u64);

impl<'a> Launch<'a> {
    pub(crate) fn new(stream: &'a CudaStream, kernel: &'a Kernel) -> Self {
        Self {
            stream,
            kernel,
            values: Vec::with_capacity(16),
            sizes: Vec::with_capacity(16),
            guards: Vec::with_capacity(16),
        }
    }

    fn push_pointer(&mut self, ptr: sys::CUdeviceptr, guard: SyncOnDrop<'a>) {
        self.values.push(ptr);
        self.sizes.push(size_of::<sys::CUdeviceptr>());
        self.guards.push(guard);
    }

    /// The next parameter.
    pub(crate) fn arg(&mut self, arg: impl KernelArg<'a>) -> &mut Self {
        arg.push(self);
        self
    }

    /// Queues the kernel on the stream. A grid of no blocks (an empty batch) queues nothing,
    /// as there is nothing to do: the driver would refuse it.
    ///
    /// # Safety
    /// The parameters must match the kernel's in number, order and type, and the kernel must
    /// stay within the memory they give it.
    pub(crate) unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<()> {
        let (x, y, z) = cfg.grid_dim;
        if x == 0 || y == 0 || z == 0 {
            return Ok(());
        }
        let mut params: Vec<*mut c_void> = self
            .values
            .iter_mut()
            .map(|v| (v as *mut u64).cast())
            .collect();
        // SAFETY: zeroed is a valid CUlaunchAttribute (a plain C struct).
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let mut config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(dependent_launch()),
        };
        self.stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let func = self.kernel.func.cu_function();
        check_params(func, &self.sizes)
            .map_err(|e| e.context(format!("launching {}", self.kernel.name)))?;
        // SAFETY: the function and stream are live; `params` points at one value per kernel
        // parameter (the caller's contract), all alive until the call returns.
        let launch = |config: &sys::CUlaunchConfig, params: &mut [*mut c_void]| unsafe {
            sys::cuLaunchKernelEx(config, func, params.as_mut_ptr(), std::ptr::null_mut()).result()
        };
        let result = launch(&config, &mut params);
        let refused = |e: &DriverError| {
            matches!(
                e.0,
                sys::cudaError_enum::CUDA_ERROR_NOT_SUPPORTED
                    | sys::cudaError_enum::CUDA_ERROR_INVALID_VALUE
            )
        };
        match result {
            // A refused launch queued nothing: if it goes plainly, the attribute was the cause.
            Err(e) if config.numAttrs > 0 && refused(&e) => {
                config.numAttrs = 0;
                launch(&config, &mut params).map_err(|_| self.error(e))?;
                if !PDL_REFUSED.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "candela-kernels: the driver refused programmatic dependent launches \
                         ({e}); launching kernels plainly"
                    );
                }
                Ok(())
            }
            result => result.map_err(|e| self.error(e)),
        }
    }

    fn error(&self, e: DriverError) -> candle_core::Error {
        candle_core::Error::wrap(e).context(format!("launching {}", self.kernel.name))
    }
}

/// Checks, at the first launch of each kernel, that the launch passes as many parameters as the
/// kernel takes, each of its size: a mismatch would otherwise read garbage on the device. Needs a
/// driver of CUDA 12.4 or later (`cuFuncGetParamInfo`); older ones are not asked.
fn check_params(func: sys::CUfunction, sizes: &[usize]) -> Result<()> {
    static CHECKED: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(Default::default);
    if checked
        .lock()
        .expect("not poisoned")
        .contains(&(func as usize))
    {
        return Ok(());
    }
    let mut version = 0;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(candle_core::Error::wrap)?;
    if version >= 12040 {
        let param_size = |index: usize| {
            let (mut offset, mut size) = (0usize, 0usize);
            // SAFETY: a live function; writes two usize.
            unsafe { sys::cuFuncGetParamInfo(func, index, &mut offset, &mut size) }
                .result()
                .ok()
                .map(|()| size)
        };
        for (index, &passed) in sizes.iter().enumerate() {
            match param_size(index) {
                Some(size) if size == passed => {}
                Some(size) => candle_core::bail!(
                    "parameter {index} takes {size} bytes, the launch passes {passed}"
                ),
                None => {
                    candle_core::bail!("{} parameters passed to a kernel of {index}", sizes.len())
                }
            }
        }
        if param_size(sizes.len()).is_some() {
            candle_core::bail!("{} parameters passed to a kernel of more", sizes.len());
        }
    }
    checked.lock().expect("not poisoned").insert(func as usize);
    Ok(())
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
