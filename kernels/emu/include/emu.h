// A CPU stand-in for the CUDA runtime, force-included (g++ -include emu.h) into candela's
// kernels so that their logic can be tested on machines without a GPU (see runtime.cpp).
//
// A launch runs its blocks one after another. Within a block every CUDA thread is a fiber;
// fibers switch only at barriers (__syncthreads, and the warp barriers inside shuffles), so a
// block runs as a GPU runs it whenever the kernel is race-free, and shared memory (`static`
// thread-local here) is simply memory all fibers of the block see. What the hardware leaves undefined and
// this runtime can see (a full-mask shuffle after a lane has exited, a barrier some threads
// never reach) aborts the launch with a message instead of hanging.
#pragma once

// Kernels that use inline PTX take their emulated definitions under this macro.
#define CANDELA_EMU 1

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Per OS thread, so that launches on different threads (parallel tests) do not share it.
#define __shared__ static thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// The running fiber's coordinates, set by the scheduler before it resumes a fiber.
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace candela_emu {
void sync_block();
// Exchanges a 64-bit value across the warp: returns lane `src`'s value (its own when `src` is
// outside the warp). Every lane of the warp must take part.
uint64_t warp_exchange(unsigned mask, uint64_t value, int src);
int lane();
// Every lane of the warp deposits `bytes` (at most 64) from `mine`; each gets all 32 deposits,
// lane by lane, in `all`. Every lane of the warp must take part.
void warp_gather(const void *mine, size_t bytes, void *all);
template <typename T> uint64_t bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffled values fit 64 bits");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> T from_bits(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
} // namespace candela_emu

inline void __syncthreads() { candela_emu::sync_block(); }

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    using namespace candela_emu;
    return from_bits<T>(warp_exchange(mask, bits(v), lane() ^ lane_mask));
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    using namespace candela_emu;
    const int src = lane() - (int)delta;
    return from_bits<T>(warp_exchange(mask, bits(v), src < 0 ? lane() : src));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    using namespace candela_emu;
    const int src = lane() + (int)delta;
    return from_bits<T>(warp_exchange(mask, bits(v), src > 31 ? lane() : src));
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src) {
    using namespace candela_emu;
    return from_bits<T>(warp_exchange(mask, bits(v), src & 31));
}

// Fibers switch only at barriers, so these are atomic as they stand.
inline int atomicMin(int *p, int v) {
    const int old = *p;
    if (v < old) *p = v;
    return old;
}
inline int atomicMax(int *p, int v) {
    const int old = *p;
    if (v > old) *p = v;
    return old;
}
inline int atomicAdd(int *p, int v) {
    const int old = *p;
    *p += v;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
    const unsigned long long old = *p;
    *p += v;
    return old;
}
inline float atomicAdd(float *p, float v) {
    const float old = *p;
    *p += v;
    return old;
}

inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) { return candela_emu::from_bits<unsigned>(candela_emu::bits(f)); }
inline float __uint_as_float(unsigned u) { return candela_emu::from_bits<float>(u); }
inline int __float_as_int(float f) { return candela_emu::from_bits<int>(candela_emu::bits(f)); }
inline float __int_as_float(int i) { return candela_emu::from_bits<float>((uint32_t)i); }
// CUDA's min and max over mixed integer types follow the usual arithmetic conversions.
template <typename A, typename B> inline auto min(A a, B b) -> decltype(a + b) {
    return b < a ? b : a;
}
template <typename A, typename B> inline auto max(A a, B b) -> decltype(a + b) {
    return a < b ? b : a;
}
