//! Launching the CUDA kernels on the CPU stand-in runtime of `emu/` (the `cuda-emu` feature),
//! for their tests on machines without a GPU. "Device memory" is host memory: a kernel's
//! pointer arguments are the addresses of host buffers.
//!
//! The emulator runs a block's threads as fibers that switch only at barriers, so a kernel that
//! is correct on a GPU gives the same results here; it aborts the process with a message on
//! what it can see is undefined on a GPU (a full-mask shuffle after a lane has exited, a
//! barrier that can never release).

use std::ffi::{c_char, c_int, c_void, CString};

extern "C" {
    fn candela_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// One kernel argument, as the kernel's C signature takes it.
pub(crate) enum Arg {
    Ptr(*const c_void),
    I32(i32),
    U32(u32),
    F32(f32),
}

/// A pointer argument to `buf`'s first element.
pub(crate) fn ptr<T>(buf: &[T]) -> Arg {
    Arg::Ptr(buf.as_ptr().cast())
}

/// A pointer argument the kernel writes through.
pub(crate) fn ptr_mut<T>(buf: &mut [T]) -> Arg {
    Arg::Ptr(buf.as_mut_ptr().cast_const().cast())
}

/// Runs kernel `name` over `grid` blocks of `block` threads; panics if there is no such kernel.
pub(crate) fn launch(name: &str, grid: [u32; 3], block: [u32; 3], args: &[Arg]) {
    // Each argument's value in its C type, then cuLaunchKernel-style pointers to them.
    let mut values: Vec<[u8; 8]> = args
        .iter()
        .map(|a| {
            let mut v = [0u8; 8];
            match *a {
                Arg::Ptr(p) => v.copy_from_slice(&(p as usize).to_ne_bytes()),
                Arg::I32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                Arg::U32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                Arg::F32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
            }
            v
        })
        .collect();
    let mut pointers: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr().cast()).collect();
    let name_c = CString::new(name).expect("kernel names have no NUL");
    let mut error = [0 as c_char; 256];
    // SAFETY: `pointers` points at one value per argument, alive for the call; the caller
    // passes the kernel's arguments in its signature's order and types, and buffers large
    // enough for what the kernel reads and writes.
    let rc = unsafe {
        candela_emu_launch(
            name_c.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            pointers.as_mut_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the runtime wrote a NUL-terminated message into `error`.
        let msg = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
        panic!("{name}: {}", msg.to_string_lossy());
    }
}
