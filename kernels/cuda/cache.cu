// Writes new keys (or values) into their KV-cache slots (see src/cache.rs for the launch).
#include "common.cuh"

using namespace candela;

// Grid: tokens; block: any. rows: [tokens, row_len] (row_len a whole number of packs), a token's
// row `row_stride` values after the previous one (a view into a fused QKV projection); cache:
// [num_slots, row_len]. Slots past the cache are skipped rather than written out of bounds.
template <typename T>
__device__ __forceinline__ void write_cache(T *__restrict__ cache, const T *__restrict__ rows,
                                            const uint32_t *__restrict__ slots, int row_len,
                                            int row_stride, uint32_t num_slots) {
    const uint32_t slot = slots[blockIdx.x];
    if (slot >= num_slots) return;
    const uint4 *src = reinterpret_cast<const uint4 *>(rows + (size_t)blockIdx.x * row_stride);
    uint4 *dst = reinterpret_cast<uint4 *>(cache + (size_t)slot * row_len);
    for (int i = threadIdx.x; i < row_len / pack_len<T>(); i += blockDim.x) dst[i] = src[i];
}

#define WRITE_CACHE(NAME, TYPE)                                                                    \
    extern "C" __global__ void write_cache_##NAME(TYPE *cache, const TYPE *rows,                  \
                                                  const uint32_t *slots, int row_len,             \
                                                  int row_stride, uint32_t num_slots) {           \
        begin_kernel();                                                                           \
        write_cache<TYPE>(cache, rows, slots, row_len, row_stride, num_slots);                    \
    }

CANDELA_FOR_FLOAT_TYPES(WRITE_CACHE)
