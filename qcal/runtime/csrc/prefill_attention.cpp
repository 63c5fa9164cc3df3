// Causal attention of n query positions over a bf16 KV cache (a prefill), AVX512-BF16, flash style.
//
// Query i sits at position start + i and sees keys 0 .. start + i. Each KV head's keys and values are first
// re-laid for vdpbf16ps (keys: blocks of 16, per pair of dimensions 16 (k[j, 2t], k[j, 2t + 1]) pairs; values:
// per pair of keys, D (v[2u, d], v[2u + 1, d]) pairs), then work items of 4 query rows x one KV head's G query
// heads walk the visible keys in blocks of 64: scores in fp32 (16 accumulators), online softmax (running max
// and sum, fp32), probabilities rounded to bf16 for the P V product (fp32 accumulators), one rounding of the
// output. Query rows and outputs are token-major (what the projections produce and o_proj reads).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "ops.h"
#include "vexp.h"

#define PA_QB 4    /* query rows per work item */
#define PA_KB 64   /* keys per block */
#define PA_MAX_D 256

typedef struct {
    const uint16_t *q;
    uint16_t *out;
    const uint16_t *kp, *vp; /* packed keys / values, per KV head */
    int64_t q_rs, o_rs, n, G, start, D, lpad;
    float scale;
} pa_ctx;

static void pack_kv(const uint16_t *k, const uint16_t *v, int64_t kv_rs, int64_t L, int64_t lpad, int64_t D,
                    uint16_t *kp, uint16_t *vp) {
    memset(kp, 0, (size_t)(lpad * D) * 2);
    memset(vp, 0, (size_t)(lpad * D) * 2);
    for (int64_t j = 0; j < L; j++) {
        const uint16_t *kr = k + j * kv_rs, *vr = v + j * kv_rs;
        uint16_t *kb = kp + (j / 16) * 16 * D + (j % 16) * 2; /* block j/16: D/2 lines of 32 */
        for (int64_t t = 0; t < D / 2; t++) {
            kb[t * 32] = kr[2 * t];
            kb[t * 32 + 1] = kr[2 * t + 1];
        }
        uint16_t *vb = vp + (j / 2) * 2 * D + (j % 2);
        for (int64_t d = 0; d < D; d++) vb[2 * d] = vr[d];
    }
}

/* Scores of rows [i0, i0 + mb) of head h against keys [kb0, kb0 + 16 nch), scaled, in s[m][...] (fp32). */
static inline void scores(const pa_ctx *c, const uint16_t *kp, int64_t h, int64_t i0, int mb, int64_t kb0, int nch,
                          float s[PA_QB][PA_KB]) {
    __m512 acc[PA_QB][PA_KB / 16];
    for (int m = 0; m < PA_QB; m++)
        for (int ch = 0; ch < PA_KB / 16; ch++) acc[m][ch] = _mm512_setzero_ps();
    const uint16_t *kblk = kp + (kb0 / 16) * 16 * c->D;
    for (int64_t t = 0; t < c->D / 2; t++) {
        __m512bh kv[PA_KB / 16];
        for (int ch = 0; ch < nch; ch++) kv[ch] = (__m512bh)_mm512_loadu_si512(kblk + ch * 16 * c->D + t * 32);
        for (int m = 0; m < mb; m++) {
            int32_t pair;
            memcpy(&pair, c->q + (i0 + m) * c->q_rs + h * c->D + 2 * t, 4);
            const __m512bh qb = (__m512bh)_mm512_set1_epi32(pair);
            for (int ch = 0; ch < nch; ch++) acc[m][ch] = _mm512_dpbf16_ps(acc[m][ch], qb, kv[ch]);
        }
    }
    const __m512 sc = _mm512_set1_ps(c->scale);
    for (int m = 0; m < mb; m++)
        for (int ch = 0; ch < nch; ch++) _mm512_storeu_ps(s[m] + 16 * ch, _mm512_mul_ps(acc[m][ch], sc));
}

static void attend_rows(const pa_ctx *c, int64_t g, int64_t i0, int mb) {
    const int64_t D = c->D;
    const uint16_t *kp = c->kp + g * c->lpad * D, *vp = c->vp + g * c->lpad * D;
    float s[PA_QB][PA_KB] __attribute__((aligned(64)));
    uint16_t p[PA_QB][PA_KB] __attribute__((aligned(64)));
    float o[PA_QB][PA_MAX_D] __attribute__((aligned(64)));
    float mx[PA_QB], l[PA_QB];
    const int64_t last = c->start + i0 + mb - 1; /* the last position these rows see */
    for (int64_t r = 0; r < c->G; r++) {
        const int64_t h = g * c->G + r;
        for (int m = 0; m < mb; m++) {
            mx[m] = -INFINITY;
            l[m] = 0.0f;
            memset(o[m], 0, (size_t)D * sizeof(float));
        }
        for (int64_t kb0 = 0; kb0 <= last; kb0 += PA_KB) {
            const int64_t kc = last + 1 - kb0 < PA_KB ? last + 1 - kb0 : PA_KB;
            const int nch = (int)((kc + 15) / 16);
            scores(c, kp, h, i0, mb, kb0, nch, s);
            for (int m = 0; m < mb; m++) { /* mask, online softmax, probabilities as bf16 */
                const int64_t see = c->start + i0 + m - kb0 + 1; /* keys of this block the row sees */
                const int64_t live = see < 16 * nch ? see : 16 * nch;
                float bm = -INFINITY;
                for (int64_t j = 0; j < live; j++) bm = s[m][j] > bm ? s[m][j] : bm;
                const float mnew = bm > mx[m] ? bm : mx[m];
                const float corr = mx[m] == -INFINITY ? 0.0f : expf(mx[m] - mnew);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < 16 * nch; j += 16) {
                    const __mmask16 on = live - j <= 0 ? 0 : qcal_tail16(live - j);
                    const __m512 e = _mm512_maskz_mov_ps(on, qcal_exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s[m] + j),
                                                                                          _mm512_set1_ps(mnew))));
                    const __m256i eb = (__m256i)_mm512_cvtneps_pbh(e);
                    _mm256_storeu_si256((__m256i *)(p[m] + j), eb);
                    sum = _mm512_add_ps(sum, qcal_bf16x16_to_ps(eb));
                }
                l[m] = l[m] * corr + _mm512_reduce_add_ps(sum); /* the sum of the bf16 weights P V uses */
                mx[m] = mnew;
                if (corr != 1.0f)
                    for (int64_t d = 0; d < D; d += 16)
                        _mm512_storeu_ps(o[m] + d, _mm512_mul_ps(_mm512_loadu_ps(o[m] + d), _mm512_set1_ps(corr)));
            }
            const int64_t pairs = (16 * nch) / 2;
            for (int64_t d0 = 0; d0 < D; d0 += 64) { /* O += P V, 64 output dimensions at a time */
                const int nd = (int)((D - d0) < 64 ? (D - d0) / 16 : 4);
                __m512 acc[PA_QB][4];
                for (int m = 0; m < mb; m++)
                    for (int dc = 0; dc < nd; dc++) acc[m][dc] = _mm512_loadu_ps(o[m] + d0 + 16 * dc);
                for (int64_t u = 0; u < pairs; u++) {
                    const uint16_t *vrow = vp + (kb0 / 2 + u) * 2 * D + 2 * d0;
                    __m512bh vv[4];
                    for (int dc = 0; dc < nd; dc++) vv[dc] = (__m512bh)_mm512_loadu_si512(vrow + 32 * dc);
                    for (int m = 0; m < mb; m++) {
                        int32_t pair;
                        memcpy(&pair, p[m] + 2 * u, 4);
                        const __m512bh pb = (__m512bh)_mm512_set1_epi32(pair);
                        for (int dc = 0; dc < nd; dc++) acc[m][dc] = _mm512_dpbf16_ps(acc[m][dc], pb, vv[dc]);
                    }
                }
                for (int m = 0; m < mb; m++)
                    for (int dc = 0; dc < nd; dc++) _mm512_storeu_ps(o[m] + d0 + 16 * dc, acc[m][dc]);
            }
        }
        for (int m = 0; m < mb; m++) {
            const __m512 inv = _mm512_set1_ps(l[m] > 0.0f ? 1.0f / l[m] : 0.0f);
            uint16_t *orow = c->out + (i0 + m) * c->o_rs + h * D;
            for (int64_t d = 0; d < D; d += 16)
                _mm256_storeu_si256((__m256i *)(orow + d),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o[m] + d), inv)));
        }
    }
}

/* q: token i, head h at q + i q_rs + h D; k, v: KV head g, position j at k + g kv_hs + j kv_rs; out like q with
   row stride o_rs. n query rows at positions start .. start + n - 1 over start + n keys. D % 16 == 0, D <= 256,
   hq % hkv == 0. Returns 0, -1 (arguments), -2 (memory). */
static int attend_causal(const uint16_t *q, int64_t q_rs, const uint16_t *k, const uint16_t *v, int64_t kv_hs,
                         int64_t kv_rs, uint16_t *out, int64_t o_rs, int64_t n, int64_t hq, int64_t hkv,
                           int64_t start, int64_t D, float scale, int nthreads) {
    if (n < 0 || start < 0 || hkv <= 0 || hq % hkv || D <= 0 || D % 16 || D > PA_MAX_D) return -1;
    const int64_t L = start + n, lpad = (L + PA_KB - 1) / PA_KB * PA_KB;
    uint16_t *kp = (uint16_t *)malloc((size_t)(hkv * lpad * D) * 2 + 64), *vp = (uint16_t *)malloc((size_t)(hkv * lpad * D) * 2 + 64);
    if (!kp || !vp) {
        free(kp);
        free(vp);
        return -2;
    }
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < hkv; g++)
        pack_kv(k + g * kv_hs, v + g * kv_hs, kv_rs, L, lpad, D, kp + g * lpad * D, vp + g * lpad * D);
    const pa_ctx c = {q, out, kp, vp, q_rs, o_rs, n, hq / hkv, start, D, lpad, scale};
    const int64_t blocks = (n + PA_QB - 1) / PA_QB;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t item = 0; item < hkv * blocks; item++) {
        const int64_t b = blocks - 1 - item / hkv; /* the longest rows first */
        const int64_t i0 = b * PA_QB;
        attend_rows(&c, item % hkv, i0, n - i0 < PA_QB ? (int)(n - i0) : PA_QB);
    }
    free(kp);
    free(vp);
    return 0;
}

// ------------------------------------------------------------------ operator

#include "prefill_attention_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int start, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
