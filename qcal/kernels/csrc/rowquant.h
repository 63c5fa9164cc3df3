/* Per-row symmetric int8 quantization of bf16 activations, vectorized (shared by the 8da4w and A8W8 kernels).

   scale = FLT_MIN + amax / 127 (fp32), code = x / scale rounded half to even: the numbers of
   qcal.kernels.common.quantize_per_token (IEEE division and round-to-nearest-even in both). A row holding
   NaN or Inf gets a NaN scale, so its output row is NaN as on the reference path (vmaxps alone would drop a
   NaN depending on its position). */
#ifndef QCAL_ROWQUANT_H
#define QCAL_ROWQUANT_H

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* Quantize one row of K values into bytes q[0..K) and return its scale. The bytes are the int8 codes XOR
   `flip`: 0 gives signed codes, 0x80 gives code + 128 as unsigned (for vpdpbusd's unsigned operand). */
/* The largest |x| of a row of K bf16 values; *nonfinite is set where the row holds NaN or Inf (vmaxps alone would
   drop a NaN depending on its position). */
static inline float qcal_row_amax(const uint16_t *x, int64_t K, int *nonfinite) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = qcal_load_bf16_masked(x + k, qcal_tail16(K - k));
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ);  // NaN or +-Inf
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    *nonfinite = bad != 0;
    return _mm512_reduce_max_ps(amax);
}

static inline float qcal_quantize_row(const uint16_t *x, int64_t K, uint8_t *q, uint8_t flip) {
    int nonfinite;
    const float top = qcal_row_amax(x, K, &nonfinite);
    const float scale = nonfinite ? NAN : FLT_MIN + top / 127.f;
    const __m512 vs = _mm512_set1_ps(scale);
    const __m128i vf = _mm_set1_epi8((char)flip);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = qcal_tail16(K - k);
        const __m512 c = _mm512_roundscale_ps(_mm512_div_ps(qcal_load_bf16_masked(x + k, live), vs),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(q + k, live, _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)), vf));
    }
    return scale;
}

#endif
