// Tables of the kernels of one .cu file, by name, for the CPU stand-in of the CUDA runtime
// (see ../runtime.cpp): each entry is the kernel and a function that calls it with its
// arguments taken from a cuLaunchKernel-style array of pointers to their values.
#pragma once
#include <cstring>
#include <type_traits>
#include <utility>

namespace candela_emu {
using Invoker = void (*)(void *fn, void **args);

template <typename... A, size_t... I>
void call(void (*kernel)(A...), void **args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A> *>(args[I])...);
}
template <typename... A> void invoke(void *fn, void **args) {
    call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}
template <typename... A> Invoker invoker_of(void (*)(A...)) { return &invoke<A...>; }
} // namespace candela_emu

#define CANDELA_EMU_TABLE(FILE)                                                                  \
    bool candela_emu_find_##FILE(const char *name, void **fn, candela_emu::Invoker *invoker)
#define CANDELA_EMU_KERNEL(KERNEL)                                                               \
    if (!std::strcmp(name, #KERNEL)) {                                                           \
        *fn = reinterpret_cast<void *>(&KERNEL);                                                 \
        *invoker = candela_emu::invoker_of(&KERNEL);                                             \
        return true;                                                                             \
    }
