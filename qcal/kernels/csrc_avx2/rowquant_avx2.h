/* Per-row symmetric int8 quantization of bf16 activations for qcal's AVX2/FMA kernels: the numbers of
   csrc/rowquant.h (the AVX-512 kernels' quantizer), bit for bit, codes and scales.

   scale = FLT_MIN + amax / 127 (fp32), code = x / scale rounded half to even: the numbers of
   qcal.kernels.common.quantize_per_token (IEEE division and round-to-nearest-even in both). A row holding
   NaN or Inf gets a NaN scale, so its output row is NaN as on the reference path; its codes are then 0, the low
   byte of the integer indefinite 0x80000000 that the conversion of NaN gives (the AVX-512 quantizer narrows
   with truncation, vpmovdb, and so does this one: AVX2's saturating packs would give -128). */
#ifndef QCAL_ROWQUANT_AVX2_H
#define QCAL_ROWQUANT_AVX2_H

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "avx2.h"

/* The largest |x| of a row of K bf16 values; *nonfinite is set where the row holds NaN or Inf (vmaxps alone would
   drop a NaN depending on its position; the value returned is then meaningless). */
static inline float qcal_row_amax(const uint16_t *x, int64_t K, int *nonfinite) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 v = K - k >= 8 ? qcal_load8_bf16(x + k) : qcal_load8_bf16_tail(x + k, K - k);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // NaN, Inf
        amax = _mm256_max_ps(amax, _mm256_and_ps(v, absmask));
    }
    *nonfinite = _mm256_movemask_ps(bad) != 0;
    return qcal_hmax8(amax);
}

/* The low byte of each of 8 int32 lanes (truncation), in the low 8 bytes. */
static inline __m128i qcal_low_bytes8(__m256i v) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i b = _mm256_shuffle_epi8(v, pick);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}

/* Quantize one row of K values into bytes q[0..K) (writes exactly K bytes) and return its scale. The bytes are the
   int8 codes XOR `flip`: 0 gives signed codes, 0x80 gives code + 128 as unsigned. */
static inline float qcal_quantize_row(const uint16_t *x, int64_t K, uint8_t *q, uint8_t flip) {
    int nonfinite;
    const float top = qcal_row_amax(x, K, &nonfinite);
    const float scale = nonfinite ? NAN : FLT_MIN + top / 127.f;
    const __m256 vs = _mm256_set1_ps(scale);
    const __m128i vf = _mm_set1_epi8((char)flip);
    for (int64_t k = 0; k < K; k += 8) {
        const int64_t n = K - k;
        const __m256 v = n >= 8 ? qcal_load8_bf16(x + k) : qcal_load8_bf16_tail(x + k, n);
        const __m256 c = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m128i b = _mm_xor_si128(qcal_low_bytes8(_mm256_cvtps_epi32(c)), vf);
        if (n >= 8) {
            _mm_storel_epi64((__m128i *)(q + k), b);
        } else {
            uint8_t tmp[16];
            _mm_storeu_si128((__m128i *)tmp, b);
            memcpy(q + k, tmp, (size_t)n);
        }
    }
    return scale;
}

#endif
