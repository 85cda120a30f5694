// RMSNorm, alone or after a residual add (see src/norm.rs for the launch). Same numerics as
// candle_nn::ops::rms_norm: f32 sum of squares, x * rsqrt(mean + eps) * weight rounded once.
#include "common.cuh"

using namespace candela;

namespace {

// Packs per thread held in registers: rows up to 4 * 1024 packs (32768 bf16 values).
constexpr int MAX_PACKS = 4;

__device__ __forceinline__ float block_sum(float x) {
    __shared__ float partial[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    x = warp_sum(x);
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    x = lane < blockDim.x / 32 ? partial[lane] : 0.f;
    return warp_sum(x);
}

// Grid: rows; block: a multiple of 32 threads, at least hidden / (MAX_PACKS * pack) of them.
// With ADD, x + residual (rounded to T, as a separate add would) is normalised and also
// written to sum_out.
template <typename T, bool ADD>
__device__ __forceinline__ void rms_norm(T *__restrict__ out, T *__restrict__ sum_out,
                                         const T *__restrict__ x, const T *__restrict__ residual,
                                         const T *__restrict__ weight, int hidden, float eps) {
    constexpr int VEC = pack_len<T>();
    const size_t base = (size_t)blockIdx.x * hidden;
    const int packs = hidden / VEC;
    float v[MAX_PACKS][VEC];
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_PACKS; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c >= packs) break;
        load_pack(x + base + c * VEC, v[i]);
        if (ADD) {
            float r[VEC];
            load_pack(residual + base + c * VEC, r);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[i][e] += r[e];
            const uint4 rounded = pack<T>(v[i]);
            *reinterpret_cast<uint4 *>(sum_out + base + c * VEC) = rounded;
            unpack<T>(rounded, v[i]);
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) squares += v[i][e] * v[i][e];
    }
    const float scale = rsqrtf(block_sum(squares) / hidden + eps);
#pragma unroll
    for (int i = 0; i < MAX_PACKS; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c >= packs) break;
        float w[VEC];
        load_pack(weight + c * VEC, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[i][e] = scale * v[i][e] * w[e];
        store_pack(out + base + c * VEC, v[i]);
    }
}

} // namespace

#define RMS_NORM(NAME, TYPE)                                                                       \
    extern "C" __global__ void __launch_bounds__(1024)                                             \
        rms_norm_##NAME(TYPE *out, const TYPE *x, const TYPE *weight, int hidden, float eps) {     \
        begin_kernel();                                                                            \
        rms_norm<TYPE, false>(out, nullptr, x, nullptr, weight, hidden, eps);                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024)                                             \
        add_rms_norm_##NAME(TYPE *out, TYPE *sum_out, const TYPE *x, const TYPE *residual,         \
                            const TYPE *weight, int hidden, float eps) {                           \
        begin_kernel();                                                                            \
        rms_norm<TYPE, true>(out, sum_out, x, residual, weight, hidden, eps);                      \
    }

CANDELA_FOR_FLOAT_TYPES(RMS_NORM)
