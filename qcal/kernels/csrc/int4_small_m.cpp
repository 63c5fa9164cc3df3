/* qcal: small-M int4 x bf16 matrix multiply for AVX512-BF16 CPUs (decode-time linear layers).

   y[m, n] = sum_k x[m, k] * w[n, k],   w[n, k] = (u[n, k] - 8) * s[n, g] - z[n, g],   g = k / gs
   x: (M, K) bf16 row-major; y: (M, N) bf16; u: 4-bit codes (0..15).

   Weight layout (built by qcal.kernels.native.pack_int4): blocks of 16 output rows; a block holds K/8
   "octets" of 64 bytes; in octet o, 16-bit word j (0..31) carries four nibbles, nibble q (0..3) being
   u[row j / 2, k = 8 o + 2 q + j % 2]. Shifting a word by 4 q and OR-ing 0x4300 under a 0x000f mask
   (one vpternlogd) turns nibble q of every word into bf16(128 + u): 32 lanes = 16 rows x 2 k, the
   pairing vdpbf16ps expects against a broadcast (x[k], x[k + 1]) pair. No horizontal sums are needed.
   The +128 of the trick and the -8 of the codes are removed per group with the group sums X of x:
       y = sum_g s_g * (D_g - 136 X_g) - z_g * X_g,   D_g = sum_{k in g} x_k (128 + u_k)  (fp32).
   Scales and offsets: bf16 bit patterns, (N/16, G, planes, 16): per block and group, 16 scales then (planes = 2)
   16 offsets; a symmetric weight's scales alone (planes = 1, read only without has_zero).
   Products and sums are fp32 (integer inputs, e.g. 8da4w's int8 codes, stay exact). */

#include <float.h>
#include <immintrin.h>
#include <omp.h>

#include "bf16.h"
#include "int4_shape.h"
#include "parallel.h"
#include "rowquant.h"
#include "tiles.h"
#include "ops.h"
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

AI __m512bh nibbles(__m512i v, int q) {
    __m512i sh = q ? _mm512_srli_epi16(v, 4 * q) : v;
    return (__m512bh)_mm512_ternarylogic_epi32(sh, _mm512_set1_epi16(0x000f), _mm512_set1_epi16(0x4300), 0xEA);
}


/* RB blocks of 16 rows (1 or 2) x MM input rows (1..4); two accumulator chains per pair hide latency. */
AI void tile(const uint16_t *x, int64_t K, const uint8_t *w, int64_t bstride, const uint16_t *sz, int64_t szs, int HZ,
             const float *X, int64_t G, int64_t gs, uint16_t *y, int64_t ldy, int RB, int MM) {
    __m512 acc[2][4], t0[2][4], t1[2][4];
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) acc[b][m] = _mm512_setzero_ps();
    const int64_t opg = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        for (int b = 0; b < RB; b++)
            for (int m = 0; m < MM; m++) t0[b][m] = t1[b][m] = _mm512_setzero_ps();
        for (int64_t o = g * opg; o < (g + 1) * opg; o++) {
            __m512i v[2];
            for (int b = 0; b < RB; b++)
                prefetch_next_unit(w + b * bstride + o * 64, bstride);
            for (int b = 0; b < RB; b++) v[b] = _mm512_loadu_si512(w + b * bstride + o * 64);
            for (int q = 0; q < 4; q++) {
                __m512bh xb[4];
                for (int m = 0; m < MM; m++) {
                    int32_t pair;
                    memcpy(&pair, x + m * K + o * 8 + q * 2, 4);
                    xb[m] = (__m512bh)_mm512_set1_epi32(pair);
                }
                for (int b = 0; b < RB; b++) {
                    __m512bh wb = nibbles(v[b], q);
                    for (int m = 0; m < MM; m++) {
                        if (q & 1) t1[b][m] = _mm512_dpbf16_ps(t1[b][m], xb[m], wb);
                        else t0[b][m] = _mm512_dpbf16_ps(t0[b][m], xb[m], wb);
                    }
                }
            }
        }
        for (int b = 0; b < RB; b++) {
            const uint16_t *p = sz + (b * G + g) * szs;
            __m512 sv = qcal_load_bf16(p);
            for (int m = 0; m < MM; m++) {
                __m512 d = _mm512_sub_ps(_mm512_add_ps(t0[b][m], t1[b][m]), _mm512_set1_ps(136.f * X[m * G + g]));
                acc[b][m] = _mm512_fmadd_ps(d, sv, acc[b][m]);
            }
            if (HZ) {
                __m512 zv = qcal_load_bf16(p + 16);
                for (int m = 0; m < MM; m++) acc[b][m] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(X[m * G + g]), acc[b][m]);
            }
        }
    }
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) {
            _mm256_storeu_si256((__m256i *)(y + m * ldy + 16 * b), (__m256i)_mm512_cvtneps_pbh(acc[b][m]));
        }
}



typedef struct {
    const uint16_t *x;
    const uint8_t *w;
    const uint16_t *sz;
    int has_zero;
    uint16_t *y;
    int64_t N, K, G, gs, bstride, blocks, szs;
    const float *X;
} int4_ctx;

static void int4_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const int4_ctx *a = (const int4_ctx *)c;
    const int64_t blk = 2 * p, K = a->K, G = a->G;
    const uint16_t *xm = a->x + m0 * K;
    const uint8_t *wp = a->w + blk * a->bstride;
    const uint16_t *szp = a->sz + blk * G * a->szs;
    uint16_t *yp = a->y + m0 * a->N + blk * 16;
    const float *X = a->X + m0 * G;
    const int rb = blk + 1 < a->blocks ? 2 : 1;
#define TILE(RB, MM)                                                                                           \
    (a->has_zero ? tile(xm, K, wp, a->bstride, szp, a->szs, 1, X, G, a->gs, yp, a->N, RB, MM)                \
                 : tile(xm, K, wp, a->bstride, szp, a->szs, 0, X, G, a->gs, yp, a->N, RB, MM))
    QCAL_RB2_X_MB(TILE)
#undef TILE
}

static int mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int planes, int has_zero, uint16_t *y,
              int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    const int64_t G = K / gs, bstride = 16 * K / 2, blocks = N / 16;
    const int64_t units = (blocks + 1) / 2; /* pairs of blocks; the last one may be single */
    float *X = (float *)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1) * (size_t)G); /* group sums of each input row */
    if (!X) return -2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.f;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) acc += qcal_bf16_to_float(x[m * K + k]);
            X[m * G + g] = acc;
        }
    const int4_ctx ctx = {x, w, sz, has_zero, y, N, K, G, gs, bstride, blocks, 16 * (int64_t)planes, X};
    qcal_run_units(M, units, nthreads, &ctx, int4_unit);
    free(X);
    return 0;
}

static int bad_args(int64_t M, int64_t N, int64_t K, int64_t gs, int planes, int has_zero) {
    return !w4_fits(N, K, gs) || M < 0 || !w4_planes_fit(planes, has_zero);
}

/* y = x @ W^T. Returns 0, or -1 for unsupported arguments (nothing written). */
static int w4a16_small(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int planes, int has_zero, uint16_t *y,
                       int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (bad_args(M, N, K, gs, planes, has_zero)) return -1;
    return mm(x, w, sz, planes, has_zero, y, M, N, K, gs, nthreads);
}

/* 8da4w through VNNI: the int8 activation codes multiply the 4-bit codes u directly (vpdpbusd, u unsigned,
   codes signed: 64 products per instruction, twice vdpbf16ps), so the -8 of the codes is removed with the
   integer group sums of the codes: y = xs * sum_g s_g * (sum_k q_k u_k - 8 X_g) -- the same exact integers
   and the same fp32 operations as a bf16 product of the codes, at half the instructions per weight.
   Weight layout (qcal.kernels.native.pack_int4_vnni): blocks of 16 rows; per octet o of 8 columns, 64 bytes:
   row r's 4 bytes at 4 r, byte i = u[r, 8 o + i] | u[r, 8 o + 4 + i] << 4. Scales: as pack_scales. */
AI void tile_vnni(const int8_t *xq, int64_t K, const uint8_t *w, int64_t bstride, const uint16_t *sz, int64_t szs,
                  const int32_t *X, int64_t G, int64_t gs, const float *xs, uint16_t *y, int64_t ldy, int RB, int MM) {
    __m512 acc[2][4];
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) acc[b][m] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t opg = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        __m512i t[2][4];
        for (int b = 0; b < RB; b++)
            for (int m = 0; m < MM; m++) t[b][m] = _mm512_setzero_si512();
        for (int64_t o = g * opg; o < (g + 1) * opg; o++) {
            __m512i lo[2], hi[2];
            for (int b = 0; b < RB; b++)
                prefetch_next_unit(w + b * bstride + o * 64, bstride);
            for (int b = 0; b < RB; b++) {
                const __m512i v = _mm512_loadu_si512(w + b * bstride + o * 64);
                lo[b] = _mm512_and_si512(v, low);
                hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int m = 0; m < MM; m++) {
                int32_t qa, qb;
                memcpy(&qa, xq + m * K + o * 8, 4);
                memcpy(&qb, xq + m * K + o * 8 + 4, 4);
                const __m512i xa = _mm512_set1_epi32(qa), xb = _mm512_set1_epi32(qb);
                for (int b = 0; b < RB; b++)
                    t[b][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t[b][m], lo[b], xa), hi[b], xb);
            }
        }
        for (int b = 0; b < RB; b++) {
            const __m512 sv = qcal_load_bf16(sz + (b * G + g) * szs);
            for (int m = 0; m < MM; m++) {
                const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(t[b][m], _mm512_set1_epi32(8 * X[m * G + g])));
                acc[b][m] = _mm512_fmadd_ps(d, sv, acc[b][m]);
            }
        }
    }
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) {
            const __m512 r = _mm512_mul_ps(acc[b][m], _mm512_set1_ps(xs[m]));
            _mm256_storeu_si256((__m256i *)(y + m * ldy + 16 * b), (__m256i)_mm512_cvtneps_pbh(r));
        }
}

typedef struct {
    const int8_t *xq;
    const uint8_t *w;
    const uint16_t *sz;
    const int32_t *X;
    const float *xs;
    uint16_t *y;
    int64_t N, K, G, gs, bstride, blocks, szs;
} vnni_ctx;

static void vnni_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const vnni_ctx *a = (const vnni_ctx *)c;
    const int64_t blk = 2 * p, K = a->K, G = a->G;
    const int rb = blk + 1 < a->blocks ? 2 : 1;
#define TV(RB, MM)                                                                                             \
    tile_vnni(a->xq + m0 * K, K, a->w + blk * a->bstride, a->bstride, a->sz + blk * G * a->szs, a->szs,      \
              a->X + m0 * G, G, a->gs, a->xs + m0, a->y + m0 * a->N + blk * 16, a->N, RB, MM)
    QCAL_RB2_X_MB(TV)
#undef TV
}

/* 8da4w, VNNI: x (M, K) bf16 rows quantized as quantize_per_token; w from pack_int4_vnni, sz from pack_scales
   (symmetric: the offsets, where sz has them, are ignored). Returns 0, -1 (arguments), -2 (memory). */
static int w4a8(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int planes, uint16_t *y, int64_t M, int64_t N,
                int64_t K, int64_t gs, int nthreads) {
    if (bad_args(M, N, K, gs, planes, 0)) return -1;
    const int64_t G = K / gs, bstride = 16 * K / 2, blocks = N / 16, units = (blocks + 1) / 2;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + 64);
    float *xs = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    int32_t *X = (int32_t *)malloc((size_t)(M > 0 ? M : 1) * (size_t)G * sizeof(int32_t));
    if (!xq || !xs || !X) {
        free(xq);
        free(xs);
        free(X);
        return -2;
    }
    for (int64_t m = 0; m < M; m++) {
        xs[m] = qcal_quantize_row(x + m * K, K, (uint8_t *)(xq + m * K), 0);
        for (int64_t g = 0; g < G; g++) {
            int32_t acc = 0;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) acc += xq[m * K + k];
            X[m * G + g] = acc;
        }
    }
    const vnni_ctx ctx = {xq, w, sz, X, xs, y, N, K, G, gs, bstride, blocks, 16 * (int64_t)planes};
    qcal_run_units(M, units, nthreads, &ctx, vnni_unit);
    free(xq);
    free(xs);
    free(X);
    return 0;
}

#include "int4_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build