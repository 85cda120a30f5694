// The scheduler behind emu.h: blocks run one after another, the threads of a block as fibers
// (ucontext) on the calling OS thread, switching only at barriers. Kernels are found by name in
// the per-file tables of kernels.cpp and called with cuLaunchKernel-style argument arrays.
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "emu.h"

// Per OS thread: a launch's fibers all run on the thread that launched it.
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace candela_emu {

using Invoker = void (*)(void *fn, void **args);
bool find_kernel(const char *name, void **fn, Invoker *invoker); // kernels.cpp

namespace {

constexpr size_t STACK = 128 * 1024;

enum class State { Runnable, Waiting, Done };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack; // uninitialised: pages a fiber never touches cost nothing
    dim3 idx;
    State state = State::Runnable;
    uint64_t value = 0; // this lane's value in a warp exchange
    unsigned char deposit[64]; // this lane's bytes in a warp gather
};

// A barrier over a set of fibers: releases when every fiber of the set that is still running
// has arrived.
struct Barrier {
    int arrived = 0;
    uint64_t generation = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    int current = 0;
    int running = 0;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<int> warp_running;
    void *fn = nullptr;
    Invoker invoker = nullptr;
    void **args = nullptr;
    std::string error;
};

thread_local Block *block = nullptr;

int warp_of(int f) { return f / 32; }

// The order the scheduler resumes fibers in, and runs blocks in: CANDELA_EMU_ORDER=forward (the
// default), reverse, shuffle (a new random order every round), or warp (blocks forward; each
// warp in turn runs until all its threads wait at a block barrier or are done). A kernel whose
// threads or blocks communicate without a barrier (a race on a GPU) gives different results
// under different orders, so the tests run under each catch it. The first three resume every
// thread once a round, so warps advance in near lockstep, one shuffle or mma at a time: a
// missing __syncthreads between warps that only exchange through shared memory across such
// steps shows only when warps drift apart between block barriers, as `warp` lets them.
enum class Order { Forward, Reverse, Shuffle, Warp };

Order order() {
    static const Order o = [] {
        const char *v = std::getenv("CANDELA_EMU_ORDER");
        const std::string s = v ? v : "";
        if (s.empty() || s == "forward") return Order::Forward;
        if (s == "reverse") return Order::Reverse;
        if (s == "shuffle") return Order::Shuffle;
        if (s == "warp") return Order::Warp;
        std::fprintf(stderr, "cuda emulator: CANDELA_EMU_ORDER=%s: forward, reverse, shuffle or warp\n",
                     s.c_str());
        std::abort();
    }();
    return o;
}

// 0..n-1 in the configured order (a fresh shuffle at each call).
void arrange(std::vector<int> &seq, int n) {
    seq.resize(n);
    for (int i = 0; i < n; ++i) seq[i] = order() == Order::Reverse ? n - 1 - i : i;
    if (order() != Order::Shuffle) return;
    thread_local uint64_t state = 0x9e3779b97f4a7c15u;
    for (int i = n - 1; i > 0; --i) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        std::swap(seq[i], seq[state % (uint64_t)(i + 1)]);
    }
}

[[noreturn]] void fail(const std::string &what) {
    // Unwinding across fibers is not possible: report and leave the process.
    std::fprintf(stderr, "cuda emulator: block (%u,%u,%u) thread %d: %s\n", blockIdx.x,
                 blockIdx.y, blockIdx.z, block->current, what.c_str());
    std::abort();
}

void yield() {
    Fiber &me = block->fibers[block->current];
    swapcontext(&me.ctx, &block->scheduler);
}

// Marks the waiters of a barrier runnable once the running fibers of its set have all arrived.
bool maybe_release(Barrier &b, int running, int first, int count) {
    if (b.arrived < running || running == 0) return false;
    b.arrived = 0;
    ++b.generation;
    for (int f = first; f < first + count; ++f)
        if (block->fibers[f].state == State::Waiting) block->fibers[f].state = State::Runnable;
    return true;
}

void wait_at(Barrier &b, int running, int first, int count) {
    Fiber &me = block->fibers[block->current];
    const uint64_t gen = b.generation;
    ++b.arrived;
    if (maybe_release(b, running, first, count)) return;
    me.state = State::Waiting;
    while (b.generation == gen) yield();
}

void fiber_main() {
    Block *b = block;
    b->invoker(b->fn, b->args);
    Fiber &me = b->fibers[b->current];
    me.state = State::Done;
    --b->running;
    const int w = warp_of(b->current);
    if (b->warps[w].arrived > 0) fail("a lane exited while the rest of its warp shuffles");
    --b->warp_running[w];
    // A thread that exits counts as arrived at the barriers the others wait at.
    maybe_release(b->block, b->running, 0, (int)b->fibers.size());
    const int first = w * 32;
    const int count = std::min<int>(32, (int)b->fibers.size() - first);
    maybe_release(b->warps[w], b->warp_running[w], first, count);
    // Returning resumes uc_link, the scheduler.
}

} // namespace

void sync_block() {
    wait_at(block->block, block->running, 0, (int)block->fibers.size());
}

int lane() { return block->current % 32; }

namespace {

// Checks that the whole warp of the running fiber can take part in a warp-wide operation.
void check_full_warp(int w) {
    const int size = std::min<int>(32, (int)block->fibers.size() - w * 32);
    if (size != 32) fail("a full-mask shuffle in a partial warp (blockDim.x not a multiple of 32)");
    if (block->warp_running[w] != 32) fail("a full-mask shuffle after a lane of the warp exited");
}

} // namespace

uint64_t warp_exchange(unsigned mask, uint64_t value, int src) {
    const int me = block->current, w = warp_of(me), first = w * 32;
    if (mask != 0xffffffffu) fail("shuffles with partial masks are not emulated");
    check_full_warp(w);
    block->fibers[me].value = value;
    wait_at(block->warps[w], 32, first, 32);
    const uint64_t got = block->fibers[first + (src & 31)].value;
    // Nobody may overwrite its value before every lane has read.
    wait_at(block->warps[w], 32, first, 32);
    return got;
}

void warp_gather(const void *mine, size_t bytes, void *all) {
    const int me = block->current, w = warp_of(me), first = w * 32;
    if (bytes > sizeof(Fiber::deposit)) fail("a warp gather of more than 64 bytes a lane");
    check_full_warp(w);
    std::memcpy(block->fibers[me].deposit, mine, bytes);
    wait_at(block->warps[w], 32, first, 32);
    for (int l = 0; l < 32; ++l)
        std::memcpy(static_cast<char *>(all) + l * bytes, block->fibers[first + l].deposit, bytes);
    wait_at(block->warps[w], 32, first, 32);
}

namespace {

void run_block(Block &b) {
    const int n = (int)b.fibers.size();
    b.running = n;
    b.block = Barrier{};
    for (auto &w : b.warps) w = Barrier{};
    for (int w = 0; w < (int)b.warp_running.size(); ++w)
        b.warp_running[w] = std::min(32, n - w * 32);
    for (int f = 0; f < n; ++f) {
        Fiber &fb = b.fibers[f];
        fb.state = State::Runnable;
        getcontext(&fb.ctx);
        fb.ctx.uc_stack.ss_sp = fb.stack.get();
        fb.ctx.uc_stack.ss_size = STACK;
        fb.ctx.uc_link = &b.scheduler;
        makecontext(&fb.ctx, fiber_main, 0);
    }
    std::vector<int> seq;
    if (order() == Order::Warp) {
        // Each warp in turn runs until every thread of it waits at a block barrier or is done,
        // so warps drift apart between block barriers as they may on a GPU.
        while (b.running > 0) {
            bool progressed = false;
            for (int w0 = 0; w0 < n; w0 += 32) {
                bool again = true;
                while (again) {
                    again = false;
                    for (int f = w0; f < std::min(n, w0 + 32); ++f) {
                        Fiber &fb = b.fibers[f];
                        if (fb.state != State::Runnable) continue;
                        b.current = f;
                        threadIdx = fb.idx;
                        swapcontext(&b.scheduler, &fb.ctx);
                        progressed = again = true;
                    }
                }
            }
            if (!progressed) {
                b.current = 0;
                fail("deadlock: every running thread waits at a barrier that cannot release");
            }
        }
        return;
    }
    while (b.running > 0) {
        bool progressed = false;
        arrange(seq, n);
        for (const int f : seq) {
            Fiber &fb = b.fibers[f];
            if (fb.state != State::Runnable) continue;
            b.current = f;
            threadIdx = fb.idx;
            swapcontext(&b.scheduler, &fb.ctx);
            progressed = true;
        }
        if (!progressed) {
            b.current = 0;
            fail("deadlock: every running thread waits at a barrier that cannot release");
        }
    }
}

} // namespace
} // namespace candela_emu

// Runs kernel `name` over `grid` blocks of `block_dim` threads with `args` (each a pointer to
// an argument's value, as cuLaunchKernel takes them). Returns 0, or -1 if there is no such
// kernel (message in `error`).
extern "C" int candela_emu_launch(const char *name, const unsigned grid[3],
                                  const unsigned block_dim[3], void **args, char *error,
                                  size_t error_len) {
    using namespace candela_emu;
    Block b;
    if (!find_kernel(name, &b.fn, &b.invoker)) {
        std::snprintf(error, error_len, "no kernel named %s", name);
        return -1;
    }
    const unsigned threads = block_dim[0] * block_dim[1] * block_dim[2];
    if (threads == 0 || threads > 1024) {
        std::snprintf(error, error_len, "%u threads a block", threads);
        return -1;
    }
    b.args = args;
    b.fibers.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
        b.fibers[t].stack.reset(new char[STACK]);
        b.fibers[t].idx = dim3{t % block_dim[0], t / block_dim[0] % block_dim[1],
                               t / (block_dim[0] * block_dim[1])};
    }
    b.warps.resize((threads + 31) / 32);
    b.warp_running.resize(b.warps.size());
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block_dim[0], block_dim[1], block_dim[2]};
    block = &b;
    std::vector<int> blocks;
    arrange(blocks, (int)(grid[0] * grid[1] * grid[2]));
    for (const int i : blocks) {
        blockIdx = dim3{i % grid[0], i / grid[0] % grid[1], i / (grid[0] * grid[1])};
        run_block(b);
    }
    block = nullptr;
    return 0;
}
