/* Scalar bf16 <-> fp32 conversions for every build (no vector instructions): bf16 is the upper half of an fp32;
   rounding is to nearest even, and a NaN stays a NaN (quieted) instead of rounding into Inf or another value. */
#ifndef QCAL_BF16_SCALAR_H
#define QCAL_BF16_SCALAR_H

#include <stdint.h>
#include <string.h>

static inline float qcal_bf16_to_float(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t qcal_float_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

#endif
