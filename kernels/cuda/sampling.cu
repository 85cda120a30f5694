// Sampling on the device (see src/sampling.rs for the launch and the reference it must match):
// one CTA per row of logits turns it into a token id, so that only ids leave the GPU.
//
// A row's settings: temperature (<= 1e-5: greedy), top_k (0: off), top_p, min_p and a uniform
// draw in [0, 1) made by the host from the sequence's own random stream. Weights are relative to
// the top token's, w = exp((logit - max) / temperature) in [0, 1], so min_p is a threshold on
// them. Every cut keeps the tokens at or above a weight threshold; instead of ranking the
// vocabulary the CTA searches for that threshold over the bits of the float (positive floats
// order as their bits do), one counting or summing pass per bit. The draw then walks the kept
// tokens in index order, as the reference does.
#include <climits>

#include "common.cuh"

using namespace candela;

namespace {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
// The bits of 1.0f: no weight is larger.
constexpr unsigned ONE_BITS = 0x3f800000u;

struct Row {
    float temperature, top_k, top_p, min_p, uniform;
};

// Sum over the CTA, returned to every thread. `scratch` is reusable once it returns.
__device__ float block_sum(float x, float *scratch) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = warp_sum(lane < WARPS ? scratch[lane] : 0.f);
    __syncthreads();
    return x;
}

// The weight of a logit; NaN logits weigh nothing.
__device__ __forceinline__ float weight(float logit, float max, float scale_log2) {
    const float w = exp2f((logit - max) * scale_log2);
    return w == w ? w : 0.f;
}

// Count (COUNT) or mass of the weights at or above `t`.
template <bool COUNT>
__device__ float at_or_above(const float *logits, int vocab, float max, float scale_log2, float t,
                             float *scratch) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const float w = weight(logits[i], max, scale_log2);
        if (w >= t) acc += COUNT ? 1.f : w;
    }
    return block_sum(acc, scratch);
}

// The largest threshold in [lo, 1] whose count (COUNT) or mass of weights at or above it is at
// least `need`, given that `lo` qualifies.
template <bool COUNT>
__device__ float largest_threshold(const float *logits, int vocab, float max, float scale_log2,
                                   float lo_value, float need, float *scratch) {
    unsigned lo = __float_as_uint(lo_value), hi = ONE_BITS + 1;
    while (hi - lo > 1) {
        const unsigned mid = lo + (hi - lo) / 2;
        const float got =
            at_or_above<COUNT>(logits, vocab, max, scale_log2, __uint_as_float(mid), scratch);
        if (got >= need) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return __uint_as_float(lo);
}

} // namespace

// Grid: rows; block: THREADS. logits: [rows, vocab] f32; rows: [rows] settings; out: [rows].
extern "C" __global__ void __launch_bounds__(THREADS)
    sample_rows(unsigned *__restrict__ out, const float *__restrict__ all_logits,
                const Row *__restrict__ rows, int vocab) {
    __shared__ float scratch[WARPS];
    __shared__ float best_value[WARPS];
    __shared__ int best_index[WARPS];
    __shared__ int chosen, fallback;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float *logits = all_logits + (size_t)blockIdx.x * vocab;
    const Row row = rows[blockIdx.x];

    // The top logit and its first index; NaN never wins, as in the reference's argmax.
    float max = -INFINITY;
    int argmax = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const float l = logits[i];
        if (l > max) max = l, argmax = i;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m = __shfl_xor_sync(0xffffffffu, max, offset);
        const int a = __shfl_xor_sync(0xffffffffu, argmax, offset);
        if (m > max || (m == max && a < argmax)) max = m, argmax = a;
    }
    if (lane == 0) best_value[warp] = max, best_index[warp] = argmax;
    __syncthreads();
    max = best_value[lane], argmax = best_index[lane];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m = __shfl_xor_sync(0xffffffffu, max, offset);
        const int a = __shfl_xor_sync(0xffffffffu, argmax, offset);
        if (m > max || (m == max && a < argmax)) max = m, argmax = a;
    }
    // Every thread now holds the same max and argmax, so the branches below are uniform.
    if (argmax == INT_MAX) argmax = 0; // no logit above -inf
    if (row.temperature <= 1e-5f || max == -INFINITY || max == INFINITY) {
        if (threadIdx.x == 0) out[blockIdx.x] = argmax;
        return;
    }
    const float scale_log2 = 1.4426950408889634f / row.temperature;

    // top-k: the k-th largest weight; the mass it keeps is what top-p is a share of.
    const int top_k = (int)row.top_k;
    float t = 0.f, total;
    if (top_k > 0 && top_k < vocab) {
        t = largest_threshold<true>(logits, vocab, max, scale_log2, 0.f, (float)top_k, scratch);
        total = at_or_above<false>(logits, vocab, max, scale_log2, t, scratch);
    } else {
        total = at_or_above<false>(logits, vocab, max, scale_log2, 0.f, scratch);
    }
    t = fmaxf(t, row.min_p);
    if (row.top_p < 1.f) {
        const float need = row.top_p * total;
        if (at_or_above<false>(logits, vocab, max, scale_log2, t, scratch) >= need)
            t = largest_threshold<false>(logits, vocab, max, scale_log2, t, need, scratch);
    }

    // The draw, over the kept tokens in index order: each thread takes a contiguous chunk, a
    // scan gives the mass before it, and the thread whose chunk holds the draw walks it.
    const int chunk = (vocab + THREADS - 1) / THREADS;
    const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
    float mass = 0.f;
    int last = -1;
    for (int i = begin; i < end; ++i) {
        const float w = weight(logits[i], max, scale_log2);
        if (w >= t && w > 0.f) mass += w, last = i;
    }
    // Inclusive scan: within the warp, then over the warps' totals.
    float before = mass;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const float up = __shfl_up_sync(0xffffffffu, before, offset);
        if (lane >= offset) before += up;
    }
    if (lane == 31) scratch[warp] = before;
    if (threadIdx.x == 0) chosen = INT_MAX, fallback = -1;
    __syncthreads();
    float warp_before = 0.f, kept = 0.f;
    for (int w = 0; w < WARPS; ++w) {
        if (w < warp) warp_before += scratch[w];
        kept += scratch[w];
    }
    before += warp_before - mass; // exclusive
    const float target = row.uniform * kept;
    if (mass > 0.f && before <= target && target < before + mass) {
        float acc = before;
        int pick = last;
        for (int i = begin; i < end; ++i) {
            const float w = weight(logits[i], max, scale_log2);
            if (w >= t && w > 0.f) {
                acc += w;
                if (target < acc) {
                    pick = i;
                    break;
                }
            }
        }
        // Rounding may let two neighbouring ranges overlap: the first token wins.
        atomicMin(&chosen, pick);
    }
    // A draw that falls past every range (rounding again) takes the last kept token below it.
    if (last >= 0 && target >= before + mass) atomicMax(&fallback, last);
    __syncthreads();
    if (threadIdx.x == 0)
        out[blockIdx.x] = chosen != INT_MAX ? chosen : (fallback >= 0 ? fallback : argmax);
}
