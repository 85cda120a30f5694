#include "rotary.cu"
#include "registry.h"
CANDELA_EMU_TABLE(rotary) {
#define ENTRY(NAME, TYPE)                                                                          \
    CANDELA_EMU_KERNEL(rotary_##NAME)                                                              \
    CANDELA_EMU_KERNEL(rotary_interleaved_##NAME)                                                  \
    CANDELA_EMU_KERNEL(rotary_cache_##NAME)                                                        \
    CANDELA_EMU_KERNEL(rotary_interleaved_cache_##NAME)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
