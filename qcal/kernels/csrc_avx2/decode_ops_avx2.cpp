// The elementwise steps of a Llama decoder layer in bf16, one call each, AVX2/FMA: the AVX-512 decode_ops.cpp
// (qcal/runtime/csrc) for CPUs without AVX-512, with the same schemas, checks and results. Hugging Face's rounding:
// every PyTorch op of the reference rounds its result to bf16, and so does each step here.
//
// add_rmsnorm: x += delta (in place, rounded), out = w * bf16(x * rsqrt(mean(x^2) + eps)) (LlamaRMSNorm);
// rope_store:  rotary embedding (rotate-half form) of head rows, written to any strided destination
//                   (the query in place, the key into its cache slot), or a plain strided copy (the value);
// silu_mul:    g = bf16(bf16(silu(g)) * u) (LlamaMLP's act_fn(gate) * up).
// Row lengths need not be multiples of 8. Single-threaded: at decode sizes a thread team costs more than it saves.
//
// Bit for bit the AVX-512 kernels' results: the sum of squares keeps the 16 lane sums of the AVX-512 accumulator as
// two 8-lane halves and adds them as _mm512_reduce_add_ps does (the halves lane by lane, then the same tree), and e^x
// is the same polynomial with the same roundings (avx2.h). One exception, for values below 2^-126 only: the AVX-512
// kernels round to bf16 with vcvtneps2bf16, which flushes such (denormal) values to zero, where avx2.h rounds them
// as PyTorch does.
#include <immintrin.h>
#include <stdint.h>

#include "avx2.h"
#include "ops.h"
#include "rope_avx2.h"

static int add_rmsnorm_rows(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out, int64_t m, int64_t n,
                            float eps) {
    if (m < 0 || n <= 0) return -1;
    for (int64_t r = 0; r < m; r++) {
        uint16_t *xr = x + r * n;
        const uint16_t *dr = delta ? delta + r * n : nullptr;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps(); /* lanes 0-7 and 8-15 of a 16-lane sum */
        for (int64_t j = 0; j < n; j += 8) {
            const int64_t left = n - j;
            __m256 v = left >= 8 ? qcal_load8_bf16(xr + j) : qcal_load8_bf16_tail(xr + j, left);
            if (dr) {
                v = qcal_round8_bf16(
                    _mm256_add_ps(v, left >= 8 ? qcal_load8_bf16(dr + j) : qcal_load8_bf16_tail(dr + j, left)));
                if (left >= 8)
                    qcal_store8_bf16(xr + j, v);
                else
                    qcal_store8_bf16_tail(xr + j, v, left);
            }
            if (j & 8)
                hi = _mm256_fmadd_ps(v, v, hi);
            else
                lo = _mm256_fmadd_ps(v, v, lo);
        }
        const float inv = 1.0f / __builtin_sqrtf(qcal_hsum8(_mm256_add_ps(lo, hi)) / (float)n + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        uint16_t *orow = out + r * n;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            const __m256 h = qcal_round8_bf16(_mm256_mul_ps(qcal_load8_bf16(xr + j), vinv));
            qcal_store8_bf16(orow + j, _mm256_mul_ps(h, qcal_load8_bf16(w + j)));
        }
        if (j < n) {
            const __m256 h = qcal_round8_bf16(_mm256_mul_ps(qcal_load8_bf16_tail(xr + j, n - j), vinv));
            qcal_store8_bf16_tail(orow + j, _mm256_mul_ps(h, qcal_load8_bf16_tail(w + j, n - j)), n - j);
        }
    }
    return 0;
}

static inline __m256 silu8(__m256 x) {
    // silu(x) = x / (1 + e^-x); with e = e^-|x|: x / (1 + e) for x >= 0, x e / (1 + e) below
    __m256 e = qcal_exp8_nonpos(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)));
    __asm__("" : "+x"(e)); /* e rounded on its own: 1 + e must not become a fused multiply-add of exp's last product */
    const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), neg);
    return qcal_round8_bf16(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
}

static int silu_mul_rows(uint16_t *g, const uint16_t *u, int64_t n) {
    if (n < 0) return -1;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        qcal_store8_bf16(g + j, _mm256_mul_ps(silu8(qcal_load8_bf16(g + j)), qcal_load8_bf16(u + j)));
    if (j < n)
        qcal_store8_bf16_tail(g + j, _mm256_mul_ps(silu8(qcal_load8_bf16_tail(g + j, n - j)),
                                                   qcal_load8_bf16_tail(u + j, n - j)), n - j);
    return 0;
}

// the decode step keeps one team of threads: this build's step operators (the matmuls' qcal_run_units, decode
// attention) post their parallel parts to it
#define QCAL_STEP_TEAM 1
#include "decode_ops_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
