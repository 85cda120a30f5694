// Matrix products with few rows (see src/matmul.rs): y = x · wᵀ for x [m, k] with m at most
// SKINNY_MAX_ROWS (decode steps of a few sequences) and w [n, k], row-major as checkpoints store
// linear layers. Such a product is bound by reading w once: each warp streams whole rows of w
// in 16-byte packs, several packs in flight per lane, and multiplies each pack by the m rows of
// x (small, served from L1/L2). f32 accumulation, one warp reduction per output.
#include "common.cuh"

using namespace candela;

// Rows of x a launch takes (one accumulator per row and output column in every lane).
constexpr int SKINNY_MAX_ROWS = 8;
constexpr int SKINNY_WARPS = 4;

// Two shapes of the same kernel, both with eight 16-byte loads of w in flight per lane:
// COLS output columns (rows of w) per warp, each load of x serving all of them, and UNROLL packs
// of each of those rows loaded before they are used. Up to 4 rows of x, 2 columns by 4 packs
// (more warps to hide the loads); past that the work per byte of w (an f32 FMA per value and
// row, plus widening x) would leave the SM issue-bound, so 4 columns by 2 packs widen each pack
// of x once for twice the columns. The host picks (`skinny_shape` in src/matmul.rs).
//
// Block b's warp v computes columns [(b * SKINNY_WARPS + v) * COLS, +COLS) for every row of x.
// y: [m, n] contiguous; x: m rows of k values, x_stride apart; w: [n, k] contiguous. k is a
// whole number of packs and every row starts 16-byte aligned.
//
// SILU: w stacks a gate projection over an up projection (n = 2 * half rows) and y is
// silu(gate) * up, [m, half]: warp v takes outputs [(b * SKINNY_WARPS + v) * COLS / 2, +COLS / 2)
// and the gate and up rows of each, so the MLP's activation needs no launch of its own.
template <typename T, int SKINNY_COLS, int SKINNY_UNROLL, bool SILU>
__device__ __forceinline__ void skinny_gemm(T *__restrict__ y, const T *__restrict__ x,
                                            const T *__restrict__ w, int m, int n, int k,
                                            int x_stride) {
    constexpr int VEC = pack_len<T>();
    constexpr int OUTS = SILU ? SKINNY_COLS / 2 : SKINNY_COLS; // outputs per warp
    static_assert(!SILU || SKINNY_COLS % 2 == 0, "a gate and an up row per output");
    const int lane = threadIdx.x % 32;
    const int width = SILU ? n / 2 : n; // of y
    const int out0 = (blockIdx.x * SKINNY_WARPS + threadIdx.x / 32) * OUTS;
    // The whole warp leaves, so that its shuffles below stay full; warp 0 of block 0 always has
    // work, so the launch reaches begin_kernel (see common.cuh).
    if (out0 >= width) return;
    const int packs = k / VEC;
    // Outputs past the width read the last row again and are not written.
    const T *rows[SKINNY_COLS];
#pragma unroll
    for (int c = 0; c < SKINNY_COLS; ++c) {
        const int out = min(out0 + c % OUTS, width - 1);
        rows[c] = w + (size_t)(SILU && c >= OUTS ? width + out : out) * k;
    }
    // While the kernel before (which writes x) finishes, the first packs of w this warp will load
    // are fetched into L2: a prefetch only warms the cache, so it may precede the wait.
#pragma unroll
    for (int u = 0; u < SKINNY_UNROLL; ++u) {
        const int p = lane + u * 32;
#pragma unroll
        for (int c = 0; c < SKINNY_COLS; ++c)
            if (p < packs) prefetch_l2(rows[c] + (size_t)p * VEC);
    }
    begin_kernel();

    float acc[SKINNY_COLS][SKINNY_MAX_ROWS];
#pragma unroll
    for (int c = 0; c < SKINNY_COLS; ++c)
#pragma unroll
        for (int r = 0; r < SKINNY_MAX_ROWS; ++r) acc[c][r] = 0.f;

    for (int base = lane; base < packs; base += 32 * SKINNY_UNROLL) {
        uint4 wv[SKINNY_UNROLL][SKINNY_COLS];
#pragma unroll
        for (int u = 0; u < SKINNY_UNROLL; ++u) {
            const int p = base + u * 32;
#pragma unroll
            for (int c = 0; c < SKINNY_COLS; ++c)
                wv[u][c] = p < packs ? *reinterpret_cast<const uint4 *>(rows[c] + (size_t)p * VEC)
                                     : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < SKINNY_UNROLL; ++u) {
            const int p = base + u * 32;
            if (p >= packs) break;
            float wf[SKINNY_COLS][VEC];
#pragma unroll
            for (int c = 0; c < SKINNY_COLS; ++c) unpack<T>(wv[u][c], wf[c]);
#pragma unroll
            for (int r = 0; r < SKINNY_MAX_ROWS; ++r) {
                if (r >= m) break;
                float xf[VEC];
                load_pack(x + (size_t)r * x_stride + (size_t)p * VEC, xf);
#pragma unroll
                for (int c = 0; c < SKINNY_COLS; ++c)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[c][r] = fmaf(wf[c][e], xf[e], acc[c][r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SKINNY_MAX_ROWS; ++r) {
        if (r >= m) break;
#pragma unroll
        for (int c = 0; c < OUTS; ++c) {
            float sum = warp_sum(acc[c][r]);
            if (SILU) sum = sum / (1.f + __expf(-sum)) * warp_sum(acc[c + OUTS][r]);
            if (lane == 0 && out0 + c < width)
                y[(size_t)r * width + out0 + c] = from_float<T>(sum);
        }
    }
}

#define SKINNY_GEMM(NAME, TYPE)                                                                    \
    extern "C" __global__ void __launch_bounds__(SKINNY_WARPS * 32)                                \
        skinny_gemm_##NAME(TYPE *y, const TYPE *x, const TYPE *w, int m, int n, int k,             \
                           int x_stride) {                                                         \
        skinny_gemm<TYPE, 2, 4, false>(y, x, w, m, n, k, x_stride);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(SKINNY_WARPS * 32)                                \
        skinny_gemm_wide_##NAME(TYPE *y, const TYPE *x, const TYPE *w, int m, int n, int k,        \
                                int x_stride) {                                                    \
        skinny_gemm<TYPE, 4, 2, false>(y, x, w, m, n, k, x_stride);                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(SKINNY_WARPS * 32)                                \
        skinny_gemm_silu_##NAME(TYPE *y, const TYPE *x, const TYPE *w, int m, int n, int k,        \
                                int x_stride) {                                                    \
        skinny_gemm<TYPE, 2, 4, true>(y, x, w, m, n, k, x_stride);                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(SKINNY_WARPS * 32)                                \
        skinny_gemm_wide_silu_##NAME(TYPE *y, const TYPE *x, const TYPE *w, int m, int n, int k,   \
                                     int x_stride) {                                               \
        skinny_gemm<TYPE, 4, 2, true>(y, x, w, m, n, k, x_stride);                                \
    }

CANDELA_FOR_FLOAT_TYPES(SKINNY_GEMM)
