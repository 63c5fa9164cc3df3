// The elementwise steps of a Llama decoder layer in bf16, one call each (AVX512), with Hugging Face's
// rounding: every PyTorch op of the reference rounds its result to bf16, and so does each step here.
//
// add_rmsnorm: x += delta (in place, rounded), out = w * bf16(x * rsqrt(mean(x^2) + eps)) (LlamaRMSNorm);
// rope_store:  rotary embedding (rotate-half form) of head rows, written to any strided destination
//                   (the query in place, the key into its cache slot), or a plain strided copy (the value);
// silu_mul:    g = bf16(bf16(silu(g)) * u) (LlamaMLP's act_fn(gate) * up).
// Row lengths need not be multiples of 16. Single-threaded: at decode sizes a thread team costs more than it saves.
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "ops.h"
#include "rope.h"
#include "vexp.h"

static int add_rmsnorm_rows(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out, int64_t m, int64_t n,
                     float eps) {
    if (m < 0 || n <= 0) return -1;
    for (int64_t r = 0; r < m; r++) {
        uint16_t *xr = x + r * n;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = qcal_tail16(n - j);
            __m512 v = qcal_load_bf16_masked(xr + j, live);
            if (delta) {
                v = qcal_round_bf16(_mm512_add_ps(v, qcal_load_bf16_masked(delta + r * n + j, live)));
                qcal_store_bf16_masked(xr + j, v, live);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float inv = 1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = qcal_tail16(n - j);
            const __m512 h = qcal_round_bf16(_mm512_mul_ps(qcal_load_bf16_masked(xr + j, live), vinv));
            qcal_store_bf16_masked(out + r * n + j, _mm512_mul_ps(h, qcal_load_bf16_masked(w + j, live)), live);
        }
    }
    return 0;
}

static int silu_mul_rows(uint16_t *g, const uint16_t *u, int64_t n) {
    if (n < 0) return -1;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = qcal_tail16(n - j);
        const __m512 x = qcal_load_bf16_masked(g + j, live);
        // silu(x) = x / (1 + e^-x); with e = e^-|x|: x / (1 + e) for x >= 0, x e / (1 + e) below
        const __m512 e = qcal_exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);
        const __m512 s = qcal_round_bf16(_mm512_div_ps(num, _mm512_add_ps(one, e)));
        qcal_store_bf16_masked(g + j, _mm512_mul_ps(s, qcal_load_bf16_masked(u + j, live)), live);
    }
    return 0;
}

// the decode step keeps one team of threads: this build's step operators (the matmuls' qcal_run_units, decode
// attention) post their parallel parts to it
#define QCAL_STEP_TEAM 1
#include "decode_ops_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
