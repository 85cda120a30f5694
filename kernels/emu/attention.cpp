#include "attention.cu"
#include "registry.h"
CANDELA_EMU_TABLE(attention) {
#define ENTRY_D(NAME, D)                                                                         \
    CANDELA_EMU_KERNEL(paged_attention_##NAME##_d##D)                                            \
    CANDELA_EMU_KERNEL(paged_attention_reduce_##NAME##_d##D)
#define ENTRY(NAME, TYPE) ENTRY_D(NAME, 64) ENTRY_D(NAME, 128)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
