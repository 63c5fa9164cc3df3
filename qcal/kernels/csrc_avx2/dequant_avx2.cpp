/* qcal: int4 / int8 weight -> bf16 for AVX2/FMA CPUs, the AVX2 build of csrc/dequant_int4.cpp: the same operators
   (dequant_w4, dequant_w8), checks and numbers (each value computed in fp32 and rounded once to bf16, to nearest
   even; a denormal result is kept where vcvtneps2bf16 flushes it). One pass over the weight, for the large-M
   (prefill) paths that dequantize once and run a GEMM. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "avx2.h"
#include "ops.h"

/* Rounded fp32 values of the even (lo) and odd (hi) columns -> 8 interleaved bf16 pairs (16 values). */
static inline __m256i interleave_bf16(__m256 lo, __m256 hi) {
    return _mm256_or_si256(_mm256_srli_epi32(qcal_bf16_bits8(lo), 16), qcal_bf16_bits8(hi));
}

/* w[n, k] = (u[n, k] - (8 + zp[n, g])) * s[n, g] in fp32, rounded once; u: canonical packed codes (N, K/2), low
   nibble = even column. Returns 0, or -1 for unsupported arguments. */
static int dequant(const uint8_t *u, const float *s, const float *zp, uint16_t *w, int64_t N, int64_t K, int64_t gs,
                   int nthreads) {
    if (K % 32 || gs % 32 || gs <= 0 || K % gs || N < 0) return -1;
    const int64_t G = K / gs;
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *ur = u + n * (K / 2);
        uint16_t *wr = w + n * K;
        for (int64_t g = 0; g < G; g++) {
            const __m256 sv = _mm256_set1_ps(s[n * G + g]);
            const __m256 ov = _mm256_set1_ps(8.0f + (zp ? zp[n * G + g] : 0.0f));
            for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) { /* 8 bytes: columns k..k+15 */
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ur + k / 2)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                _mm256_storeu_si256((__m256i *)(wr + k),
                                    interleave_bf16(_mm256_mul_ps(_mm256_sub_ps(lo, ov), sv),
                                                    _mm256_mul_ps(_mm256_sub_ps(hi, ov), sv)));
            }
        }
    }
    return 0;
}

/* w[n, k] = q[n, k] * s[n] in fp32, rounded once. */
static void dequant8(const int8_t *q, const float *s, uint16_t *w, int64_t N, int64_t K, int nthreads) {
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m256 sv = _mm256_set1_ps(s[n]);
        const int8_t *qr = q + n * K;
        uint16_t *wr = w + n * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + k))));
            qcal_store8_bf16(wr + k, _mm256_mul_ps(v, sv));
        }
        for (; k < K; k++) wr[k] = qcal_float_to_bf16((float)qr[k] * s[n]);
    }
}

#include "dequant_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
