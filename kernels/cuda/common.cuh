// Helpers shared by candela's kernels: dtype conversions, 16-byte packs and warp reductions.
//
// Every kernel moves global memory in 16-byte packs (8 bf16/f16 or 4 f32 values) and computes
// in f32; the host checks that rows are whole packs and 16-byte aligned before launching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace candela {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Values of T in a 16-byte pack.
template <typename T> __host__ __device__ constexpr int pack_len() { return 16 / sizeof(T); }

// Widens a pack of T to floats. `raw` is taken by value, a register copy, so that a load into
// it stays one 16-byte load (read through a reference, each value would be loaded on its own).
template <typename T>
__device__ __forceinline__ void unpack(const uint4 raw, float *dst) {
    const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < pack_len<T>(); ++i) dst[i] = to_float(v[i]);
}

// Narrows floats to a pack of T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint4 pack(const float *src) {
    uint4 raw;
    T *v = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < pack_len<T>(); ++i) v[i] = from_float<T>(src[i]);
    return raw;
}

template <typename T>
__device__ __forceinline__ void load_pack(const T *src, float *dst) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(src);
    unpack<T>(raw, dst);
}

template <typename T>
__device__ __forceinline__ void store_pack(T *dst, const float *src) {
    *reinterpret_cast<uint4 *>(dst) = pack<T>(src);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Every kernel calls this before it touches global memory. On sm_90 and later the host launches
// the kernels as programmatic dependent launches (`dependent_launch` in src/cuda.rs): a kernel's
// blocks may become resident while the kernel before it in the stream is still finishing, and
// `griddepcontrol.wait` holds each thread until that kernel has completed and its writes are
// visible. `launch_dependents` then lets the kernel after this one be scheduled likewise, once
// every block of this one has begun. Where the PTX targets an older GPU, the host launches
// plainly and both are left out. Only prefetches may come before it (the skinny GEMM warms L2
// with its first weights there; build.rs rejects any other memory access before the wait in the
// PTX), and some thread of every launch must reach it: the wait of the kernel after a grid that
// all exited early would cover that grid alone, not the ones before it.
__device__ __forceinline__ void begin_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for the line holding `p`: a hint that writes no register and that nothing waits for.
__device__ __forceinline__ void prefetch_l2(const void *p) {
#if defined(__CUDA_ARCH__)
    asm volatile("prefetch.L2 [%0];" ::"l"(p));
#else
    (void)p;
#endif
}

} // namespace candela

// Instantiates `KERNEL(NAME_SUFFIX, TYPE)` for the three float types the kernels take.
#define CANDELA_FOR_FLOAT_TYPES(KERNEL)                                                          \
    KERNEL(f32, float)                                                                           \
    KERNEL(f16, __half)                                                                          \
    KERNEL(bf16, __nv_bfloat16)
