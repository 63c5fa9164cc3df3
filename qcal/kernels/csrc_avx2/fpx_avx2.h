/* The sub-byte float weights' codes and values in AVX2 registers, shared by the small-M kernel (fpx_avx2.cpp) and
   the panel (panel_avx2.cpp): per row, the low 4 bits of every code two a byte, then the high bits (2 a code for fp6,
   1 for fp5) packed low first; a value looked up from the format's table widened to fp32. */
#ifndef QCAL_FPX_AVX2_H
#define QCAL_FPX_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16_scalar.h"

#define FPX_AI static inline __attribute__((always_inline))

/* Codes of the even and odd columns k + 16 h + 2 i, k + 16 h + 2 i + 1 (i = 0..7: lanes) of a row, k a multiple of
   32: lo the row's nibble plane, hi its plane of high bits (HB = BITS - 4 a column: column c at bit HB c). */
template <int BITS>
FPX_AI void fpx_codes16(const uint8_t *lo, const uint8_t *hi, int64_t c0, __m256i *even, __m256i *odd) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(lo + c0 / 2)));
    __m256i e = _mm256_and_si256(b, _mm256_set1_epi32(15)), o = _mm256_srli_epi32(b, 4);
    if constexpr (BITS > 4) { /* the 16 columns' high bits: 2 HB bytes */
        constexpr int HB = BITS - 4;
        uint32_t raw = 0;
        memcpy(&raw, hi + c0 * HB / 8, 2 * HB);
        const __m256i v = _mm256_set1_epi32((int)raw), mask = _mm256_set1_epi32((1 << HB) - 1);
        const __m256i sh = _mm256_setr_epi32(0, 2 * HB, 4 * HB, 6 * HB, 8 * HB, 10 * HB, 12 * HB, 14 * HB);
        e = _mm256_or_si256(e, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(v, sh), mask), 4));
        o = _mm256_or_si256(
            o, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(v, _mm256_add_epi32(sh, _mm256_set1_epi32(HB))),
                                                  mask), 4));
    }
    *even = e;
    *odd = o;
}

/* t[i] for i = bit 3 of c: the entries of codes with that bit (vpermps reads c's low 3 bits). */
FPX_AI __m256 fpx_pick(__m256 a, __m256 b, __m256i c, int bit) {
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(c, 31 - bit)));
}

/* The values of codes c from the fp32 table t (2^BITS entries). SYM: the table's upper half is its lower half
   negated (a sign bit on top: these formats), so the lower half is looked up and the sign bit moved into place. */
template <int BITS, bool SYM> FPX_AI __m256 fpx_lookup(const float *t, __m256i c) {
    constexpr int LB = SYM ? BITS - 1 : BITS; /* the bits looked up */
    __m256 v[8];
    for (int j = 0; j < (1 << (LB - 3)); j++) v[j] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(t + 8 * j), c);
    for (int bit = 3, n = 1 << (LB - 3); n > 1; bit++, n /= 2)
        for (int j = 0; j < n / 2; j++) v[j] = fpx_pick(v[2 * j], v[2 * j + 1], c, bit);
    if (!SYM) return v[0];
    return _mm256_xor_ps(v[0], _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(c, BITS - 1), 31)));
}

/* The format's table (64 bf16 entries, 2^bits used) widened to fp32 into t; returns whether its upper half is its
   lower half negated (a sign bit on top: the lookups' SYM). */
static inline bool fpx_table(const uint16_t *lut, int bits, float t[64]) {
    for (int i = 0; i < 64; i++) t[i] = qcal_bf16_to_float(lut[i]);
    const int half = 1 << (bits - 1);
    for (int i = 0; i < half; i++)
        if (lut[i + half] != (lut[i] ^ 0x8000)) return false;
    return true;
}

#endif
