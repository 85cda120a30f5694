#include "norm.cu"
#include "registry.h"
CANDELA_EMU_TABLE(norm) {
#define ENTRY(NAME, TYPE) CANDELA_EMU_KERNEL(rms_norm_##NAME) CANDELA_EMU_KERNEL(add_rms_norm_##NAME)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
