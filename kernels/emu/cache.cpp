#include "cache.cu"
#include "registry.h"
CANDELA_EMU_TABLE(cache) {
#define ENTRY(NAME, TYPE) CANDELA_EMU_KERNEL(write_cache_##NAME)
    CANDELA_FOR_FLOAT_TYPES(ENTRY)
    return false;
}
