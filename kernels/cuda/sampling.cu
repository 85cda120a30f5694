// Sampling on the device (see src/sampling.rs for the launch and the reference it must match):
// one CTA per row of logits turns it into a token id, so that only ids leave the GPU.
//
// A row's settings: temperature (<= 1e-5: greedy), top_k (0: off), top_p, min_p and a uniform
// draw in [0, 1) made by the host from the sequence's own random stream. Weights are relative to
// the top token's, w = exp((logit - max) / temperature) in [0, 1], so min_p is a threshold on
// them. Every cut keeps the tokens at or above a weight threshold. Instead of ranking the
// vocabulary the CTA selects that threshold by radix over the bits of the float (positive floats
// order as their bits do): three passes, each a histogram of the next ten bits among the
// weights that share the digits chosen so far, counting tokens (top-k) or summing their mass
// (top-p). Masses are fixed point (2^-40 of the top weight), so sums are exact whatever the
// order the threads add in: a row samples the same token on every run. The draw then walks the
// kept tokens in index order, as the reference does.
#include <climits>

#include "common.cuh"

using namespace candela;

namespace {

using u64 = unsigned long long;

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
// Bits a radix pass decides, and its buckets: one a thread.
constexpr int DIGIT = 10;
constexpr int BUCKETS = 1 << DIGIT;
static_assert(BUCKETS == THREADS, "a thread scans one bucket");
// A weight's mass in fixed point: w * 2^40, truncated (exact for any vocabulary below 2^23).
constexpr float FIXED_ONE = 1099511627776.f;

struct Row {
    float temperature, top_k, top_p, min_p, uniform;
};

struct Shared {
    u64 hist[BUCKETS];
    u64 warp_totals[WARPS];
    u64 above;
    unsigned prefix;
    int found;
};

__device__ __forceinline__ u64 fixed(float w) { return (u64)(w * FIXED_ONE); }

// The weight of a logit; NaN logits weigh nothing.
__device__ __forceinline__ float weight(float logit, float max, float scale_log2) {
    const float w = exp2f((logit - max) * scale_log2);
    return w == w ? w : 0.f;
}

// Sum over the warp, returned to every lane.
__device__ __forceinline__ u64 warp_total(u64 x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// Inclusive scan over the warp's lanes.
__device__ __forceinline__ u64 warp_scan(u64 x) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u64 up = __shfl_up_sync(0xffffffffu, x, offset);
        if (lane >= offset) x += up;
    }
    return x;
}

// Inclusive scan of `x` over the CTA in thread order. `sh.warp_totals` is reusable once it
// returns.
__device__ u64 block_scan(u64 x, Shared &sh) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    x = warp_scan(x);
    if (lane == 31) sh.warp_totals[warp] = x;
    __syncthreads();
    for (int w = 0; w < warp; ++w) x += sh.warp_totals[w];
    __syncthreads();
    return x;
}

// Sum over the CTA, returned to every thread.
__device__ u64 block_sum(u64 x, Shared &sh) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    x = warp_total(x);
    if (lane == 0) sh.warp_totals[warp] = x;
    __syncthreads();
    u64 total = 0;
    for (int w = 0; w < WARPS; ++w) total += sh.warp_totals[w];
    __syncthreads();
    return total;
}

// Fixed-point mass of the weights at or above `t`.
__device__ u64 mass_at_or_above(const float *logits, int vocab, float max, float scale_log2,
                                float t, Shared &sh) {
    u64 acc = 0;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const float w = weight(logits[i], max, scale_log2);
        if (w >= t) acc += fixed(w);
    }
    return block_sum(acc, sh);
}

// The largest weight threshold t >= lo (at most 1) whose measure, the count (COUNT) or the
// fixed-point mass of the weights at or above it, is at least `need`; `lo` itself when the
// weights at or above lo fall short. Such a t is always one of the weights: the radix passes
// narrow down the bits of the one where the measure, summed from the top, first reaches need.
template <bool COUNT>
__device__ float largest_threshold(const float *logits, int vocab, float max, float scale_log2,
                                   float lo, u64 need, Shared &sh) {
    if (need == 0) return 1.f;
    unsigned prefix = 0;
    u64 above = 0; // the measure of the weights above every bucket of this pass
    for (int shift = 32 - 2 - DIGIT; shift >= 0; shift -= DIGIT) {
        // Weights are at most 1.0 (0x3f800000): the two top bits are zero.
        sh.hist[threadIdx.x] = 0;
        if (threadIdx.x == 0) sh.found = 0;
        __syncthreads();
        // Weights of 0 (often most of the vocabulary at a low temperature) are left out rather
        // than queued on bucket 0's one shared address, and so are masses of 0. That changes no
        // answer: the threshold is never 0 unless the nonzero weights fall short, and then the
        // search returns lo, which is 0 wherever zeros could count (top-k).
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            const float w = weight(logits[i], max, scale_log2);
            const unsigned bits = __float_as_uint(w);
            const u64 measure = COUNT ? 1ull : fixed(w);
            if (w >= lo && bits != 0 && measure != 0 && (bits >> shift >> DIGIT) == prefix)
                atomicAdd(&sh.hist[(bits >> shift) % BUCKETS], measure);
        }
        __syncthreads();
        // Thread j takes bucket BUCKETS - 1 - j, so a scan in thread order sums from the top.
        const int bucket = BUCKETS - 1 - threadIdx.x;
        const u64 mine = sh.hist[bucket];
        const u64 through = above + block_scan(mine, sh);
        if (through >= need && through - mine < need) {
            sh.prefix = prefix << DIGIT | bucket;
            sh.above = through - mine;
            sh.found = 1;
        }
        __syncthreads();
        const bool found = sh.found;
        prefix = sh.prefix, above = sh.above;
        __syncthreads(); // before the next pass resets them
        if (!found) return lo;
    }
    return fminf(__uint_as_float(prefix), 1.f);
}

} // namespace

// Grid: rows; block: THREADS. logits: [rows, vocab] f32; rows: [rows] settings; out: [rows].
// One CTA an SM is allowed all the registers it wants (some 60; two CTAs an SM would cap it at
// 32 and spill): a lone row, a decode step of one sequence, is the case to make fast, and a
// batch of rows takes two waves on an H100 rather than one.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    sample_rows(unsigned *__restrict__ out, const float *__restrict__ all_logits,
                const Row *__restrict__ rows, int vocab) {
    __shared__ Shared sh;
    __shared__ float best_value[WARPS];
    __shared__ int best_index[WARPS];
    begin_kernel();
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
    float t = 0.f;
    if (top_k > 0 && top_k < vocab)
        t = largest_threshold<true>(logits, vocab, max, scale_log2, 0.f, (u64)top_k, sh);
    if (row.top_p < 1.f) {
        const u64 total = mass_at_or_above(logits, vocab, max, scale_log2, t, sh);
        const u64 need = (u64)ceil((double)row.top_p * (double)total);
        t = largest_threshold<false>(logits, vocab, max, scale_log2, fmaxf(t, row.min_p), need,
                                     sh);
    } else {
        t = fmaxf(t, row.min_p);
    }

    // The draw, over the kept tokens in index order. Each warp takes a contiguous segment of
    // the vocabulary, its lanes reading consecutive tokens (one line per load); the warps' masses
    // give each segment the mass before it, and the warp whose segment holds the draw walks it
    // 32 tokens at a time, a scan over the lanes finding the token. Masses are exact integers,
    // so exactly one segment, and in it one token, holds the draw.
    const int seg = (vocab + WARPS - 1) / WARPS;
    const int seg_begin = min(vocab, warp * seg), seg_end = min(vocab, seg_begin + seg);
    u64 mass = 0;
    for (int i = seg_begin + lane; i < seg_end; i += 32) {
        const float w = weight(logits[i], max, scale_log2);
        if (w >= t) mass += fixed(w);
    }
    mass = warp_total(mass);
    if (lane == 0) sh.warp_totals[warp] = mass;
    if (threadIdx.x == 0) sh.found = argmax; // kept nothing (min_p above 1)
    __syncthreads();
    u64 before = 0, kept = 0;
    for (int w = 0; w < WARPS; ++w) {
        if (w < warp) before += sh.warp_totals[w];
        kept += sh.warp_totals[w];
    }
    const u64 target = (u64)floor((double)row.uniform * (double)kept);
    if (before <= target && target < before + mass) { // uniform within the warp
        u64 acc = before;
        for (int base = seg_begin; base < seg_end; base += 32) {
            const int i = base + lane;
            u64 m = 0;
            if (i < seg_end) {
                const float w = weight(logits[i], max, scale_log2);
                if (w >= t) m = fixed(w);
            }
            const u64 through = acc + warp_scan(m);
            if (through - m <= target && target < through) sh.found = i;
            const u64 next = __shfl_sync(0xffffffffu, through, 31);
            if (target < next) break;
            acc = next;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = sh.found;
}
