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

/// GPU 0 (see [`cuda_device`]) when this build and machine have one, else the CPU.
pub fn cuda_if_available() -> Device {
    if candle_core::utils::cuda_is_available() {
        cuda_device(0).unwrap_or(Device::Cpu)
    } else {
        Device::Cpu
    }
}
