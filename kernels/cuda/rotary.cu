// Rotary position embedding of queries and keys in one launch (see src/rotary.rs), and the same
// fused with the KV-cache write: rotated keys and the values go straight to their cache slots.
//
// Each token has its own cos/sin row ([tokens, head_dim / 2], f32), so ragged batches need no
// position bookkeeping here. Two layouts of the rotated pairs:
//   half-split (Hugging Face, `rotary_emb::rope`): (x[i], x[i + head_dim / 2]);
//   interleaved (GGUF, `rotary_emb::rope_i`):      (x[2i], x[2i + 1]).
#include "common.cuh"

using namespace candela;

// One token, by the whole CTA. A thread takes a pack of one head at a time: in the half-split
// layout a pack of the first half and the matching pack of the second, interleaved a pack of
// pairs. q, k: the token's heads, contiguous ([heads or kv_heads, head_dim]); c, s: its cos and
// sin rows; q_out, k_out: where its rotated heads go, contiguous; a null k_out drops the keys.
template <typename T, bool INTERLEAVED>
__device__ __forceinline__ void rotate_token(T *__restrict__ q_out, T *__restrict__ k_out,
                                             const T *__restrict__ q, const T *__restrict__ k,
                                             const float *__restrict__ c,
                                             const float *__restrict__ s, int heads,
                                             int kv_heads, int head_dim) {
    constexpr int VEC = pack_len<T>();
    const int half = head_dim / 2;
    const int per_head = (INTERLEAVED ? head_dim : half) / VEC;
    const int units = (heads + (k_out ? kv_heads : 0)) * per_head;
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        const int head = u / per_head, i = (u % per_head) * VEC;
        const bool is_q = head < heads;
        const size_t at = (size_t)(is_q ? head : head - heads) * head_dim;
        const T *src = (is_q ? q : k) + at;
        T *dst = (is_q ? q_out : k_out) + at;
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

// Grid: tokens; block: any. q, k: [tokens, heads or kv_heads, head_dim], a token's row
// `q_stride` / `k_stride` values after the previous one (views into a fused QKV projection);
// outputs contiguous.
template <typename T, bool INTERLEAVED>
__device__ __forceinline__ void rotary(T *__restrict__ q_out, T *__restrict__ k_out,
                                       const T *__restrict__ q, const T *__restrict__ k,
                                       const float *__restrict__ cos, const float *__restrict__ sin,
                                       int heads, int kv_heads, int head_dim, int q_stride,
                                       int k_stride) {
    const size_t tok = blockIdx.x, half = head_dim / 2;
    rotate_token<T, INTERLEAVED>(q_out + tok * heads * head_dim, k_out + tok * kv_heads * head_dim,
                                 q + tok * q_stride, k + tok * k_stride, cos + tok * half,
                                 sin + tok * half, heads, kv_heads, head_dim);
}

// Grid: tokens; block: any. As `rotary`, but the rotated keys and the values (v: rows `v_stride`
// apart) are written to the token's slot of k_cache and v_cache ([num_slots, kv_heads *
// head_dim]) instead of an output. A slot past the caches writes neither, as in cache.cu.
template <typename T, bool INTERLEAVED>
__device__ __forceinline__ void rotary_cache(T *__restrict__ q_out, T *__restrict__ k_cache,
                                             T *__restrict__ v_cache, const T *__restrict__ q,
                                             const T *__restrict__ k, const T *__restrict__ v,
                                             const float *__restrict__ cos,
                                             const float *__restrict__ sin,
                                             const uint32_t *__restrict__ slots, int heads,
                                             int kv_heads, int head_dim, int q_stride,
                                             int k_stride, int v_stride, uint32_t num_slots) {
    const size_t tok = blockIdx.x, half = head_dim / 2, row_len = (size_t)kv_heads * head_dim;
    const uint32_t slot = slots[tok];
    const bool cached = slot < num_slots;
    rotate_token<T, INTERLEAVED>(q_out + tok * heads * head_dim,
                                 cached ? k_cache + slot * row_len : nullptr, q + tok * q_stride,
                                 k + tok * k_stride, cos + tok * half, sin + tok * half, heads,
                                 kv_heads, head_dim);
    if (!cached) return;
    const uint4 *src = reinterpret_cast<const uint4 *>(v + tok * v_stride);
    uint4 *dst = reinterpret_cast<uint4 *>(v_cache + slot * row_len);
    for (int i = threadIdx.x; i < (int)(row_len / pack_len<T>()); i += blockDim.x) dst[i] = src[i];
}

#define ROTARY(NAME, TYPE)                                                                         \
    extern "C" __global__ void rotary_##NAME(                                                     \
        TYPE *q_out, TYPE *k_out, const TYPE *q, const TYPE *k, const float *cos,                 \
        const float *sin, int heads, int kv_heads, int head_dim, int q_stride, int k_stride) {    \
        begin_kernel();                                                                           \
        rotary<TYPE, false>(q_out, k_out, q, k, cos, sin, heads, kv_heads, head_dim, q_stride,    \
                            k_stride);                                                             \
    }                                                                                              \
    extern "C" __global__ void rotary_interleaved_##NAME(                                         \
        TYPE *q_out, TYPE *k_out, const TYPE *q, const TYPE *k, const float *cos,                 \
        const float *sin, int heads, int kv_heads, int head_dim, int q_stride, int k_stride) {    \
        begin_kernel();                                                                           \
        rotary<TYPE, true>(q_out, k_out, q, k, cos, sin, heads, kv_heads, head_dim, q_stride,     \
                           k_stride);                                                              \
    }                                                                                              \
    extern "C" __global__ void rotary_cache_##NAME(                                               \
        TYPE *q_out, TYPE *k_cache, TYPE *v_cache, const TYPE *q, const TYPE *k, const TYPE *v,   \
        const float *cos, const float *sin, const uint32_t *slots, int heads, int kv_heads,       \
        int head_dim, int q_stride, int k_stride, int v_stride, uint32_t num_slots) {             \
        begin_kernel();                                                                           \
        rotary_cache<TYPE, false>(q_out, k_cache, v_cache, q, k, v, cos, sin, slots, heads,       \
                                  kv_heads, head_dim, q_stride, k_stride, v_stride, num_slots);   \
    }                                                                                              \
    extern "C" __global__ void rotary_interleaved_cache_##NAME(                                   \
        TYPE *q_out, TYPE *k_cache, TYPE *v_cache, const TYPE *q, const TYPE *k, const TYPE *v,   \
        const float *cos, const float *sin, const uint32_t *slots, int heads, int kv_heads,       \
        int head_dim, int q_stride, int k_stride, int v_stride, uint32_t num_slots) {             \
        begin_kernel();                                                                           \
        rotary_cache<TYPE, true>(q_out, k_cache, v_cache, q, k, v, cos, sin, slots, heads,        \
                                 kv_heads, head_dim, q_stride, k_stride, v_stride, num_slots);    \
    }

CANDELA_FOR_FLOAT_TYPES(ROTARY)
