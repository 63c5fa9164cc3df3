/* qcal: small-M bf16 x bf16 matmul (a float model's decode step), AVX512-BF16.

   y[m, n] = sum_k x[m, k] w[n, k] in fp32, rounded once to bf16. The weight is read in place (the float layer's
   (N, K) row-major bf16 weight): 32 values of a row per load and one vdpbf16ps with 32 activations, 4 weight rows x
   up to 4 input rows a tile, one horizontal sum per output, rows of the weight split among the threads and
   prefetched ahead as they stream from memory (the same driver as the int8 kernels). */

#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "ops.h"
#include "parallel.h"
#include "tiles.h"

#define AI static inline __attribute__((always_inline))

AI void tile_bf16(const uint16_t *x, int64_t K, const uint16_t *w, uint16_t *y, int64_t ldy, int RB, int MM) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const int64_t left = K - k;
        const __mmask32 live = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        __m512bh wv[4];
        for (int r = 0; r < RB; r++) {
            _mm_prefetch((const char *)(w + r * K + k) + QCAL_STREAM_AHEAD, _MM_HINT_T0);
            wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(live, w + r * K + k);
        }
        for (int m = 0; m < MM; m++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(live, x + m * K + k);
            for (int r = 0; r < RB; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) y[m * ldy + r] = qcal_float_to_bf16(_mm512_reduce_add_ps(acc[r][m]));
}

typedef struct {
    const uint16_t *x, *w;
    uint16_t *y;
    int64_t N, K;
} a16w16_ctx;

static void a16w16_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const a16w16_ctx *a = (const a16w16_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
#define TB(RB, MM) tile_bf16(a->x + m0 * K, K, a->w + n0 * K, a->y + m0 * N + n0, N, RB, MM)
    QCAL_RB_X_MB(TB)
#undef TB
}

/* x (M, K) bf16; w (N, K) bf16 row-major. */
static void w16a16_small(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                         int nthreads) {
    const a16w16_ctx ctx = {x, w, y, N, K};
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, a16w16_unit);
}

#include "bf16_api.h"  // the operator (ISA-neutral): shared with the other instruction set's build
