/* qcal: small-M weight-only matmul over sub-byte float weights (fp6 e3m2, fp5 e2m2, fp4 e2m1) for AVX2/FMA CPUs,
   the AVX2 build of csrc/fpx_small_m.cpp: the same operator (fpx_api.h), weight layout and numbers.

   y[m, n] = sum_g ws[n, g] * sum_{k in group g} x[m, k] * v(code[n, k]),   v = the format's value of a code.

   The weight is read in place in its canonical bit planes (per row, the low 4 bits of every code two a byte, then
   the high bits, 2 a code for fp6 and 1 for fp5, packed low first). As in the AVX-512 kernel each 32 columns are one
   vdpbf16ps into a group's 16 partial-sum lanes, here two 8-lane halves (column pairs 0-7 and 8-15) with the pair's
   odd product added first, then the even one, each a fused multiply-add under vdpbf16ps's environment (nearest
   even, denormal inputs as zero, tiny results flushed: mm_avx2.cpp). A code's value is looked up in registers from
   the format's table widened to fp32 (exact: every value has at most 3 significant bits), 8 entries a vpermps,
   selected by the code's bits 3-5 (for a table whose upper half is its lower half negated -- a sign bit on top,
   as in these formats -- the lower half, the sign bit then moved into place). Each group's 16 lanes are scaled into
   the row's 16 (one fused multiply-add each, as _mm512_fmadd_ps), and the 16 summed as _mm512_reduce_add_ps does
   (qcal_hsum8(hi + lo)) and rounded once to bf16: the AVX-512 kernel's numbers. Not reproduced (never for real
   weights): the group scaling runs in the same environment as the products, so a scale or running sum below 2^-126
   reads as zero here. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "avx2.h"
#include "fpx_avx2.h"
#include "ops.h"
#include "parallel.h"

#define AI static inline __attribute__((always_inline))

typedef struct {
    const uint16_t *x;
    const uint8_t *w;
    const float *ws;
    const float *lut; /* 64 fp32 values */
    uint16_t *y;
    int64_t N, K, G, row_bytes;
} fpx_ctx;

/* RB weight rows x MM input rows (RB MM <= 2): the 16 lanes of each output into lanes[r][m]. */
template <int BITS, bool SYM, int RB, int MM>
AI void fpx_tile(const fpx_ctx *a, int64_t m0, int64_t n0, float lanes[4][4][16]) {
    const int64_t K = a->K, G = a->G, gs = K / G;
    __m256 acc[RB][MM][2];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 part[RB][MM][2];
        for (int r = 0; r < RB; r++)
            for (int m = 0; m < MM; m++) part[r][m][0] = part[r][m][1] = _mm256_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            for (int h = 0; h < 2; h++) {
                __m256 xe[MM], xo[MM];
                for (int m = 0; m < MM; m++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(a->x + (m0 + m) * K + k + 16 * h));
                    xe[m] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                    xo[m] = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
                }
                for (int r = 0; r < RB; r++) {
                    const uint8_t *row = a->w + (n0 + r) * a->row_bytes;
                    __m256i ce, co;
                    fpx_codes16<BITS>(row, row + K / 2, k + 16 * h, &ce, &co);
                    const __m256 we = fpx_lookup<BITS, SYM>(a->lut, ce), wo = fpx_lookup<BITS, SYM>(a->lut, co);
                    for (int m = 0; m < MM; m++)
                        part[r][m][h] = _mm256_fmadd_ps(xe[m], we, _mm256_fmadd_ps(xo[m], wo, part[r][m][h]));
                }
            }
        }
        for (int r = 0; r < RB; r++) {
            const __m256 s = _mm256_set1_ps(a->ws[(n0 + r) * G + g]);
            for (int m = 0; m < MM; m++)
                for (int h = 0; h < 2; h++) acc[r][m][h] = _mm256_fmadd_ps(part[r][m][h], s, acc[r][m][h]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) {
            _mm256_storeu_ps(lanes[r][m], acc[r][m][0]);
            _mm256_storeu_ps(lanes[r][m] + 8, acc[r][m][1]);
        }
}

template <int BITS, bool SYM> static void fpx_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const fpx_ctx *a = (const fpx_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
    float lanes[4][4][16];
    const unsigned int env = _mm_getcsr();
    _mm_setcsr(QCAL_VDP_MXCSR);
    int m = 0;
    for (; m + 2 <= mb; m += 2)
        for (int r = 0; r < rb; r++) fpx_tile<BITS, SYM, 1, 2>(a, m0 + m, n0 + r, (float(*)[4][16])&lanes[r][m]);
    if (m < mb)
        for (int r = 0; r < rb; r += 2) {
            float(*l)[4][16] = (float(*)[4][16])&lanes[r][m];
            if (rb - r >= 2) fpx_tile<BITS, SYM, 2, 1>(a, m0 + m, n0 + r, l);
            else fpx_tile<BITS, SYM, 1, 1>(a, m0 + m, n0 + r, l);
        }
    _mm_setcsr(env);
    for (int r = 0; r < rb; r++)
        for (int i = 0; i < mb; i++)
            a->y[(m0 + i) * N + n0 + r] = qcal_float_to_bf16(
                qcal_hsum8(_mm256_add_ps(_mm256_loadu_ps(lanes[r][i] + 8), _mm256_loadu_ps(lanes[r][i]))));
}

/* The kernel (fpx_api.h's entry): lut_pad holds 64 bf16 entries, the format's first. */
static void fpx_run(const uint16_t *x, const uint8_t *w, const float *ws, const uint16_t *lut_pad, uint16_t *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int64_t row_bytes, int bits, int nthreads) {
    float lut[64];
    const bool sym = fpx_table(lut_pad, bits, lut);
    const fpx_ctx ctx = {x, w, ws, lut, y, N, K, G, row_bytes};
    const qcal_unit_fn fn = bits == 6 ? (sym ? fpx_unit<6, true> : fpx_unit<6, false>)
                            : bits == 5 ? (sym ? fpx_unit<5, true> : fpx_unit<5, false>)
                                        : (sym ? fpx_unit<4, true> : fpx_unit<4, false>);
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, fn);
}

#include "fpx_api.h"  // the operator (ISA-neutral): shared with the AVX-512 build
