// bfloat16 for the CPU stand-in of the CUDA runtime (see emu.h): conversions round to nearest
// even and keep NaN a NaN, as the device's do.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    __nv_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = (uint16_t)((u >> 16) | 0x40); // quiet NaN
    } else {
        b.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
    }
    return b;
}
