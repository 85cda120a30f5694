#include "attention.cu"
#include "registry.h"
CANDELA_EMU_TABLE(attention) {
#define ENTRY_D(NAME, D)                                                                         \
    CANDELA_EMU_KERNEL(paged_attention_##NAME##_d##D)                                            \
    CANDELA_EMU_KERNEL(paged_attention_reduce_##NAME##_d##D)
#define ENTRY(NAME, TYPE) ENTRY_D(NAME, 64) ENTRY_D(NAME, 128)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
#define ENTRY_MMA(NAME) CANDELA_EMU_KERNEL(paged_prefill_mma_##NAME##_d64) \
    CANDELA_EMU_KERNEL(paged_prefill_mma_##NAME##_d128)
    ENTRY_MMA(f16) ENTRY_MMA(bf16)
    return false;
}
