#include "activation.cu"
#include "registry.h"
CANDELA_EMU_TABLE(activation) {
#define ENTRY(NAME, TYPE) CANDELA_EMU_KERNEL(silu_mul_##NAME)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
