// Causal attention of a ragged batch of query tokens over a paged KV cache (see
// src/paged_attention/cuda.rs for the launch).
//
// Work is cut into items: a tile of up to `max_rows / group` consecutive query tokens of one
// sequence (one token for a decode step). A CTA takes one item, one kv head and one partition of
// the context: its rows are the tile's tokens times the `group` query heads sharing that kv head,
// so each key and value it reads serves all of them. The CTA walks its keys in tiles of 32,
// staged in shared memory (the next tile's loads are in flight while the current one is used),
// and keeps a running max and sum per row (online softmax), so scores never leave the chip.
//
// Short batches over long contexts would leave most SMs idle, so the host may split the context
// into partitions: each CTA then writes its rows' partial output with their max and sum, and
// `paged_attention_reduce` merges them. With one partition the CTA writes the output itself.
//
// Prompt chunks in f16/bf16 take `paged_prefill_mma` instead: the same causal attention over the
// same cache, its two products on tensor cores (see the kernel).
#include "common.cuh"
#include "mma.cuh"

using namespace candela;

namespace {

constexpr int THREADS = 128;
constexpr int WARPS = THREADS / 32;
// Keys per tile: one per lane while scoring.
constexpr int KEYS = 32;
// CTAs per SM the register budget must allow (128 registers a thread): 16 warps to hide loads.
constexpr int MIN_CTAS = 4;

// Rows per CTA, as shared memory allows (the host mirrors this in `max_rows`).
template <typename T> __host__ __device__ constexpr int max_rows() {
    return sizeof(T) == 4 ? 16 : 32;
}

// Four consecutive values of a shared-memory row, widened.
__device__ __forceinline__ void load4(const float *src, float *dst) {
    const float4 v = *reinterpret_cast<const float4 *>(src);
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
}
template <typename T> __device__ __forceinline__ void load4(const T *src, float *dst) {
    const uint2 raw = *reinterpret_cast<const uint2 *>(src);
    const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = to_float(v[i]);
}

template <typename T> __device__ __forceinline__ void store4(T *dst, const float *src) {
    uint2 raw;
    T *v = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = from_float<T>(src[i]);
    *reinterpret_cast<uint2 *>(dst) = raw;
}
__device__ __forceinline__ void store4(float *dst, const float *src) {
    *reinterpret_cast<float4 *>(dst) = make_float4(src[0], src[1], src[2], src[3]);
}

// What a CTA of either attention kernel works on: its work item (a tile of `tokens` query
// tokens of one sequence from batch row `row0`; rows are tokens times the group's heads), its kv
// head, and its partition of the context. The tile's last token sees keys [0, kv_len); this CTA
// takes [k_begin, k_end) of them (none if k_begin >= kv_len).
struct Item {
    int row0, tokens, kvh, part, group, rows, first_pos, kv_len, k_begin, k_end;
    const uint32_t *table; // the sequence's block table
    __device__ __forceinline__ Item(const uint32_t *work, const uint32_t *seq_info,
                                    const uint32_t *block_tables, int heads, int kv_heads,
                                    int max_blocks, int part_len) {
        const uint32_t *item = work + 3 * blockIdx.x;
        const int seq = item[0];
        row0 = item[1], tokens = item[2];
        kvh = blockIdx.y, part = blockIdx.z;
        const int q_start = seq_info[3 * seq], q_len = seq_info[3 * seq + 1];
        const int ctx = seq_info[3 * seq + 2];
        group = heads / kv_heads;
        rows = tokens * group;
        first_pos = ctx - q_len + (row0 - q_start);
        kv_len = first_pos + tokens;
        k_begin = part * part_len;
        k_end = kv_len - k_begin > part_len ? k_begin + part_len : kv_len;
        table = block_tables + (size_t)seq * max_blocks;
    }
};

// Grid: (work items, kv heads, partitions); block: THREADS.
//
// seq_info: per sequence, [query_start, query_len, context_len].
// block_tables: [num_seqs, max_blocks] cache block ids.
// work: per item, [sequence, first batch row, tokens].
// part_len, num_parts: the context partitions (num_parts == 1: no split, `part_*` unused).
// part_out: [tokens, heads, num_parts, D] f32 partial outputs, each normalised by its own sum;
// part_ml: [tokens, heads, num_parts, 2] their max (log2 domain) and sum.
// scale_log2: softmax scale times log2(e), so that exp2 gives the softmax's exp.
template <typename T, int D>
__device__ __forceinline__ void paged_attention(
    T *__restrict__ out, float *__restrict__ part_out, float *__restrict__ part_ml,
    const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,
    const uint32_t *__restrict__ seq_info, const uint32_t *__restrict__ block_tables,
    const uint32_t *__restrict__ work, int heads, int kv_heads, int block_size, int max_blocks,
    int part_len, int num_parts, float scale_log2) {
    constexpr int R = max_rows<T>();
    constexpr int VEC = pack_len<T>();
    constexpr int PACKS = D / VEC;                   // packs per key row
    constexpr int LOADS = KEYS * PACKS / THREADS;    // packs of K (and of V) per thread per tile
    constexpr int SROWS = R / WARPS;                 // scoring: rows per warp
    constexpr int DG = D / 4;                        // accumulating: threads per row, 4 dims each
    constexpr int RL = THREADS / DG;                 // accumulating: rows side by side
    constexpr int AROWS = R / RL;                    // accumulating: rows per thread
    static_assert(D % VEC == 0 && (KEYS * PACKS) % THREADS == 0, "head_dim");
    static_assert(R % WARPS == 0 && THREADS % DG == 0 && R % RL == 0, "rows");

    __shared__ __align__(16) float q_sh[R][D];       // pre-scaled queries
    __shared__ __align__(16) T k_sh[KEYS][D + VEC];  // padded: lanes read different rows
    __shared__ __align__(16) T v_sh[KEYS][D];
    __shared__ float p_sh[R][KEYS + 1];              // padded: two rows per warp when D == 64
    __shared__ float alpha_sh[R];                    // per row: rescale of the accumulator
    __shared__ float max_sh[R], sum_sh[R];
    __shared__ int pos_sh[R];                        // per row: its token's position, -1 if none

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const Item it(work, seq_info, block_tables, heads, kv_heads, max_blocks, part_len);
    if (it.k_begin >= it.kv_len) return;
    const int row0 = it.row0, kvh = it.kvh, part = it.part, group = it.group, rows = it.rows;
    const int first_pos = it.first_pos, k_begin = it.k_begin, k_end = it.k_end;
    const uint32_t *table = it.table;

    // Row r is query head kvh * group + r % group of batch row row0 + r / group.
    for (int i = tid; i < R * PACKS; i += THREADS) {
        const int r = i / PACKS, c = i % PACKS;
        float f[VEC];
        if (r < rows) {
            const int head = kvh * group + r % group;
            load_pack(q + ((size_t)(row0 + r / group) * heads + head) * D + c * VEC, f);
#pragma unroll
            for (int e = 0; e < VEC; ++e) f[e] *= scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) f[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; e += 4)
            *reinterpret_cast<float4 *>(&q_sh[r][c * VEC + e]) =
                make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
    }
    if (tid < R) pos_sh[tid] = tid < rows ? first_pos + tid / group : -1;

    // Keys past k_end read as zeros: their weight is 0 and 0 * garbage could be NaN.
    uint4 k_reg[LOADS], v_reg[LOADS];
    auto fetch = [&](int key0) {
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int idx = tid + i * THREADS, key = idx / PACKS, c = idx % PACKS;
            const int pos = key0 + key;
            if (pos < k_end) {
                const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
                const size_t off = (slot * kv_heads + kvh) * D + c * VEC;
                k_reg[i] = *reinterpret_cast<const uint4 *>(k_cache + off);
                v_reg[i] = *reinterpret_cast<const uint4 *>(v_cache + off);
            } else {
                k_reg[i] = v_reg[i] = make_uint4(0, 0, 0, 0);
            }
        }
    };

    // Scoring owns rows warp + i * WARPS (every lane a key); accumulating owns rows
    // rl + i * RL, dims [4 * dg, 4 * dg + 4).
    float row_max[SROWS], row_sum[SROWS];
#pragma unroll
    for (int i = 0; i < SROWS; ++i) row_max[i] = -INFINITY, row_sum[i] = 0.f;
    const int dg = tid % DG, rl = tid / DG;
    float acc[AROWS][4];
#pragma unroll
    for (int i = 0; i < AROWS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

    fetch(k_begin);
    for (int key0 = k_begin; key0 < k_end; key0 += KEYS) {
        __syncthreads(); // the previous tile is used up (and q_sh, pos_sh are written)
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int idx = tid + i * THREADS, key = idx / PACKS, c = idx % PACKS;
            *reinterpret_cast<uint4 *>(&k_sh[key][c * VEC]) = k_reg[i];
            *reinterpret_cast<uint4 *>(&v_sh[key][c * VEC]) = v_reg[i];
        }
        __syncthreads();
        if (key0 + KEYS < k_end) fetch(key0 + KEYS);

        // Scores of this lane's key against the warp's rows.
        float s[SROWS];
#pragma unroll
        for (int i = 0; i < SROWS; ++i) s[i] = 0.f;
#pragma unroll
        for (int c = 0; c < PACKS; ++c) {
            float kf[VEC];
            unpack<T>(*reinterpret_cast<const uint4 *>(&k_sh[lane][c * VEC]), kf);
#pragma unroll
            for (int i = 0; i < SROWS; ++i) {
                if (warp + i * WARPS < rows) {
#pragma unroll
                    for (int e = 0; e < VEC; e += 4) {
                        float qf[4];
                        load4(&q_sh[warp + i * WARPS][c * VEC + e], qf);
                        s[i] += qf[0] * kf[e] + qf[1] * kf[e + 1] + qf[2] * kf[e + 2] +
                                qf[3] * kf[e + 3];
                    }
                }
            }
        }
        const int key_pos = key0 + lane;
#pragma unroll
        for (int i = 0; i < SROWS; ++i) {
            const int r = warp + i * WARPS;
            if (r < rows) {
                const float x = key_pos < k_end && key_pos <= pos_sh[r] ? s[i] : -INFINITY;
                const float m = fmaxf(row_max[i], warp_max(x));
                // A row with no visible key yet keeps max -inf: subtract 0 instead of -inf.
                const float base = m == -INFINITY ? 0.f : m;
                const float p = exp2f(x - base);
                const float alpha = exp2f(row_max[i] - base);
                row_sum[i] = row_sum[i] * alpha + warp_sum(p);
                row_max[i] = m;
                p_sh[r][lane] = p;
                if (lane == 0) alpha_sh[r] = alpha;
            }
        }
        __syncthreads();

        const int keys = min(KEYS, k_end - key0);
#pragma unroll
        for (int i = 0; i < AROWS; ++i) {
            const int r = rl + i * RL;
            if (r < rows) {
                const float alpha = alpha_sh[r];
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][e] *= alpha;
            }
        }
        for (int j = 0; j < keys; ++j) {
            float vf[4];
            load4(&v_sh[j][dg * 4], vf);
#pragma unroll
            for (int i = 0; i < AROWS; ++i) {
                const int r = rl + i * RL;
                if (r < rows) {
                    const float p = p_sh[r][j];
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][e] += p * vf[e];
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < SROWS; ++i) {
        const int r = warp + i * WARPS;
        if (r < rows && lane == 0) max_sh[r] = row_max[i], sum_sh[r] = row_sum[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < AROWS; ++i) {
        const int r = rl + i * RL;
        if (r >= rows) continue;
        // A row that sees no key of this partition has sum 0; the reduce skips it.
        const float inv = sum_sh[r] > 0.f ? 1.f / sum_sh[r] : 0.f;
        float o[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) o[e] = acc[i][e] * inv;
        const size_t row = (size_t)(row0 + r / group) * heads + kvh * group + r % group;
        if (num_parts == 1) {
            store4(out + row * D + dg * 4, o);
        } else {
            const size_t prow = row * num_parts + part;
            store4(part_out + prow * D + dg * 4, o);
            if (dg == 0) part_ml[2 * prow] = max_sh[r], part_ml[2 * prow + 1] = sum_sh[r];
        }
    }
}

// Merges the partitions of paged_attention. Grid: (tokens, ceil(heads / WARPS)); block:
// THREADS, a warp per (token, head), each lane D / 32 dims. token_pos: each batch row's position.
template <typename T, int D>
__device__ __forceinline__ void paged_attention_reduce(
    T *__restrict__ out, const float *__restrict__ part_out, const float *__restrict__ part_ml,
    const uint32_t *__restrict__ token_pos, int heads, int part_len, int num_parts) {
    constexpr int PER_LANE = D / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tok = blockIdx.x, head = blockIdx.y * WARPS + warp;
    if (head >= heads) return;
    // Partitions [0, n) hold at least one key this token sees; later ones hold none.
    const int n = token_pos[tok] / part_len + 1;
    const size_t row = (size_t)tok * heads + head;
    const float *ml = part_ml + row * num_parts * 2;
    float m = -INFINITY;
    for (int p = 0; p < n; ++p) m = fmaxf(m, ml[2 * p]);
    float acc[PER_LANE] = {}, total = 0.f;
    for (int p = 0; p < n; ++p) {
        const float w = ml[2 * p + 1] * exp2f(ml[2 * p] - m);
        const float *src = part_out + (row * num_parts + p) * D + lane * PER_LANE;
        total += w;
#pragma unroll
        for (int e = 0; e < PER_LANE; ++e) acc[e] += w * src[e];
    }
    T *dst = out + row * D + lane * PER_LANE;
#pragma unroll
    for (int e = 0; e < PER_LANE; ++e) dst[e] = from_float<T>(acc[e] / total);
}


// Rows (query tokens times the group's heads) of a tensor-core CTA: a warp takes 16. The host
// mirrors this in `MMA_ROWS`.
constexpr int MMA_ROWS = WARPS * 16;
// Keys per tile of the tensor-core kernel.
constexpr int MMA_KEYS = 64;

// Prefill attention on tensor cores (f16/bf16, sm_80 and later), flash-attention style. Block:
// THREADS. A work item is a tile of up to MMA_ROWS / group query
// tokens of one sequence; its rows are ordered as in `paged_attention` (row r: token r / group,
// head r % group of the kv head's group), and warp w owns rows [16w, 16w + 16).
//
// Each tile of MMA_KEYS keys and values is copied from the cache blocks into shared memory with
// cp.async, the next tile's keys in flight while this tile's values are used and the other way
// round. A warp computes its scores S = Q K^T (16 x 64) with mma.sync, masks, scales and keeps a
// running max and sum per row in registers (a row's values sit on the 4 lanes of a quad), then
// feeds its probabilities P, rounded to T, straight from the score fragments into O += P V.
// Grid: (work items, kv heads, partitions); arguments as `paged_attention`'s (`work` lists this
// kernel's items), partials in the same layout, for `paged_attention_reduce` to merge.
template <typename T, int D>
__device__ __forceinline__ void paged_prefill_mma(
    T *__restrict__ out, float *__restrict__ part_out, float *__restrict__ part_ml,
    const T *__restrict__ q, const T *__restrict__ k_cache, const T *__restrict__ v_cache,
    const uint32_t *__restrict__ seq_info, const uint32_t *__restrict__ block_tables,
    const uint32_t *__restrict__ work, int heads, int kv_heads, int block_size, int max_blocks,
    int part_len, int num_parts, float scale_log2) {
    constexpr int VEC = pack_len<T>();
    constexpr int PACKS = D / VEC;                     // packs per key row
    constexpr int STRIDE = D + VEC;                    // shared rows padded: no bank conflicts
    constexpr int LOADS = MMA_KEYS * PACKS / THREADS;  // packs of K (and of V) per thread a tile
    constexpr int KSTEPS = D / 16;                     // k-steps of Q K^T
    constexpr int STILES = MMA_KEYS / 8;               // n-tiles of S
    constexpr int OTILES = D / 8;                      // n-tiles of O
    static_assert(MMA_ROWS == MMA_KEYS, "Q is staged in the key buffer");
    static_assert((MMA_KEYS * PACKS) % THREADS == 0 && D % 16 == 0, "head_dim");

    __shared__ __align__(16) T k_sh[MMA_KEYS * STRIDE];
    __shared__ __align__(16) T v_sh[MMA_KEYS * STRIDE];

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const Item it(work, seq_info, block_tables, heads, kv_heads, max_blocks, part_len);
    if (it.k_begin >= it.kv_len) return;
    const int row0 = it.row0, kvh = it.kvh, part = it.part, group = it.group, rows = it.rows;
    const int first_pos = it.first_pos, k_begin = it.k_begin, k_end = it.k_end;
    const uint32_t *table = it.table;

    // Copies keys [key0, key0 + MMA_KEYS) of `cache` into `dst` as one group; keys past the
    // partition read as zeros (their weight is 0, and 0 * garbage could be NaN).
    auto issue = [&](T *dst, const T *cache, int key0) {
#pragma unroll
        for (int i = 0; i < LOADS; ++i) {
            const int idx = tid + i * THREADS, key = idx / PACKS, c = idx % PACKS;
            const int pos = key0 + key;
            T *d = dst + key * STRIDE + c * VEC;
            if (pos < k_end) {
                const size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
                cp_async16(d, cache + (slot * kv_heads + kvh) * D + c * VEC);
            } else {
                *reinterpret_cast<uint4 *>(d) = make_uint4(0, 0, 0, 0);
            }
        }
        cp_async_commit();
    };
    auto lds32 = [](const T *p) { return *reinterpret_cast<const uint32_t *>(p); };

    // Q through shared memory (the key buffer) into A fragments, held for the whole kernel.
    for (int i = tid; i < MMA_ROWS * PACKS; i += THREADS) {
        const int r = i / PACKS, c = i % PACKS;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows) {
            const size_t row = (size_t)(row0 + r / group) * heads + kvh * group + r % group;
            v = *reinterpret_cast<const uint4 *>(q + row * D + c * VEC);
        }
        *reinterpret_cast<uint4 *>(&k_sh[r * STRIDE + c * VEC]) = v;
    }
    __syncthreads();
    const int r0 = warp * 16 + g, r1 = r0 + 8; // this lane's two rows
    uint32_t qa[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        qa[kk][0] = lds32(&k_sh[r0 * STRIDE + 16 * kk + 2 * t4]);
        qa[kk][1] = lds32(&k_sh[r1 * STRIDE + 16 * kk + 2 * t4]);
        qa[kk][2] = lds32(&k_sh[r0 * STRIDE + 16 * kk + 8 + 2 * t4]);
        qa[kk][3] = lds32(&k_sh[r1 * STRIDE + 16 * kk + 8 + 2 * t4]);
    }
    __syncthreads();
    issue(k_sh, k_cache, k_begin);
    issue(v_sh, v_cache, k_begin);

    // Positions of the lane's rows (-1: past the item, sees nothing), and the last key any row
    // of the warp sees.
    const int pos0 = r0 < rows ? first_pos + r0 / group : -1;
    const int pos1 = r1 < rows ? first_pos + r1 / group : -1;
    const int warp_last = warp * 16 < rows ? first_pos + (min(rows, warp * 16 + 16) - 1) / group : -1;

    float o[OTILES][4];
#pragma unroll
    for (int d = 0; d < OTILES; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f; // l: this lane's share of the sum
    float s[STILES][4];

    for (int key0 = k_begin; key0 < k_end; key0 += MMA_KEYS) {
        const bool more = key0 + MMA_KEYS < k_end;
        const bool active = key0 <= warp_last; // warp-uniform
        cp_async_wait<1>(); // this tile's keys have landed; its values may be in flight
        __syncthreads();
        if (active) {
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
                const T *krow = &k_sh[(8 * j + g) * STRIDE + 2 * t4];
#pragma unroll
                for (int kk = 0; kk < KSTEPS; ++kk)
                    mma_m16n8k16<T>(s[j], qa[kk], lds32(krow + 16 * kk), lds32(krow + 16 * kk + 8));
            }
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = key0 + 8 * j + 2 * t4 + e;
                    const bool in = key < k_end;
                    s[j][e] = in && key <= pos0 ? s[j][e] * scale_log2 : -INFINITY;
                    s[j][2 + e] = in && key <= pos1 ? s[j][2 + e] * scale_log2 : -INFINITY;
                    mx0 = fmaxf(mx0, s[j][e]);
                    mx1 = fmaxf(mx1, s[j][2 + e]);
                }
            }
#pragma unroll
            for (int x = 1; x < 4; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            // A row with no visible key yet keeps max -inf: subtract 0 instead of -inf.
            const float base0 = mx0 == -INFINITY ? 0.f : mx0;
            const float base1 = mx1 == -INFINITY ? 0.f : mx1;
            const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
            m0 = mx0, m1 = mx1;
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int j = 0; j < STILES; ++j) {
                s[j][0] = exp2f(s[j][0] - base0), s[j][1] = exp2f(s[j][1] - base0);
                s[j][2] = exp2f(s[j][2] - base1), s[j][3] = exp2f(s[j][3] - base1);
                sum0 += s[j][0] + s[j][1];
                sum1 += s[j][2] + s[j][3];
            }
            l0 = l0 * alpha0 + sum0;
            l1 = l1 * alpha1 + sum1;
#pragma unroll
            for (int d = 0; d < OTILES; ++d) {
                o[d][0] *= alpha0, o[d][1] *= alpha0;
                o[d][2] *= alpha1, o[d][3] *= alpha1;
            }
        }
        __syncthreads(); // every warp is done with this tile's keys
        if (more) issue(k_sh, k_cache, key0 + MMA_KEYS);
        else cp_async_commit();
        cp_async_wait<1>(); // this tile's values have landed
        __syncthreads();
        if (active) {
            const uint16_t *vs = reinterpret_cast<const uint16_t *>(v_sh);
#pragma unroll
            for (int t = 0; t < MMA_KEYS / 16; ++t) {
                // S's accumulator fragments are P's A fragments for keys [16t, 16t + 16).
                const uint32_t a[4] = {pack2<T>(s[2 * t][0], s[2 * t][1]),
                                       pack2<T>(s[2 * t][2], s[2 * t][3]),
                                       pack2<T>(s[2 * t + 1][0], s[2 * t + 1][1]),
                                       pack2<T>(s[2 * t + 1][2], s[2 * t + 1][3])};
                const uint16_t *vrow = vs + (16 * t + 2 * t4) * STRIDE + g;
#pragma unroll
                for (int d = 0; d < OTILES; ++d) {
                    const uint16_t *v = vrow + 8 * d;
                    const uint32_t b0 = (uint32_t)v[0] | (uint32_t)v[STRIDE] << 16;
                    const uint32_t b1 = (uint32_t)v[8 * STRIDE] | (uint32_t)v[9 * STRIDE] << 16;
                    mma_m16n8k16<T>(o[d], a, b0, b1);
                }
            }
        }
        __syncthreads(); // every warp is done with this tile's values
        if (more) issue(v_sh, v_cache, key0 + MMA_KEYS);
        else cp_async_commit();
    }

#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    // A row that sees no key of this partition has sum 0; the reduce skips it. (Without
    // partitions every row of the item sees key 0.)
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    auto store = [&](int r, float m, float l, float inv, int half) {
        const size_t row = (size_t)(row0 + r / group) * heads + kvh * group + r % group;
        if (num_parts == 1) {
            T *dst = out + row * D + 2 * t4;
#pragma unroll
            for (int d = 0; d < OTILES; ++d)
                *reinterpret_cast<uint32_t *>(dst + 8 * d) =
                    pack2<T>(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
        } else {
            const size_t prow = row * num_parts + part;
            float *dst = part_out + prow * D + 2 * t4;
#pragma unroll
            for (int d = 0; d < OTILES; ++d)
                *reinterpret_cast<float2 *>(dst + 8 * d) =
                    make_float2(o[d][2 * half] * inv, o[d][2 * half + 1] * inv);
            if (t4 == 0) part_ml[2 * prow] = m, part_ml[2 * prow + 1] = l;
        }
    };
    if (r0 < rows) store(r0, m0, l0, inv0, 0);
    if (r1 < rows) store(r1, m1, l1, inv1, 1);
}

} // namespace

#define ATTENTION_KERNELS(NAME, TYPE, D)                                                          \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_CTAS)                              \
        paged_attention_##NAME##_d##D(                                                            \
        TYPE *out, float *part_out, float *part_ml, const TYPE *q, const TYPE *k_cache,          \
        const TYPE *v_cache, const uint32_t *seq_info, const uint32_t *block_tables,             \
        const uint32_t *work, int heads, int kv_heads, int block_size, int max_blocks,           \
        int part_len, int num_parts, float scale_log2) {                                          \
        begin_kernel();                                                                          \
        paged_attention<TYPE, D>(out, part_out, part_ml, q, k_cache, v_cache, seq_info,          \
                                 block_tables, work, heads, kv_heads, block_size, max_blocks,     \
                                 part_len, num_parts, scale_log2);                                \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) paged_attention_reduce_##NAME##_d##D(   \
        TYPE *out, const float *part_out, const float *part_ml, const uint32_t *token_pos,       \
        int heads, int part_len, int num_parts) {                                                 \
        begin_kernel();                                                                          \
        paged_attention_reduce<TYPE, D>(out, part_out, part_ml, token_pos, heads, part_len,      \
                                        num_parts);                                               \
    }

#define ATTENTION_HEAD_DIMS(NAME, TYPE)                                                           \
    ATTENTION_KERNELS(NAME, TYPE, 64)                                                             \
    ATTENTION_KERNELS(NAME, TYPE, 128)

CANDELA_FOR_FLOAT_TYPES(ATTENTION_HEAD_DIMS)

// The tensor-core kernel exists for sm_80 and later; the host launches it only there.
#if defined(CANDELA_EMU) || __CUDA_ARCH__ >= 800
#define PREFILL_MMA_KERNEL(NAME, TYPE, D)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 2) paged_prefill_mma_##NAME##_d##D(     \
        TYPE *out, float *part_out, float *part_ml, const TYPE *q, const TYPE *k_cache,          \
        const TYPE *v_cache, const uint32_t *seq_info, const uint32_t *block_tables,             \
        const uint32_t *work, int heads, int kv_heads, int block_size, int max_blocks,           \
        int part_len, int num_parts, float scale_log2) {                                          \
        begin_kernel();                                                                          \
        paged_prefill_mma<TYPE, D>(out, part_out, part_ml, q, k_cache, v_cache, seq_info,        \
                                   block_tables, work, heads, kv_heads, block_size, max_blocks,  \
                                   part_len, num_parts, scale_log2);                              \
    }
#define PREFILL_MMA_HEAD_DIMS(NAME, TYPE)                                                         \
    PREFILL_MMA_KERNEL(NAME, TYPE, 64)                                                            \
    PREFILL_MMA_KERNEL(NAME, TYPE, 128)
PREFILL_MMA_HEAD_DIMS(f16, __half)
PREFILL_MMA_HEAD_DIMS(bf16, __nv_bfloat16)
#endif
