#include "matmul.cu"
#include "registry.h"
CANDELA_EMU_TABLE(matmul) {
#define ENTRY(NAME, TYPE)                                                                          \
    CANDELA_EMU_KERNEL(skinny_gemm_##NAME)                                                         \
    CANDELA_EMU_KERNEL(skinny_gemm_wide_##NAME)                                                    \
    CANDELA_EMU_KERNEL(skinny_gemm_silu_##NAME)                                                    \
    CANDELA_EMU_KERNEL(skinny_gemm_wide_silu_##NAME)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
