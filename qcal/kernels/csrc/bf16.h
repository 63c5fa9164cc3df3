/* bf16 <-> fp32 helpers shared by qcal's kernels (bf16 is the upper half of an fp32). */
#ifndef QCAL_BF16_H
#define QCAL_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_scalar.h"

static inline __mmask16 qcal_tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* A float16 bit pattern broadcast to 16 fp32 lanes (exact). */
static inline __m512 qcal_half_broadcast(uint16_t h) { return _mm512_cvtph_ps(_mm256_set1_epi16((short)h)); }

/* 16 bf16 bit patterns as fp32 (exact). */
static inline __m512 qcal_bf16x16_to_ps(__m256i b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* 16 bf16 values as fp32 (lanes outside `live` read as zero). */
static inline __m512 qcal_load_bf16_masked(const uint16_t *p, __mmask16 live) {
    return qcal_bf16x16_to_ps(_mm256_maskz_loadu_epi16(live, p));
}

static inline __m512 qcal_load_bf16(const uint16_t *p) {
    return qcal_bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* fp32 -> nearest bf16 (round to nearest even) -> fp32: what a PyTorch bf16 op's result holds. */
static inline __m512 qcal_round_bf16(__m512 v) { return qcal_bf16x16_to_ps((__m256i)_mm512_cvtneps_pbh(v)); }

/* Round 16 fp32 values to bf16 and store the lanes in `live`. */
static inline void qcal_store_bf16_masked(uint16_t *p, __m512 v, __mmask16 live) {
    _mm256_mask_storeu_epi16(p, live, (__m256i)_mm512_cvtneps_pbh(v));
}

#endif
