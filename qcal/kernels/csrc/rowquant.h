/* Per-row symmetric int8 quantization of bf16 activations, vectorized (shared by the 8da4w and A8W8 kernels).

   scale = FLT_MIN + amax / 127 (fp32), code = x / scale rounded half to even: the numbers of
   qcal.kernels.common.quantize_per_token (IEEE division and round-to-nearest-even in both). */
#ifndef QCAL_ROWQUANT_H
#define QCAL_ROWQUANT_H

#include <float.h>
#include <immintrin.h>
#include <stdint.h>

static inline __mmask16 qcal_tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

static inline __m512 qcal_load_bf16_masked(const uint16_t *p, __mmask16 live) {
    __m256i h = _mm256_maskz_loadu_epi16(live, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The row's scale; codes (as fp32 integers in [-127, 127]) go to emit(k, 16 codes, mask). */
static inline float qcal_row_scale(const uint16_t *x, int64_t K) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = qcal_tail16(K - k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(qcal_load_bf16_masked(x + k, live)));
    }
    return FLT_MIN + _mm512_reduce_max_ps(amax) / 127.f;
}

static inline __m512 qcal_codes16(const uint16_t *x, int64_t k, int64_t K, float scale) {
    const __m512 v = qcal_load_bf16_masked(x + k, qcal_tail16(K - k));
    return _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(scale)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

#endif
