// SiLU-and-multiply, the SwiGLU gate of Llama-style MLPs (see src/activation.rs):
// out = silu(a) * b computed in f32.
#include "common.cuh"

using namespace candela;

// Grid-stride over packs. a, b: [rows, n] with row strides a_stride, b_stride (in values), so the
// fused form reads the halves of one [rows, 2n] tensor; out: [rows, n]. n is a whole number of
// packs.
template <typename T>
__device__ __forceinline__ void silu_mul(T *__restrict__ out, const T *__restrict__ a,
                                         const T *__restrict__ b, int rows, int n, int a_stride,
                                         int b_stride) {
    constexpr int VEC = pack_len<T>();
    const int per_row = n / VEC;
    const size_t total = (size_t)rows * per_row;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < total;
         u += (size_t)gridDim.x * blockDim.x) {
        const size_t row = u / per_row;
        const int i = (u % per_row) * VEC;
        float x[VEC], y[VEC];
        load_pack(a + row * a_stride + i, x);
        load_pack(b + row * b_stride + i, y);
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = x[e] / (1.f + __expf(-x[e])) * y[e];
        store_pack(out + row * n + i, x);
    }
}

#define SILU_MUL(NAME, TYPE)                                                                       \
    extern "C" __global__ void silu_mul_##NAME(TYPE *out, const TYPE *a, const TYPE *b,           \
                                               int rows, int n, int a_stride, int b_stride) {     \
        begin_kernel();                                                                           \
        silu_mul<TYPE>(out, a, b, rows, n, a_stride, b_stride);                                   \
    }

CANDELA_FOR_FLOAT_TYPES(SILU_MUL)
