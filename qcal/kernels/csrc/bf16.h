/* bf16 <-> fp32 helpers shared by qcal's kernels (bf16 is the upper half of an fp32). */
#ifndef QCAL_BF16_H
#define QCAL_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float qcal_bf16_to_float(uint16_t h) {
    const uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline uint16_t qcal_float_to_bf16(float f) { /* round to nearest even (finite inputs) */
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

static inline __mmask16 qcal_tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* 16 bf16 values as fp32 (lanes outside `live` read as zero). */
static inline __m512 qcal_load_bf16_masked(const uint16_t *p, __mmask16 live) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

static inline __m512 qcal_load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#endif
