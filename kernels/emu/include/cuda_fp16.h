// Half precision for the CPU stand-in of the CUDA runtime (see emu.h): conversions round to
// nearest even, as the device's do.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};
inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return (float)f;
}
inline __half __float2half_rn(float x) {
    const _Float16 f = (_Float16)x;
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
