/* qcal: int4 (and int8) weight -> bf16, for the large-M (prefill) path that dequantizes once and runs a bf16 GEMM.

   w[n, k] = (u[n, k] - 8 - zp[n, g]) * s[n, g],  g = k / gs, computed in fp32 and rounded once to bf16.
   u: canonical packed codes (N, K/2) uint8, low nibble = even column; s, zp: (N, G) fp32 (zp may be NULL).
   One pass over the weight (16 codes -> 32 bf16 per step) instead of PyTorch's several elementwise ops. */
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "ops.h"

static int dequant(const uint8_t *u, const float *s, const float *zp, uint16_t *w, int64_t N, int64_t K,
                   int64_t gs, int nthreads) {
    if (K % 32 || gs % 32 || gs <= 0 || K % gs || N < 0) return -1;
    const int64_t G = K / gs;
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *ur = u + n * (K / 2);
        uint16_t *wr = w + n * K;
        for (int64_t g = 0; g < G; g++) {
            const __m512 sv = _mm512_set1_ps(s[n * G + g]);
            const __m512 ov = _mm512_set1_ps(8.0f + (zp ? zp[n * G + g] : 0.0f));
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ur + k / 2)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                const __m256i l16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(lo, ov), sv));
                const __m256i h16 = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(hi, ov), sv));
                const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(l16),
                                                     _mm512_slli_epi32(_mm512_cvtepu16_epi32(h16), 16));
                _mm512_storeu_si512(wr + k, pair);
            }
        }
    }
    return 0;
}

/* int8 weight -> bf16: w[n, k] = q[n, k] * s[n] in fp32, rounded once (weight-only convolutions dequantize per call). */
static void dequant8(const int8_t *q, const float *s, uint16_t *w, int64_t N, int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m512 sv = _mm512_set1_ps(s[n]);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 m = qcal_tail16(K - k);
            const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + n * K + k)));
            _mm256_mask_storeu_epi16(w + n * K + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, sv)));
        }
    }
}

#include "dequant_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
