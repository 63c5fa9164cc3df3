/* qcal: small-M A8W8 matmul with fused per-row activation quantization (dynamic int8 x int8), AVX512-VNNI.

   y[m, n] = xs[m] * ws[n] * sum_k q[m, k] w[n, k],   q = rint(x / xs),   xs = FLT_MIN + amax_k |x[m, k]| / 127
   (fp32, half to even: qcal.kernels.common.quantize_per_token), so the integer sums are exact (int32) and
   the result is rounded once to bf16 -- the numbers of per-token quantize + torch._int_mm + rescale.

   The weight is read in its canonical (N, K) row-major int8 layout (no second copy): 64 columns of a row
   per load, one vpdpbusd per (row, input row) adding 4-column partial sums in 16 lanes, one horizontal sum
   per output at the end. vpdpbusd multiplies unsigned by signed bytes: the activations enter as q + 128
   and 128 * sum_k w[n, k] (wsum, precomputed) is subtracted. */

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"
#include "rowquant.h"
#include "tiles.h"
#include "a8w8.h"
#include "ops.h"

#define AI static inline __attribute__((always_inline))


/* RB weight rows (1..4) x MM input rows (1..4). */
AI void tile8(const uint8_t *xq, int64_t K, const int8_t *w, const int32_t *wsum, const float *ws, const float *xs,
              uint16_t *y, int64_t ldy, int RB, int MM) {
    __m512i acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 live = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __m512i wv[4];
        for (int r = 0; r < RB; r++)
            _mm_prefetch((const char *)(w + r * K + k) + QCAL_STREAM_AHEAD, _MM_HINT_T0);
        for (int r = 0; r < RB; r++) wv[r] = _mm512_maskz_loadu_epi8(live, w + r * K + k);
        for (int m = 0; m < MM; m++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(live, xq + m * K + k);
            for (int r = 0; r < RB; r++) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], xv, wv[r]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) {
            const int32_t sum = _mm512_reduce_add_epi32(acc[r][m]) - 128 * wsum[r];
            y[m * ldy + r] = qcal_float_to_bf16((float)sum * xs[m] * ws[r]);
        }
}


static void a8w8_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const qcal_a8w8_args *a = (const qcal_a8w8_args *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
#define T8(RB, MM) \
    tile8(a->xq + m0 * K, K, a->w + n0 * K, a->wsum + n0, a->ws + n0, a->xs + m0, a->y + m0 * N + n0, N, RB, MM)
    QCAL_RB_X_MB(T8)
#undef T8
}

/* x (M, K) bf16; w (N, K) int8 row-major; wsum (N) int32; ws (N) fp32; y (M, N) bf16. Returns 0, -1 for
   unsupported arguments (nothing written), -2 on allocation failure. */
static int w8a8_small(const uint16_t *x, const int8_t *w, const int32_t *wsum, const float *ws, uint16_t *y,
                      int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K <= 0 || N < 0 || M < 0) return -1;
    const int64_t units = (N + 3) / 4; /* groups of 4 output rows */
    uint8_t *xq;
    float *xs;
    if (qcal_a8w8_quantize(x, M, K, nthreads, &xq, &xs)) return -2;
    const qcal_a8w8_args ctx = {xq, w, wsum, ws, xs, y, N, K};
    qcal_run_units(M, units, nthreads, &ctx, a8w8_unit);
    free(xq);
    free(xs);
    return 0;
}

/* A16W8 (int8 weight-only): y[m, n] = ws[n] * sum_k x[m, k] w[n, k] with bf16 x, in fp32. The weight is read
   in place (canonical (N, K) row-major int8): 32 codes of a row become 32 exact bf16 values (int8 fits bf16's
   8-bit significand) and one vdpbf16ps multiplies them with 32 activations, one horizontal sum per output.
   FP8 = 1: the weight bytes are float8 e4m3fn codes (fp8 weight-only), widened exactly the same way (4 significant
   bits); weights hold no NaN (quantization clamps them to +-448). */

/* 32 float8 e4m3fn bytes -> 32 bf16, exact, in 16-bit lanes: a normal code (exponent e >= 1) moves its exponent
   and mantissa bits into place and rebiases (e + 120); a subnormal one (m * 2^-9, m < 8) is looked up. */
AI __m512i e4m3_to_bf16x32(__m256i b) {
    const __m512i v = _mm512_cvtepu8_epi16(b);
    const __m512i em = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8);
    const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(em, 4), _mm512_set1_epi16(120 << 7));
    const __m512i subnormals = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0);
    const __m512i sub = _mm512_permutexvar_epi16(em, subnormals);  // index: em's low 5 bits (em < 8 where used)
    const __mmask32 is_sub = _mm512_cmplt_epu16_mask(em, _mm512_set1_epi16(8));
    return _mm512_or_si512(_mm512_mask_blend_epi16(is_sub, normal, sub), sign);
}

template <int FP8>
AI void tile16(const uint16_t *x, int64_t K, const int8_t *w, const float *ws, uint16_t *y, int64_t ldy, int RB,
               int MM) {
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const int64_t left = K - k;
        const __mmask16 lo_live = qcal_tail16(left), hi_live = qcal_tail16(left - 16 > 0 ? left - 16 : 0);
        __m512bh wv[4];
        if (!(k & 63))
            for (int r = 0; r < RB; r++)
                _mm_prefetch((const char *)(w + r * K + k + QCAL_STREAM_AHEAD), _MM_HINT_T0);
        const __mmask32 xlive = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        for (int r = 0; r < RB; r++) {
            if (FP8) {
                wv[r] = (__m512bh)e4m3_to_bf16x32(_mm256_maskz_loadu_epi8(xlive, w + r * K + k));
            } else {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lo_live, w + r * K + k)));
                const __m512 hi = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(hi_live, w + r * K + k + 16)));
                wv[r] = _mm512_cvtne2ps_pbh(hi, lo);
            }
        }
        for (int m = 0; m < MM; m++) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(xlive, x + m * K + k);
            for (int r = 0; r < RB; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) y[m * ldy + r] = qcal_float_to_bf16(_mm512_reduce_add_ps(acc[r][m]) * ws[r]);
}

typedef struct {
    const uint16_t *x;
    const int8_t *w;
    const float *ws;
    uint16_t *y;
    int64_t N, K;
} a16w8_ctx;

template <int FP8> static void a16w8_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const a16w8_ctx *a = (const a16w8_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
#define T16(RB, MM) tile16<FP8>(a->x + m0 * K, K, a->w + n0 * K, a->ws + n0, a->y + m0 * N + n0, N, RB, MM)
    QCAL_RB_X_MB(T16)
#undef T16
}

/* x (M, K) bf16; w (N, K) int8 (or float8 e4m3fn bytes with fp8) row-major; ws (N) fp32; y (M, N) bf16. Returns 0,
   or -1 for bad arguments. */
static int w8a16_small(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int nthreads, bool fp8 = false) {
    if (K <= 0 || N < 0 || M < 0) return -1;
    const int64_t units = (N + 3) / 4;
    const a16w8_ctx ctx = {x, w, ws, y, N, K};
    qcal_run_units(M, units, nthreads, &ctx, fp8 ? a16w8_unit<1> : a16w8_unit<0>);
    return 0;
}

/* A16W8 through VNNI with the activations as exact fixed-point digits (int8 weight-only, small M). Each row of x
   is scaled by a power of two 2^E (E = 22 - floor(log2 max |x|)) and rounded to an integer xf, |xf| <
   2^23: exact for every element within 2^15 of the row's largest (bf16 holds 8 significant bits), otherwise off by
   at most 2^-23 of that largest. xf + 2^23 is written as three unsigned bytes d0 + 2^8 d1 + 2^16 d2, and
       sum_k x[k] w[n, k] = 2^-E (S0 + 2^8 S1 + 2^16 S2 - 2^23 wsum[n]),   Sd = sum_k d[k] w[n, k]
   with the Sd exact int32 sums of vpdpbusd (unsigned digit bytes x signed weight bytes, 64 products an instruction,
   no widening of the weight) and the combination exact in int64; the result is scaled by ws[n] in double and
   rounded once to bf16. Three vpdpbusd per 64 weights against the bf16 kernel's widen-and-convert of every weight:
   the weight streams at memory speed. A row holding NaN or Inf takes the bf16 kernel (its IEEE semantics). */

/* The digit kernel does little work per weight byte, so it prefetches further ahead than the kernels that widen
   weights (256 -> 4096 bytes: ~15% faster through DRAM, kernels timed interleaved). */
#define DIGITS_AHEAD 4096
#define DIGITS_MAX_K 65536 /* |Sd| <= 255 * 128 * K stays inside int32 */

/* Row m's three digit planes (K bytes each, at d, d + Kp, d + 2 Kp) and its exponent; returns 1 (nothing usable)
   where the row holds NaN or Inf. */
static int row_digits(const uint16_t *x, int64_t K, int64_t Kp, uint8_t *d, int *E) {
    int bad;
    const float top = qcal_row_amax(x, K, &bad);
    if (bad) return 1;
    int p = 0;
    if (top > 0.f) {
        frexpf(top, &p); /* top = f 2^p, f in [0.5, 1): top < 2^p */
    }
    *E = 23 - p; /* |x| 2^E < 2^23 */
    const __m512 scale = _mm512_set1_ps((float)*E);
    const __m512i bias = _mm512_set1_epi32(1 << 23), byte = _mm512_set1_epi32(0xFF);
    for (int64_t k = 0; k < Kp; k += 16) {
        const __mmask16 live = qcal_tail16(K - k > 0 ? K - k : 0);
        const __m512 v = _mm512_scalef_ps(qcal_load_bf16_masked(x + k, live), scale); /* exact: a power of two */
        const __m512i u = _mm512_maskz_add_epi32(live, _mm512_cvtps_epi32(v), bias); /* nearest even; 0 past K */
        _mm_storeu_si128((__m128i *)(d + k), _mm512_cvtepi32_epi8(_mm512_and_si512(u, byte)));
        _mm_storeu_si128((__m128i *)(d + Kp + k), _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srli_epi32(u, 8), byte)));
        _mm_storeu_si128((__m128i *)(d + 2 * Kp + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 16)));
    }
    return 0;
}

/* RB weight rows (1..4) x one input row's digits. */
AI void tile_digits(const uint8_t *d, int64_t Kp, int64_t K, const int8_t *w, const int32_t *wsum, const float *ws,
                    int E, uint16_t *y, int RB) {
    __m512i acc[4][3];
    for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
        const __mmask64 live = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        const __m512i d0 = _mm512_loadu_si512(d + k), d1 = _mm512_loadu_si512(d + Kp + k),
                      d2 = _mm512_loadu_si512(d + 2 * Kp + k);
        for (int r = 0; r < RB; r++) {
            _mm_prefetch((const char *)(w + r * K + k) + DIGITS_AHEAD, _MM_HINT_T0);
            const __m512i wv = _mm512_maskz_loadu_epi8(live, w + r * K + k);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], d0, wv);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], d1, wv);
            acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], d2, wv);
        }
    }
    for (int r = 0; r < RB; r++) {
        const int64_t s = (int64_t)_mm512_reduce_add_epi32(acc[r][0]) + ((int64_t)_mm512_reduce_add_epi32(acc[r][1]) << 8) +
                          ((int64_t)_mm512_reduce_add_epi32(acc[r][2]) << 16) - ((int64_t)wsum[r] << 23);
        y[r] = qcal_float_to_bf16((float)((double)s * qcal::pow2(-E) * (double)ws[r])); /* ldexp(s, -E): exact */
    }
}

typedef uint8_t qcal_digit_t; /* three byte planes, padded to whole 64-column loads */
#define QCAL_DIGIT_PLANES 3
#define QCAL_DIGIT_PAD 64
#define QCAL_TILE_DIGITS(RB, d, Kp, K, w, wsum, ws, E, y) tile_digits(d, Kp, K, w, wsum, ws, E, y, RB)
#include "int8_digits.h"  // the driver (ISA-neutral): shared with the AVX2 build

/* ------------------------------------------------------------------ operators */

#include "int8_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
