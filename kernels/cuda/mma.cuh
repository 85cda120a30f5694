// Tensor-core helpers (sm_80 and later): the warp-wide mma.sync m16n8k16 with f32 accumulators,
// and cp.async copies from global into shared memory.
//
// Fragment layout of m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4, each register holding two 16-bit values (low half first):
//   A (16 x 16, row major): a0 = A[g][2t..2t+1],   a1 = A[g+8][2t..2t+1],
//                           a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9]
//   B (16 x 8, by column):  b0 = B[2t..2t+1][g],   b1 = B[2t+8..2t+9][g]
//   C, D (16 x 8, f32):     c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// Under the CPU emulator (CANDELA_EMU) the instruction is computed from that definition.
#pragma once

#include "common.cuh"
#ifdef CANDELA_EMU
#include <vector>
#endif

namespace candela {

// Two values of T (f16 or bf16) in one register: `lo` in the low half.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const T a = from_float<T>(lo), b = from_float<T>(hi);
    return (uint32_t)*reinterpret_cast<const uint16_t *>(&a) |
           (uint32_t)*reinterpret_cast<const uint16_t *>(&b) << 16;
}

#ifdef CANDELA_EMU

template <typename T> inline float half_bits_to_float(uint32_t bits) {
    uint16_t h = (uint16_t)bits;
    T v;
    std::memcpy(&v, &h, 2);
    return to_float(v);
}

// D = A * B + C for the warp, from every lane's fragments.
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    struct Frag {
        uint32_t a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}}, all[32];
    candela_emu::warp_gather(&mine, sizeof(Frag), all);
    // A[row][k] and B[k][n] from the lanes that hold them.
    auto a_at = [&](int row, int k) {
        const Frag &f = all[(row % 8) * 4 + (k % 8) / 2];
        const uint32_t reg = f.a[(row >= 8) + 2 * (k >= 8)];
        return half_bits_to_float<T>(k % 2 ? reg >> 16 : reg);
    };
    auto b_at = [&](int k, int n) {
        const uint32_t reg = all[n * 4 + (k % 8) / 2].b[k >= 8];
        return half_bits_to_float<T>(k % 2 ? reg >> 16 : reg);
    };
    const int g = candela_emu::lane() / 4, t = candela_emu::lane() % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
        c[i] = acc;
    }
}

// A copy lands only at the wait that covers its group (as cp.async.wait_group N guarantees: all
// but the N most recent groups); until then its destination holds NaN bytes, so a read before
// the right wait shows as a wrong (non-finite) result. Per thread, reset at each new block.
struct EmuCopy {
    void *dst;
    const void *src;
    int group; // -1 until committed
};
struct EmuCopies {
    unsigned bx = ~0u, by = ~0u, bz = ~0u;
    int committed = 0;
    std::vector<EmuCopy> pending;
};
inline EmuCopies &emu_copies() {
    static thread_local std::vector<EmuCopies> all(1024);
    EmuCopies &c = all[threadIdx.x];
    if (c.bx != blockIdx.x || c.by != blockIdx.y || c.bz != blockIdx.z) {
        c = EmuCopies{};
        c.bx = blockIdx.x, c.by = blockIdx.y, c.bz = blockIdx.z;
    }
    return c;
}
inline void cp_async16(void *smem, const void *gmem) {
    std::memset(smem, 0xff, 16);
    emu_copies().pending.push_back({smem, gmem, -1});
}
inline void cp_async_commit() {
    EmuCopies &c = emu_copies();
    for (auto &e : c.pending)
        if (e.group < 0) e.group = c.committed;
    ++c.committed;
}
template <int N> inline void cp_async_wait() {
    EmuCopies &c = emu_copies();
    std::vector<EmuCopy> left;
    for (auto &e : c.pending) {
        if (e.group >= 0 && e.group < c.committed - N)
            std::memcpy(e.dst, e.src, 16);
        else
            left.push_back(e);
    }
    c.pending.swap(left);
}

#else

// The instructions need sm_80; the host launches the kernels that use them only there.
#if __CUDA_ARCH__ >= 800
#define CANDELA_SM80(...) __VA_ARGS__
#else
#define CANDELA_SM80(...)
#endif

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1);
// The instruction for inputs of TYPE, named PTX_TYPE in PTX.
#define CANDELA_MMA_M16N8K16(TYPE, PTX_TYPE)                                                     \
    template <>                                                                                  \
    __device__ __forceinline__ void mma_m16n8k16<TYPE>(float(&c)[4], const uint32_t(&a)[4],     \
                                                       uint32_t b0, uint32_t b1) {               \
        CANDELA_SM80(asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE \
                                  ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "          \
                                  "{%0, %1, %2, %3};\n"                                          \
                                  : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])               \
                                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0),         \
                                    "r"(b1));)                                                    \
    }
CANDELA_MMA_M16N8K16(__nv_bfloat16, "bf16")
CANDELA_MMA_M16N8K16(__half, "f16")

// 16 bytes from global to shared memory, asynchronously (cached in L2 only).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    CANDELA_SM80(const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
                 asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem)
                              : "memory");)
}
// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
    CANDELA_SM80(asm volatile("cp.async.commit_group;\n" ::: "memory");)
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    CANDELA_SM80(asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");)
}

#endif

} // namespace candela
