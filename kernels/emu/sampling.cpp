#include "sampling.cu"
#include "registry.h"
CANDELA_EMU_TABLE(sampling) {
    CANDELA_EMU_KERNEL(sample_rows)
    return false;
}
