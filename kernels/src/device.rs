//! Opening a GPU for the engine.

use candle_core::{Device, Result};

/// GPU `ordinal`, with one CUDA stream of its own that every host thread launches into.
///
/// candle's `Device::new_cuda` launches into the per-thread default stream, so work from two host
/// threads runs unordered: a forward pass launched from a worker of the compute pool and the
/// sampling launched after it from the engine thread could overlap, and memory freed by one
/// thread could be handed out again while the other thread's stream still used it. With one
/// stream, host order is device order: a tensor handed to another thread is complete by the time
/// the work launched after it runs. Since nothing runs on another stream, cudarc's per-launch
/// event tracking between streams is turned off (it would record events for every argument of
/// every launch).
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: no tensor of this device is used on another stream: candela launches only
        // into the device's own stream, from whichever thread.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// Lets `device`'s memory pool keep the memory the engine frees, rather than hand it back to the
/// driver: call once every KV cache is allocated (they are sized from the free memory).
///
/// cudarc allocates from the device's default pool (`cuMemAllocAsync`), whose release threshold
/// is 0: at every synchronization (one per step, when the sampled ids come back) the pool returns
/// all the memory it holds free, so the next step maps its activations afresh. With no threshold
/// the pool keeps what the busiest step needed. `CANDELA_KEEP_FREED_MEMORY=0` leaves the default,
/// for an A/B. Nothing to do on the CPU.
pub fn keep_freed_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use candle_core::cuda::cudarc::driver::{result, sys};
        if std::env::var("CANDELA_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0") {
            return Ok(());
        }
        let ctx = cuda.cuda_stream().context().clone();
        if !ctx.has_async_alloc() {
            return Ok(());
        }
        let pool = default_pool(cuda)?;
        let mut threshold = u64::MAX;
        // SAFETY: the pool is the live context's; the attribute takes a u64.
        unsafe {
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .map_err(candle_core::Error::wrap)?;
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

/// The memory pool that `cuMemAllocAsync` (cudarc's allocations) takes from on `cuda`'s device.
#[cfg(feature = "cuda")]
fn default_pool(
    cuda: &candle_core::CudaDevice,
) -> Result<candle_core::cuda::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda::cudarc::driver::result;
    let ctx = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    // SAFETY: the device comes from a live context.
    unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
        .map_err(candle_core::Error::wrap)
}

/// GPU 0 (see [`cuda_device`]) when this build and machine have one, else the CPU.
pub fn cuda_if_available() -> Device {
    if candle_core::utils::cuda_is_available() {
        cuda_device(0).unwrap_or(Device::Cpu)
    } else {
        Device::Cpu
    }
}

/// Memory free for new allocations on `device`, in bytes: the kernel's `MemAvailable` on the CPU,
/// the driver's free device memory on a GPU. None where it cannot be read.
///
/// On a GPU the memory pool first hands back what it holds unused: what loading freed (random
/// f32 matrices of the dummy format, unstacked projections) would otherwise count as taken until
/// the next synchronization, or for good once [`keep_freed_memory`] has run for an earlier model,
/// and the KV cache sized from this would come out gigabytes smaller.
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let ctx = cuda.cuda_stream().context().clone();
            if ctx.has_async_alloc() && cuda.cuda_stream().synchronize().is_ok() {
                if let Ok(pool) = default_pool(cuda) {
                    // SAFETY: the pool is the live context's; the stream is idle, so every
                    // block freed into the pool is unused.
                    let _ = unsafe {
                        candle_core::cuda::cudarc::driver::result::mem_pool::trim_to(pool, 0)
                    };
                }
            }
            let (free, _total) = ctx.mem_get_info().ok()?;
            Some(free as u64)
        }
        _ => None,
    }
}
