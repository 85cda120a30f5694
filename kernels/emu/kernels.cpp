// The kernels the CPU stand-in of the CUDA runtime can launch: one table per .cu file, each
// compiled on its own (the files' internal names would clash in one translation unit).
#include "registry.h"

#define FILES(X) X(activation) X(attention) X(cache) X(matmul) X(norm) X(rotary) X(sampling)
#define DECLARE(FILE) CANDELA_EMU_TABLE(FILE);
FILES(DECLARE)

namespace candela_emu {
bool find_kernel(const char *name, void **fn, Invoker *invoker) {
#define FIND(FILE)                                                                               \
    if (candela_emu_find_##FILE(name, fn, invoker)) return true;
    FILES(FIND)
    return false;
}
} // namespace candela_emu
