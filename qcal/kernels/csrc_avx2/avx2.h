/* bf16 <-> fp32 and small vector helpers shared by qcal's AVX2/FMA kernels (the library built on CPUs without
   AVX512-BF16/VNNI). bf16 is the upper half of an fp32; rounding is to nearest even, as the AVX-512 kernels'
   vcvtneps2bf16 (which also treats denormal inputs as zero: results there can differ in the last bit for values
   below 2^-126, where this header rounds them as ordinary numbers). */
#ifndef QCAL_AVX2_H
#define QCAL_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_scalar.h"

/* vdpbf16ps's floating-point environment as an MXCSR: round to nearest even, FTZ, DAZ, every exception masked. */
#define QCAL_VDP_MXCSR 0x9FC0u

/* 8 bf16 values (16 bytes) as fp32 (exact). */
static inline __m256 qcal_load8_bf16(const uint16_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

/* Denormal lanes as zero of the same sign: how vdpbf16ps reads its bf16 inputs (DAZ). */
static inline __m256 qcal_daz8(__m256 v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i den = _mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
    return _mm256_castsi256_ps(_mm256_blendv_epi8(b, _mm256_and_si256(b, _mm256_set1_epi32((int)0x80000000u)), den));
}

/* The first n (0..8) bf16 values at p as fp32, the other lanes zero; reads only n values. */
static inline __m256 qcal_load8_bf16_tail(const uint16_t *p, int64_t n) {
    uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(tmp, p, (size_t)(n < 8 ? (n > 0 ? n : 0) : 8) * 2);
    return qcal_load8_bf16(tmp);
}

/* fp32 -> bf16 bit patterns in the upper 16 bits of each lane (round to nearest even; NaN quieted). */
static inline __m256i qcal_bf16_bits8(__m256 v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i q = _mm256_or_si256(b, _mm256_set1_epi32(0x00400000));
    return _mm256_and_si256(_mm256_blendv_epi8(r, q, nan), _mm256_set1_epi32((int)0xffff0000u));
}

/* fp32 -> nearest bf16 -> fp32: what a PyTorch bf16 op's result holds. */
static inline __m256 qcal_round8_bf16(__m256 v) { return _mm256_castsi256_ps(qcal_bf16_bits8(v)); }

/* Round 8 fp32 values to bf16 and store them (16 bytes). */
static inline void qcal_store8_bf16(uint16_t *p, __m256 v) {
    const __m256i s = _mm256_srli_epi32(qcal_bf16_bits8(v), 16);
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
}

/* Round and store the first n (0..8) lanes only. */
static inline void qcal_store8_bf16_tail(uint16_t *p, __m256 v, int64_t n) {
    uint16_t tmp[8];
    qcal_store8_bf16(tmp, v);
    memcpy(p, tmp, (size_t)(n < 8 ? (n > 0 ? n : 0) : 8) * 2);
}

/* 8 float8 e4m3fn codes (the low byte of each 32-bit lane; the rest zero or ignored above bit 7 -- pass bytes) as
   their fp32 values, exact and normal: a normal code (exponent e >= 1) moves its exponent and mantissa bits into
   place and rebiases (e + 120); a subnormal one (m 2^-9, m < 8) is m converted, times 2^-9. Codes 0x7F / 0xFF (NaN)
   read as +-480: weights hold no NaN (quantization clamps them to +-448). */
static inline __m256 qcal_e4m3_to_ps8(__m256i c) {
    const __m256i em = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
    const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(0x1p-9f));
    const __m256 v = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub,
                                      _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em)));
    return _mm256_or_ps(v, _mm256_castsi256_ps(sign));
}

static inline float qcal_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float qcal_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for x <= 0, the AVX-512 kernels' polynomial (2^(x log2 e), degree-6 Taylor polynomial of 2^f on
   [-0.5, 0.5], relative error ~2e-7) with the same roundings: the scaling by 2^n is exact in two steps where
   2^n alone would be subnormal, as vscalefps is. */
static inline __m256 qcal_exp8_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-100.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    /* n in [-145, 0]: 2^a * 2^b with a = floor(n / 2) (an arithmetic shift), b = n - a, both normal */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
    const __m256 pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(127)), 23));
    const __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, pa), pb);
}

#endif
