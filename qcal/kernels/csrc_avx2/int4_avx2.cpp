/* qcal: int4-weight matmuls for AVX2/FMA CPUs, the AVX2 build of csrc/int4_small_m.cpp: the same operators
   (w4_fits, w4a16_mm_small, w4a8_mm), schemas, argument checks, weight layouts and numbers.

   w4a16_mm_small: y[m, n] = sum_k x[m, k] * w[n, k],  w[n, k] = (u[n, k] - 8) * s[n, g] - z[n, g],  g = k / gs.
   Weight in pack_int4's layout: blocks of 16 rows, per octet of 8 columns 32 16-bit words, nibble q of word j
   being u[row j / 2, k = 8 o + 2 q + j % 2]. As in the AVX-512 kernel, nibble q of each word becomes the bf16
   bit pattern of 128 + u (shift, and 0x000f, or 0x4300); a 32-bit lane then holds the pair (k, k + 1) of one row,
   which is widened into two fp32 vectors (even k: lane << 16; odd k: lane & 0xffff0000) and multiplied by
   broadcast x[k], x[k + 1] with two FMAs in vdpbf16ps's order (Intel SDM: the odd element is added first, each
   step one fused multiply-add rounded to nearest even). The products x * (128 + u) are exact in fp32, so each FMA
   rounds exactly as vdpbf16ps's step does, and the fp32 sums, the two accumulation chains (even q, odd q), the
   per-group epilogue  acc += s_g * ((t0 + t1) - 136 X_g)  [- z_g X_g]  with X_g the group sums of x (summed in
   the same sequential fp32 order) and the final rounding to bf16 are those of the AVX-512 kernel: bit-identical.
   A 16-row block is two 8-row halves of 32 bytes per octet, one ymm each.

   w4a8_mm (8da4w): each x row quantized as quantize_per_token (rowquant_avx2.h: the codes and scales of
   csrc/rowquant.h), times the 4-bit codes in pack_int4_vnni's layout (per octet, row r's 4 bytes at 4 r, byte
   i = u[r, 8 o + i] | u[r, 8 o + 4 + i] << 4). vpdpbusd becomes vpmaddubsw (u8 x s8 pairs -> s16: at most
   2 * 15 * 127, no saturation) summed in 16 bits over at most 4 octets (16 products, at most 30480) and widened
   with vpmaddwd by ones: the int32 group sums are the same integers (mod 2^32, as the AVX-512 kernel's), and
   y = xs * sum_g s_g * float(sum_k q_k u_k - 8 X_g) is formed with the same fp32 operations: bit-identical.

   Where results can differ from the AVX-512 kernels (only for values below 2^-126, never for normal data):
   vdpbf16ps treats denormal inputs as zero and flushes denormal results; here denormal activations are flushed
   as it does, but a partial sum that cancels to below 2^-126 (possible only for activations near 2^-119) is not,
   and vcvtneps2bf16's flushing of denormal fp32 results is not reproduced (avx2.h). NaN results are NaN in both,
   their sign and payload may differ.

   Threads take pairs of 16-row blocks as the AVX-512 kernels do; each pair serves all input rows (tiles of 1 to 4
   rows) before the next, so its weight is read from memory once whatever M (prefill too). A tile interleaves the
   chains of 16 to 32 rows (4 dependent FMAs per chain and octet) to hide the FMA latency; each quad of activation
   rows is laid out k-major (codes: octet-major) so that one pointer serves its broadcasts.
   tests/test_avx2_int4.py checks the numbers, the fp32 operation order included, bit for bit. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "avx2.h"
#include "int4_shape.h"
#include "multi.h"
#include "ops.h"
#include "parallel.h"
#include "rowquant_avx2.h"

#define AI static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ w4a16: bf16 activations */

/* Keeps the compiler from re-deriving a shared value per use (it would expand one and + or into two pairs:
   8% slower). */
#define I4_KEEP(v) __asm__("" : "+x"(v))

/* Nibble Q of each 16-bit word as bf16(128 + u), widened: *even = the low word's value (column k), *odd = the
   high word's (column k + 1), as fp32. BLEND: *odd without a mask register (the low words of *even are 0; one
   register more for tiles that are short of them, slower where they are not). */
template <int Q, bool BLEND> AI void nibble_pair(__m256i v, __m256 *even, __m256 *odd) {
    __m256i t = Q ? _mm256_srli_epi16(v, 4 * Q) : v;
    if (Q < 3) t = _mm256_and_si256(t, _mm256_set1_epi16(0x000f));
    t = _mm256_or_si256(t, _mm256_set1_epi16(0x4300));
    I4_KEEP(t);
    const __m256i e = _mm256_slli_epi32(t, 16);
    *even = _mm256_castsi256_ps(e);
    *odd = _mm256_castsi256_ps(BLEND ? _mm256_blend_epi16(t, e, 0x55)
                                     : _mm256_and_si256(t, _mm256_set1_epi32((int)0xffff0000u)));
}

/* One nibble position Q of an octet: for each row m and half j, t += x[k + 1] w[k + 1]; t += x[k] w[k].
   w[j]: half j's 32 bytes; x: the octet's activations, k-major (x[k * MM + m]). */
template <int Q, int NH, int MM> AI void dot_q(const uint8_t *const *w, const float *x, __m256 (*t)[MM]) {
    for (int j = 0; j < NH; j++) { /* one half at a time: few registers beside the accumulators */
        __m256 even, odd;
        nibble_pair<Q, NH == 2 && MM == 2>(_mm256_loadu_si256((const __m256i *)w[j]), &even, &odd);
        for (int m = 0; m < MM; m++) {
            const __m256 xo = _mm256_broadcast_ss(x + (2 * Q + 1) * MM + m);
            const __m256 xe = _mm256_broadcast_ss(x + 2 * Q * MM + m);
            t[j][m] = _mm256_fmadd_ps(xe, even, _mm256_fmadd_ps(xo, odd, t[j][m]));
        }
    }
}

/* NH halves of 8 rows (half j: block j / 2 of the tile, its half j % 2; with NH = 1 the pointers are at the
   half) x MM input rows. Every accumulation chain is one row's and one nibble parity's, as in the AVX-512 kernel;
   the chains of several halves and rows are interleaved only to hide the FMA latency. x: the rows' fp32 values
   (denormals flushed), k-major; X: their group sums (row-major, G per row). */
template <int NH, int MM, bool HZ>
AI void tile16(const float *x, const uint8_t *w, int64_t bstride, const uint16_t *sz, int64_t szs, const float *X,
               int64_t G, int64_t gs, uint16_t *y, int64_t ldy) {
    __m256 acc[NH][MM];
    for (int j = 0; j < NH; j++)
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const uint8_t *wj[NH];
    for (int j = 0; j < NH; j++) wj[j] = w + (j >> 1) * bstride + (j & 1) * 32;
    const int64_t opg = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        __m256 t0[NH][MM], t1[NH][MM];
        for (int j = 0; j < NH; j++)
            for (int m = 0; m < MM; m++) t0[j][m] = t1[j][m] = _mm256_setzero_ps();
        for (int64_t o = g * opg; o < (g + 1) * opg; o++) {
            const uint8_t *wo[NH];
            for (int j = 0; j < NH; j++) wo[j] = wj[j] + o * 64;
            for (int j = 0; j < NH; j += 2) prefetch_next_unit(wo[j], bstride);
            const float *xo = x + o * 8 * MM;
            dot_q<0, NH, MM>(wo, xo, t0);
            dot_q<1, NH, MM>(wo, xo, t1);
            dot_q<2, NH, MM>(wo, xo, t0);
            dot_q<3, NH, MM>(wo, xo, t1);
        }
        for (int j = 0; j < NH; j++) {
            const uint16_t *p = sz + ((j >> 1) * G + g) * szs + (j & 1) * 8;
            const __m256 sv = qcal_load8_bf16(p);
            for (int m = 0; m < MM; m++) {
                const __m256 d = _mm256_sub_ps(_mm256_add_ps(t0[j][m], t1[j][m]), _mm256_set1_ps(136.f * X[m * G + g]));
                acc[j][m] = _mm256_fmadd_ps(d, sv, acc[j][m]);
            }
            if (HZ) {
                const __m256 zv = qcal_load8_bf16(p + 16);
                for (int m = 0; m < MM; m++) acc[j][m] = _mm256_fnmadd_ps(zv, _mm256_set1_ps(X[m * G + g]), acc[j][m]);
            }
        }
    }
    for (int j = 0; j < NH; j++)
        for (int m = 0; m < MM; m++) qcal_store8_bf16(y + m * ldy + 8 * j, acc[j][m]);
}

typedef struct {
    const float *x; /* fp32, denormals flushed; each quad of rows k-major (see prepare_rows16) */
    const float *X; /* (M, G) group sums */
    const uint8_t *w;
    const uint16_t *sz;
    uint16_t *y;
    int64_t N, K, G, gs, bstride, blocks, szs; /* szs: sz's values a group of a block (16 a plane) */
} w4a16_ctx;

template <bool HZ> static void w4a16_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const w4a16_ctx *a = (const w4a16_ctx *)c;
    const int64_t K = a->K, G = a->G, gs = a->gs, N = a->N, bs = a->bstride, blk0 = 2 * p, szs = a->szs;
    const int rb = blk0 + 1 < a->blocks ? 2 : 1;
    const float *x = a->x + m0 * K, *X = a->X + m0 * G;
    const uint8_t *w = a->w + blk0 * bs;
    const uint16_t *sz = a->sz + blk0 * G * szs;
    uint16_t *y = a->y + m0 * N + blk0 * 16;
    /* 8 to 16 independent chains a tile (a chain takes 4 dependent FMAs an octet) */
    if (mb == 1) {
        if (rb == 2) tile16<4, 1, HZ>(x, w, bs, sz, szs, X, G, gs, y, N);
        else tile16<2, 1, HZ>(x, w, bs, sz, szs, X, G, gs, y, N);
    } else if (mb == 2) {
        for (int b = 0; b < rb; b++)
            tile16<2, 2, HZ>(x, w + b * bs, bs, sz + b * G * szs, szs, X, G, gs, y + 16 * b, N);
    } else {
        for (int j = 0; j < 2 * rb; j++) {
            const uint8_t *wh = w + (j >> 1) * bs + (j & 1) * 32;
            const uint16_t *szh = sz + (j >> 1) * G * szs + (j & 1) * 8;
            if (mb == 3) tile16<1, 3, HZ>(x, wh, bs, szh, szs, X, G, gs, y + 8 * j, N);
            else tile16<1, 4, HZ>(x, wh, bs, szh, szs, X, G, gs, y + 8 * j, N);
        }
    }
}

/* Rows m_lo..m_hi (m_lo a multiple of 4) as fp32 with denormals flushed to (signed) zero, as vdpbf16ps reads
   them, each quad of rows (or the last, shorter group) k-major: row m0 + i, column k at x + m0 K + k mb + i. Their
   group sums in the AVX-512 kernel's order: sequential fp32 adds from 0 within each group (the groups
   interleaved, which changes no sum). */
static void prepare_rows16(const uint16_t *x, int64_t m_lo, int64_t m_hi, int64_t M, int64_t K, int64_t G,
                           int64_t gs, float *xf, float *X) {
    for (int64_t m = m_lo; m < m_hi; m++) {
        const uint16_t *xr = x + m * K;
        const int64_t m0 = m & ~(int64_t)3, mb = M - m0 < 4 ? M - m0 : 4;
        float *xm = xf + m0 * K + (m - m0), *Xm = X + m * G;
        for (int64_t k = 0; k < K; k += 8) { /* K % 8 == 0 */
            float f[8];
            _mm256_storeu_ps(f, qcal_daz8(qcal_load8_bf16(xr + k)));
            if (mb == 1) memcpy(xm + k, f, sizeof f);
            else for (int i = 0; i < 8; i++) xm[(k + i) * mb] = f[i];
        }
        for (int64_t g = 0; g < G; g++) Xm[g] = 0.f;
        for (int64_t i = 0; i < gs; i++)
            for (int64_t g = 0; g < G; g++) Xm[g] += qcal_bf16_to_float(xr[g * gs + i]);
    }
}

/* The row range of thread t of T for the preparation: quads of rows, whole. */
static void share_quads(int64_t M, int t, int T, int64_t *lo, int64_t *hi) {
    qcal_share((M + 3) / 4, t, T, lo, hi);
    *lo = 4 * *lo < M ? 4 * *lo : M;
    *hi = 4 * *hi < M ? 4 * *hi : M;
}

/* y = x @ W^T. Returns 0, -1 for unsupported arguments (nothing written), -2 (memory). */

static int w4a16_small(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int planes, int has_zero, uint16_t *y,
                       int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (!w4_fits(N, K, gs) || M < 0 || !w4_planes_fit(planes, has_zero)) return -1;
    const int64_t G = K / gs, blocks = N / 16, units = (blocks + 1) / 2;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M > 0 ? M * K : 1));
    float *X = (float *)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1) * (size_t)G);
    if (!xf || !X) {
        free(xf);
        free(X);
        return -2;
    }
    if (M < 8 || nthreads < 2) {
        prepare_rows16(x, 0, M, M, K, G, gs, xf, X);
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            int64_t lo, hi;
            share_quads(M, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            prepare_rows16(x, lo, hi, M, K, G, gs, xf, X);
        }
    }
    const w4a16_ctx ctx = {xf, X, w, sz, y, N, K, G, gs, 16 * K / 2, blocks, 16 * (int64_t)planes};
    qcal_run_units(M, units, nthreads, &ctx, has_zero ? w4a16_unit<true> : w4a16_unit<false>);
    free(xf);
    free(X);
    return 0;
}

/* ------------------------------------------------------------------ w4a8: 8da4w */

/* NH halves (as tile16) x MM input rows; xq: the rows' int8 codes, octet-major (octet o of row m: the 8 bytes at
   xq + (o MM + m) 8), X: their group sums, xs: their scales. */
template <int NH, int MM>
AI void tile8(const int8_t *xq, const uint8_t *w, int64_t bstride, const uint16_t *sz, int64_t szs, const int32_t *X,
              int64_t G, int64_t gs, const float *xs, uint16_t *y, int64_t ldy) {
    __m256 acc[NH][MM];
    for (int j = 0; j < NH; j++)
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const uint8_t *wj[NH];
    for (int j = 0; j < NH; j++) wj[j] = w + (j >> 1) * bstride + (j & 1) * 32;
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int64_t opg = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        __m256i t[NH][MM];
        for (int j = 0; j < NH; j++)
            for (int m = 0; m < MM; m++) t[j][m] = _mm256_setzero_si256();
        for (int64_t o0 = g * opg; o0 < (g + 1) * opg; o0 += 4) {
            const int64_t o1 = o0 + 4 < (g + 1) * opg ? o0 + 4 : (g + 1) * opg;
            __m256i s[NH][MM]; /* 16-bit sums of at most 16 products of at most 15 * 127 */
            for (int j = 0; j < NH; j++)
                for (int m = 0; m < MM; m++) s[j][m] = _mm256_setzero_si256();
            for (int64_t o = o0; o < o1; o++) {
                __m256i lo[NH], hi[NH];
                for (int j = 0; j < NH; j += 2) prefetch_next_unit(wj[j] + o * 64, bstride);
                for (int j = 0; j < NH; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wj[j] + o * 64));
                    lo[j] = _mm256_and_si256(v, low);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
                const int8_t *xo = xq + o * 8 * MM;
                for (int m = 0; m < MM; m++) {
                    int32_t qa, qb;
                    memcpy(&qa, xo + 8 * m, 4);
                    memcpy(&qb, xo + 8 * m + 4, 4);
                    const __m256i xa = _mm256_set1_epi32(qa), xb = _mm256_set1_epi32(qb);
                    for (int j = 0; j < NH; j++)
                        s[j][m] = _mm256_add_epi16(_mm256_add_epi16(s[j][m], _mm256_maddubs_epi16(lo[j], xa)),
                                                   _mm256_maddubs_epi16(hi[j], xb));
                }
            }
            for (int j = 0; j < NH; j++)
                for (int m = 0; m < MM; m++) t[j][m] = _mm256_add_epi32(t[j][m], _mm256_madd_epi16(s[j][m], ones));
        }
        for (int j = 0; j < NH; j++) {
            const __m256 sv = qcal_load8_bf16(sz + ((j >> 1) * G + g) * szs + (j & 1) * 8);
            for (int m = 0; m < MM; m++) {
                const int32_t c = (int32_t)(8u * (uint32_t)X[m * G + g]);
                const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(t[j][m], _mm256_set1_epi32(c)));
                acc[j][m] = _mm256_fmadd_ps(d, sv, acc[j][m]);
            }
        }
    }
    for (int j = 0; j < NH; j++)
        for (int m = 0; m < MM; m++)
            qcal_store8_bf16(y + m * ldy + 8 * j, _mm256_mul_ps(acc[j][m], _mm256_set1_ps(xs[m])));
}

typedef struct {
    const int8_t *xq; /* codes, each quad of rows octet-major (see prepare_rows8) */
    const int32_t *X;
    const float *xs;
    const uint8_t *w;
    const uint16_t *sz;
    uint16_t *y;
    int64_t N, K, G, gs, bstride, blocks, szs;
} w4a8_ctx;

static void w4a8_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const w4a8_ctx *a = (const w4a8_ctx *)c;
    const int64_t K = a->K, G = a->G, gs = a->gs, N = a->N, bs = a->bstride, blk0 = 2 * p, szs = a->szs;
    const int rb = blk0 + 1 < a->blocks ? 2 : 1;
    const int8_t *xq = a->xq + m0 * K;
    const int32_t *X = a->X + m0 * G;
    const float *xs = a->xs + m0;
    const uint8_t *w = a->w + blk0 * bs;
    const uint16_t *sz = a->sz + blk0 * G * szs;
    uint16_t *y = a->y + m0 * N + blk0 * 16;
    if (mb == 1) {
        for (int b = 0; b < rb; b++)
            tile8<2, 1>(xq, w + b * bs, bs, sz + b * G * szs, szs, X, G, gs, xs, y + 16 * b, N);
        return;
    }
    for (int j = 0; j < 2 * rb; j++) {
        const uint8_t *wh = w + (j >> 1) * bs + (j & 1) * 32;
        const uint16_t *szh = sz + (j >> 1) * G * szs + (j & 1) * 8;
        if (mb == 2) tile8<1, 2>(xq, wh, bs, szh, szs, X, G, gs, xs, y + 8 * j, N);
        else if (mb == 3) tile8<1, 3>(xq, wh, bs, szh, szs, X, G, gs, xs, y + 8 * j, N);
        else tile8<1, 4>(xq, wh, bs, szh, szs, X, G, gs, xs, y + 8 * j, N);
    }
}

/* Rows m_lo..m_hi (whole quads) quantized: scales, codes (each quad octet-major: octet o of row m0 + i at
   xq + m0 K + (o mb + i) 8) and their integer group sums (wrapping as int32 sums do). row: K bytes of scratch. */
static void prepare_rows8(const uint16_t *x, int64_t m_lo, int64_t m_hi, int64_t M, int64_t K, int64_t G,
                          int64_t gs, int8_t *xq, float *xs, int32_t *X, int8_t *row) {
    for (int64_t m = m_lo; m < m_hi; m++) {
        const int64_t m0 = m & ~(int64_t)3, mb = M - m0 < 4 ? M - m0 : 4;
        xs[m] = qcal_quantize_row(x + m * K, K, (uint8_t *)row, 0);
        for (int64_t o = 0; o < K / 8; o++) memcpy(xq + m0 * K + (o * mb + (m - m0)) * 8, row + 8 * o, 8);
        for (int64_t g = 0; g < G; g++) {
            uint32_t acc = 0;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) acc += (uint32_t)(int32_t)row[k];
            X[m * G + g] = (int32_t)acc;
        }
    }
}

/* 8da4w: x (M, K) bf16 rows quantized as quantize_per_token, times each of n weights w[i] (N[i] rows, from
   pack_int4_vnni; sz[i] from pack_scales, planes[i] planes: symmetric, the offsets where sz has them are ignored)
   into y[i] (M, N[i]): the rows quantized once, the weights' units one pool. Returns 0, -1 (arguments), -2
   (memory). */
static int w4a8_parts(const uint16_t *x, int n, const uint8_t *const *w, const uint16_t *const *sz, const int *planes,
                      uint16_t *const *y, const int64_t *N, int64_t M, int64_t K, int64_t gs, int nthreads) {
    if (n < 1 || n > QCAL_MAX_WEIGHTS || M < 0) return -1;
    for (int i = 0; i < n; i++)
        if (!w4_fits(N[i], K, gs) || !w4_planes_fit(planes[i], 0)) return -1;
    const int64_t G = K / gs;
    const int T = M < 8 || nthreads < 2 ? 1 : nthreads;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K) + (size_t)(T * K) + 64); /* codes, then T rows of scratch */
    float *xs = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    int32_t *X = (int32_t *)malloc((size_t)(M > 0 ? M : 1) * (size_t)G * sizeof(int32_t));
    if (!xq || !xs || !X) {
        free(xq);
        free(xs);
        free(X);
        return -2;
    }
    if (T == 1) {
        prepare_rows8(x, 0, M, M, K, G, gs, xq, xs, X, xq + M * K);
    } else {
#pragma omp parallel num_threads(T)
        {
            int64_t lo, hi;
            const int t = omp_get_thread_num();
            share_quads(M, t, omp_get_num_threads(), &lo, &hi);
            prepare_rows8(x, lo, hi, M, K, G, gs, xq, xs, X, xq + M * K + t * K);
        }
    }
    w4a8_ctx ctx[QCAL_MAX_WEIGHTS];
    const void *ctxs[QCAL_MAX_WEIGHTS];
    int64_t first[QCAL_MAX_WEIGHTS + 1] = {0};
    for (int i = 0; i < n; i++) {
        ctx[i] = {xq, X, xs, w[i], sz[i], y[i], N[i], K, G, gs, 16 * K / 2, N[i] / 16, 16 * (int64_t)planes[i]};
        ctxs[i] = &ctx[i];
        first[i + 1] = first[i] + (N[i] / 16 + 1) / 2; /* units: pairs of 16-row blocks */
    }
    if (n == 1) {
        qcal_run_units(M, first[1], nthreads, &ctx[0], w4a8_unit);
    } else {
        const qcal_parts_job job = {ctxs, first, n, w4a8_unit};
        qcal_run_units(M, first[n], nthreads, &job, qcal_parts_unit);
    }
    free(xq);
    free(xs);
    free(X);
    return 0;
}

/* One weight (the w4a8_mm operator, the decode step's binding). */
static int w4a8(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int planes, uint16_t *y, int64_t M, int64_t N,
                int64_t K, int64_t gs, int nthreads) {
    return w4a8_parts(x, 1, &w, &sz, &planes, &y, &N, M, K, gs, nthreads);
}

#include "int4_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
/* ------------------------------------------------------------------ several weights on one input (this build only) */

/* w4a8_mm for a list of weights sharing x (q / k / v, gate / up): each output w4a8_mm's for its weight, bit for bit,
   the rows quantized once and the weights' units one pool for the threads. */
static std::vector<at::Tensor> w4a8_mm_multi(const at::Tensor &x, at::TensorList w, at::TensorList sz,
                                             int64_t group_size) {
    const char *op = "qcal::w4a8_mm_multi";
    qcal::multi_checked(op, w.size(), sz.size(), "sz");
    const int n = (int)w.size();
    const uint8_t *wp[QCAL_MAX_WEIGHTS];
    const uint16_t *szp[QCAL_MAX_WEIGHTS];
    uint16_t *yp[QCAL_MAX_WEIGHTS];
    int planes[QCAL_MAX_WEIGHTS];
    int64_t N[QCAL_MAX_WEIGHTS], K = 0;
    for (int i = 0; i < n; i++) {
        const std::string opi = qcal::weight_op(op, i);
        const int64_t Ki = w4_weight_checked(opi.c_str(), w[i], sz[i], group_size);
        TORCH_CHECK_VALUE(i == 0 || Ki == K, opi, ": K=", Ki, " where weight 0 has K=", K, " (one input)");
        K = Ki;
        wp[i] = qcal::in<uint8_t>(w[i]);
        szp[i] = qcal::in<uint16_t>(sz[i]);
        planes[i] = w4_planes(sz[i]);
        N[i] = w[i].size(0);
    }
    const at::Tensor xc = qcal::rows(op, x, K);
    std::vector<at::Tensor> ys = qcal::multi_outputs(xc, w, yp);
    qcal::check_rc(op, w4a8_parts(qcal::in<uint16_t>(xc), n, wp, szp, planes, yp, N, xc.size(0), K, group_size,
                                  qcal::threads()));
    return ys;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w4a8_mm_multi(Tensor x, Tensor[] w, Tensor[] sz, int group_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w4a8_mm_multi", &w4a8_mm_multi);
}
