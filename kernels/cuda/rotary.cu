// Rotary position embedding of queries and keys in one launch (see src/rotary.rs).
//
// Each token has its own cos/sin row ([tokens, head_dim / 2], f32), so ragged batches need no
// position bookkeeping here. Two layouts of the rotated pairs:
//   half-split (Hugging Face, `rotary_emb::rope`): (x[i], x[i + head_dim / 2]);
//   interleaved (GGUF, `rotary_emb::rope_i`):      (x[2i], x[2i + 1]).
#include "common.cuh"

using namespace candela;

// Grid: tokens; block: any. A thread takes a pack of one head at a time: in the half-split
// layout a pack of the first half and the matching pack of the second, interleaved a pack of
// pairs. q, k: [tokens, heads or kv_heads, head_dim], a token's row `q_stride` / `k_stride`
// values after the previous one (views into a fused QKV projection); outputs contiguous.
template <typename T, bool INTERLEAVED>
__device__ __forceinline__ void rotary(T *__restrict__ q_out, T *__restrict__ k_out,
                                       const T *__restrict__ q, const T *__restrict__ k,
                                       const float *__restrict__ cos, const float *__restrict__ sin,
                                       int heads, int kv_heads, int head_dim, int q_stride,
                                       int k_stride) {
    constexpr int VEC = pack_len<T>();
    const int tok = blockIdx.x, half = head_dim / 2;
    const int per_head = (INTERLEAVED ? head_dim : half) / VEC;
    const float *c = cos + (size_t)tok * half, *s = sin + (size_t)tok * half;
    for (int u = threadIdx.x; u < (heads + kv_heads) * per_head; u += blockDim.x) {
        const int head = u / per_head, i = (u % per_head) * VEC;
        const bool is_q = head < heads;
        const int h = is_q ? head : head - heads;
        const T *src = is_q ? q + (size_t)tok * q_stride + (size_t)h * head_dim
                            : k + (size_t)tok * k_stride + (size_t)h * head_dim;
        T *dst = is_q ? q_out + ((size_t)tok * heads + h) * head_dim
                      : k_out + ((size_t)tok * kv_heads + h) * head_dim;
        if (INTERLEAVED) {
            float x[VEC];
            load_pack(src + i, x);
#pragma unroll
            for (int e = 0; e < VEC; e += 2) {
                const float a = x[e], b = x[e + 1], ce = c[(i + e) / 2], se = s[(i + e) / 2];
                x[e] = a * ce - b * se;
                x[e + 1] = a * se + b * ce;
            }
            store_pack(dst + i, x);
        } else {
            float x1[VEC], x2[VEC];
            load_pack(src + i, x1);
            load_pack(src + half + i, x2);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float a = x1[e], b = x2[e], ce = c[i + e], se = s[i + e];
                x1[e] = a * ce - b * se;
                x2[e] = a * se + b * ce;
            }
            store_pack(dst + i, x1);
            store_pack(dst + half + i, x2);
        }
    }
}

#define ROTARY(NAME, TYPE)                                                                         \
    extern "C" __global__ void rotary_##NAME(                                                     \
        TYPE *q_out, TYPE *k_out, const TYPE *q, const TYPE *k, const float *cos,                 \
        const float *sin, int heads, int kv_heads, int head_dim, int q_stride, int k_stride) {    \
        rotary<TYPE, false>(q_out, k_out, q, k, cos, sin, heads, kv_heads, head_dim, q_stride,    \
                            k_stride);                                                             \
    }                                                                                              \
    extern "C" __global__ void rotary_interleaved_##NAME(                                         \
        TYPE *q_out, TYPE *k_out, const TYPE *q, const TYPE *k, const float *cos,                 \
        const float *sin, int heads, int kv_heads, int head_dim, int q_stride, int k_stride) {    \
        rotary<TYPE, true>(q_out, k_out, q, k, cos, sin, heads, kv_heads, head_dim, q_stride,     \
                           k_stride);                                                              \
    }

CANDELA_FOR_FLOAT_TYPES(ROTARY)
