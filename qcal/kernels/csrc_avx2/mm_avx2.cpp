/* qcal: the small-M matmuls (a decode step's linear layers) on AVX2/FMA CPUs: bf16 x bf16 (w16a16_mm_small), int8
   weight-only through exact activation digits (w8a16_mm_vnni) or widening the weight (w8a16_mm_small; float8 e4m3fn
   weights the same way: wf8a16_mm_small), and dynamic A8W8 (w8a8_mm_small). The operators of csrc/bf16_small_m.cpp
   and csrc/int8_small_m.cpp: the same schemas, the same argument checks and messages, the same arithmetic, the
   weight read in place ((N, K) row-major) and streamed once, rows split among the threads by qcal_run_units and
   prefetched ahead.

   The results are those of the AVX-512 kernels, bit for bit (as the Intel SDM defines their instructions;
   tests/test_avx2_mm.py checks these kernels against references of those definitions):

   * bf16 products (w16a16_mm_small, w8a16_mm_small, wf8a16_mm_small, and w8a16_mm_vnni where it takes that kernel).
     vdpbf16ps is, per fp32 lane j (16 a zmm), acc = fma(a[2j+1], b[2j+1], acc) then acc = fma(a[2j], b[2j], acc), each
     FMA rounded to nearest even, denormal inputs read as zero, tiny results flushed to zero, MXCSR neither read nor
     written (Intel SDM). Here the 16 lanes are two 8-lane halves (column pairs 0-7 and 8-15 of each 32 columns); the
     even and odd bf16 of each pair are split into two fp32 vectors (exact: a bf16 is the upper half of an fp32; int8
     converts exactly) and the same two FMAs run per lane in the same order, the k-loop under an MXCSR set to that
     environment (nearest even, DAZ, FTZ, exceptions masked; the caller's restored for the rest). A lane never holds -0
     (it starts at +0 and a nearest-even sum is -0 only from two -0), so the AVX-512 kernel's zero columns past K change
     nothing, here as there. The final _mm512_reduce_add_ps (GCC's: upper 8 lanes + lower 8, then the two 128-bit
     halves, then lanes {0,1} + {2,3}, then lane 0 + lane 1) is qcal_hsum8(hi + lo), in the caller's environment as
     there. Not reproduced: which NaN's payload and sign come out where several NaNs meet (vdpbf16ps ranks them its own
     way; any NaN stays a NaN), and a result that rounds up to exactly FLT_MIN from below (x86 FTZ judges tininess after
     rounding; vdpbf16ps does not document its rule).
   * int8 digits (w8a16_mm_vnni): the AVX-512 result is the exact integer sum_k u[k] w[n, k] (u = xf + 2^23, xf the
     row scaled by 2^E and rounded to an integer, |xf| < 2^23) less 2^23 wsum[n], scaled and rounded once. Here u is
     split into two 12-bit digits instead of three bytes (vpmaddwd on the weight widened to 16 bits: every
     product and int32 partial sum exact), so the integer, and so the result, is the same.
   * A8W8 (w8a8_mm_small): rowquant.h's per-row quantization (rowquant_avx2.h: fp32 division, nearest even, a row
     holding NaN or Inf getting a NaN scale), the integer sum_k q w (int32, modulo 2^32 as vpdpbusd's sum_k (q + 128)
     w less 128 wsum) through vpsignb / vpmaddubsw / vpmaddwd, then the same fp32 rescale. */

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
#include "multi.h"
#include "ops.h"
#include "parallel.h"
#include "rowquant_avx2.h"

#define AI static inline __attribute__((always_inline))

/* How far ahead (bytes) the kernels prefetch the weight. A tile's weight rows are one contiguous block of the
   (N, K) weight and a thread's next tiles follow it, so the prefetch walks that block linearly, one line per 64
   bytes the tile consumes, WEIGHT_AHEAD bytes past them (on into the next tiles). Zen 3, 2 threads, weights from
   DRAM, variants timed interleaved: bf16 1536 x 576 at 20-22 GB/s this way against 14 with the AVX-512 kernels'
   per-row prefetch (w + r K + k + 256, or 4096 for the digits) or none (the hardware prefetcher alone); 2048 and
   8192 a little slower than 4096. */
#define WEIGHT_AHEAD 4096

/* Prefetch the lines `lines` x 64 bytes at `consumed` bytes into a tile's weight block, WEIGHT_AHEAD ahead. */
AI void prefetch_ahead(const void *block, int64_t consumed, int lines) {
    for (int i = 0; i < lines; i++) _mm_prefetch((const char *)block + consumed + 64 * i + WEIGHT_AHEAD, _MM_HINT_T0);
}

/* ------------------------------------------------------------------ bf16 products (the vdpbf16ps lanes) */

/* 32 columns as the fp32 operands of vdpbf16ps's 16 lanes: e0/o0 the even/odd columns of pairs 0-7, e1/o1 of pairs
   8-15. */
struct cols32 {
    __m256 e0, o0, e1, o1;
};

AI cols32 split_bf16(const uint16_t *p) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)p), b = _mm256_loadu_si256((const __m256i *)(p + 16));
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    return {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_and_si256(a, hi)),
            _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), _mm256_castsi256_ps(_mm256_and_si256(b, hi))};
}

AI cols32 split_i8(const int8_t *p) {
    const __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
    return {_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(a, 16), 16)),
            _mm256_cvtepi32_ps(_mm256_srai_epi32(a, 16)),
            _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(b, 16), 16)),
            _mm256_cvtepi32_ps(_mm256_srai_epi32(b, 16))};
}

/* One vdpbf16ps: the odd column's product, then the even one's. */
AI void dp(__m256 acc[2], const cols32 &x, const cols32 &w) {
    acc[0] = _mm256_fmadd_ps(x.o0, w.o0, acc[0]);
    acc[0] = _mm256_fmadd_ps(x.e0, w.e0, acc[0]);
    acc[1] = _mm256_fmadd_ps(x.o1, w.o1, acc[1]);
    acc[1] = _mm256_fmadd_ps(x.e1, w.e1, acc[1]);
}

/* 32 float8 e4m3fn codes as the even / odd columns' exact fp32 values (the AVX-512 kernel's e4m3_to_bf16x32). */
AI cols32 split_f8(const uint8_t *p) {
    const __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
    const __m256i low = _mm256_set1_epi32(0xFF);
    return {qcal_e4m3_to_ps8(_mm256_and_si256(a, low)), qcal_e4m3_to_ps8(_mm256_srli_epi32(a, 16)),
            qcal_e4m3_to_ps8(_mm256_and_si256(b, low)), qcal_e4m3_to_ps8(_mm256_srli_epi32(b, 16))};
}

AI cols32 split_w(const uint16_t *p) { return split_bf16(p); }
AI cols32 split_w(const int8_t *p) { return split_i8(p); }
AI cols32 split_w(const uint8_t *p) { return split_f8(p); } /* float8 e4m3fn bytes */

/* R weight rows x MM input rows (R * MM <= 4: 8 accumulators): the 16 lanes of each output into lanes[r][m][0..16).
   Runs under QCAL_VDP_MXCSR. The last partial 32 columns go through zero-padded copies (nothing read past a row). */
template <typename W, int R, int MM>
AI void tile_dp(const uint16_t *x, int64_t K, const W *w, float lanes[4][4][16]) {
    __m256 acc[R][MM][2];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (sizeof(W) == 2 || !(k & 63)) prefetch_ahead(w, R * k * (int64_t)sizeof(W), R);
        cols32 xv[MM];
        for (int m = 0; m < MM; m++) xv[m] = split_bf16(x + m * K + k);
        for (int r = 0; r < R; r++) {
            const cols32 wv = split_w(w + r * K + k);
            for (int m = 0; m < MM; m++) dp(acc[r][m], xv[m], wv);
        }
    }
    if (k < K) {
        const size_t left = (size_t)(K - k);
        uint16_t xt[MM][32];
        W wt[R][32];
        memset(xt, 0, sizeof(xt));
        memset(wt, 0, sizeof(wt));
        for (int m = 0; m < MM; m++) memcpy(xt[m], x + m * K + k, left * 2);
        for (int r = 0; r < R; r++) memcpy(wt[r], w + r * K + k, left * sizeof(W));
        for (int m = 0; m < MM; m++) {
            const cols32 xv = split_bf16(xt[m]);
            for (int r = 0; r < R; r++) dp(acc[r][m], xv, split_w(wt[r]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) {
            _mm256_storeu_ps(lanes[r][m], acc[r][m][0]);
            _mm256_storeu_ps(lanes[r][m] + 8, acc[r][m][1]);
        }
}

/* rb (1..4) weight rows x mb (1..4) input rows, in tiles of at most 8 accumulators: 4 x 1, or 2 x 2 over pairs of
   input rows (the second pass reads the unit's rows from L1/L2). */
template <typename W>
AI void unit_dp(const uint16_t *x, int64_t K, const W *w, int rb, int mb, float lanes[4][4][16]) {
    int m = 0;
    for (; m + 2 <= mb; m += 2)
        for (int r = 0; r < rb; r += 2) {
            float(*l)[4][16] = (float(*)[4][16])&lanes[r][m];
            if (rb - r >= 2) tile_dp<W, 2, 2>(x + m * K, K, w + r * K, l);
            else tile_dp<W, 1, 2>(x + m * K, K, w + r * K, l);
        }
    if (m < mb) {
        float(*l)[4][16] = (float(*)[4][16])&lanes[0][m];
        switch (rb) {
        case 1: tile_dp<W, 1, 1>(x + m * K, K, w, l); break;
        case 2: tile_dp<W, 2, 1>(x + m * K, K, w, l); break;
        case 3: tile_dp<W, 3, 1>(x + m * K, K, w, l); break;
        default: tile_dp<W, 4, 1>(x + m * K, K, w, l); break;
        }
    }
}

typedef struct {
    const uint16_t *x;
    const void *w;
    const float *ws; /* NULL: bf16 weight, no scale */
    uint16_t *y;
    int64_t N, K;
} dp_ctx;

template <typename W> static void dp_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const dp_ctx *a = (const dp_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
    float lanes[4][4][16];
    const unsigned int env = _mm_getcsr();
    _mm_setcsr(QCAL_VDP_MXCSR);
    unit_dp<W>(a->x + m0 * K, K, (const W *)a->w + n0 * K, rb, mb, lanes);
    _mm_setcsr(env);
    for (int r = 0; r < rb; r++)
        for (int m = 0; m < mb; m++) {
            float s = qcal_hsum8(_mm256_add_ps(_mm256_loadu_ps(lanes[r][m] + 8), _mm256_loadu_ps(lanes[r][m])));
            if (a->ws) s *= a->ws[n0 + r];
            a->y[(m0 + m) * N + n0 + r] = qcal_float_to_bf16(s);
        }
}

/* x (M, K) bf16; w (N, K) bf16 row-major. */
static void w16a16_small(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K,
                         int nthreads) {
    const dp_ctx ctx = {x, w, NULL, y, N, K};
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, dp_unit<uint16_t>);
}

/* x (M, K) bf16; w (N, K) int8 (or float8 e4m3fn bytes with fp8) row-major; ws (N) fp32. Returns 0, or -1 for bad
   arguments. */
static int w8a16_small(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int nthreads, bool fp8 = false) {
    if (K <= 0 || N < 0 || M < 0) return -1;
    const dp_ctx ctx = {x, w, ws, y, N, K};
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, fp8 ? dp_unit<uint8_t> : dp_unit<int8_t>);
    return 0;
}

/* ------------------------------------------------------------------ integer dot products (vpmaddwd) */

/* 16 int8 weights widened to int16. */
AI __m256i w16(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }

AI int64_t hsum_epi32_64(__m256i v) { /* the 8 int32 lanes summed without overflow */
    const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                       _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

AI uint32_t hsum_epi32_wrap(__m256i v) { /* modulo 2^32, as vpdpbusd and _mm512_reduce_add_epi32 */
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(s);
}

/* ---------------------------------------------- int8 weight-only through exact activation digits (w8a16_mm_vnni)

   Each row of x is scaled by 2^E (E = 23 - p, max |x| in [2^(p-1), 2^p)) and rounded to an integer xf, |xf| <
   2^23 (exact in double, rounded as vcvtps2dq); u = xf + 2^23 in [0, 2^24) is written as two 12-bit digits
   u = u0 + 2^12 u1 (int16 planes, zero past K), and
       sum_k x[k] w[n, k] = 2^-E (S0 + 2^12 S1 - 2^23 wsum[n]),   Sd = sum_k ud[k] w[n, k]
   with vpmaddwd (pairs of 16-bit products summed into int32: |pair| <= 4095 * 128 * 2 < 2^20), int32 lanes for
   DIGIT_BLOCK columns (2^10 pairs a lane: < 2^30), then int64. The result is scaled by ws[n] in double, rounded
   to fp32 and then to bf16, as the AVX-512 kernel does. A call with a row holding NaN or Inf, or K > DIGITS_MAX_K,
   takes the widening kernel (as there). */

#define DIGITS_MAX_K 65536 /* the AVX-512 kernel's limit (its int32 digit sums) */
#define DIGIT_BLOCK 16384

/* Row m's digit planes (Kp int16 each at d, d + Kp) and exponent; returns 1 where the row holds NaN or Inf. */
static int row_digits(const uint16_t *x, int64_t K, int64_t Kp, int16_t *d, int *E) {
    int bad;
    const float top = qcal_row_amax(x, K, &bad);
    if (bad) return 1;
    int p = 0;
    if (top > 0.f) frexpf(top, &p);
    *E = 23 - p; /* E in [-105, 155]: 2^E is a double */
    const __m256d scale = _mm256_set1_pd(ldexp(1.0, *E));
    const __m128i bias = _mm_set1_epi32(1 << 23), low12 = _mm_set1_epi32(0xFFF);
    int16_t *d0 = d, *d1 = d + Kp;
    for (int64_t k = 0; k < Kp; k += 8) {
        const int64_t n = K - k < 8 ? (K - k > 0 ? K - k : 0) : 8;
        const __m256 v = n == 8 ? qcal_load8_bf16(x + k) : qcal_load8_bf16_tail(x + k, n);
        __m128i u[2];
        for (int h = 0; h < 2; h++) {
            const __m128 half = h ? _mm256_extractf128_ps(v, 1) : _mm256_castps256_ps128(v);
            const __m256d s = _mm256_mul_pd(_mm256_cvtps_pd(half), scale); /* exact */
            u[h] = _mm_add_epi32(_mm256_cvtpd_epi32(s), bias); /* nearest even (MXCSR), [0, 2^24) */
        }
        const __m128i live = _mm_cmpgt_epi16(_mm_set1_epi16((short)n), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
        const __m128i lo = _mm_packs_epi32(_mm_and_si128(u[0], low12), _mm_and_si128(u[1], low12));
        const __m128i hi = _mm_packs_epi32(_mm_srli_epi32(u[0], 12), _mm_srli_epi32(u[1], 12));
        _mm_storeu_si128((__m128i *)(d0 + k), _mm_and_si128(lo, live)); /* zero past K */
        _mm_storeu_si128((__m128i *)(d1 + k), _mm_and_si128(hi, live));
    }
    return 0;
}

/* 16 columns: the two digits of one input row against R weight rows. */
template <int R> AI void digit_step(__m256i acc[R][2], __m256i u0, __m256i u1, const int8_t *const *wr, int64_t k) {
    for (int r = 0; r < R; r++) {
        const __m256i wv = w16(wr[r] + k);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(u0, wv));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(u1, wv));
    }
}

/* R weight rows (1..4) x one input row's digits: y[r] for r < R. */
template <int R>
AI void tile_digits(const int16_t *d, int64_t Kp, int64_t K, const int8_t *w, const int32_t *wsum, const float *ws,
                    int E, uint16_t *y) {
    const int16_t *d0 = d, *d1 = d + Kp;
    const int8_t *wr[R];
    for (int r = 0; r < R; r++) wr[r] = w + r * K;
    int64_t sum[R];
    for (int r = 0; r < R; r++) sum[r] = 0;
    for (int64_t kb = 0; kb < K; kb += DIGIT_BLOCK) {
        const int64_t kend = K - kb < DIGIT_BLOCK ? K : kb + DIGIT_BLOCK;
        __m256i acc[R][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        int64_t k = kb;
        for (; k + 16 <= kend; k += 16) {
            if (!(k & 63)) prefetch_ahead(w, R * k, R);
            digit_step<R>(acc, _mm256_loadu_si256((const __m256i *)(d0 + k)),
                          _mm256_loadu_si256((const __m256i *)(d1 + k)), wr, k);
        }
        if (k < kend) { /* the last columns of the row: zero-padded copies */
            int8_t wt[R][16];
            const int8_t *wp[R];
            memset(wt, 0, sizeof(wt));
            for (int r = 0; r < R; r++) {
                memcpy(wt[r], wr[r] + k, (size_t)(kend - k));
                wp[r] = wt[r];
            }
            digit_step<R>(acc, _mm256_loadu_si256((const __m256i *)(d0 + k)),
                          _mm256_loadu_si256((const __m256i *)(d1 + k)), wp, 0);
        }
        for (int r = 0; r < R; r++) sum[r] += hsum_epi32_64(acc[r][0]) + hsum_epi32_64(acc[r][1]) * 4096;
    }
    for (int r = 0; r < R; r++) {
        const int64_t s = sum[r] - (int64_t)wsum[r] * ((int64_t)1 << 23);
        y[r] = qcal_float_to_bf16((float)((double)s * qcal::pow2(-E) * (double)ws[r])); /* ldexp(s, -E): exact */
    }
}

typedef int16_t qcal_digit_t; /* two 12-bit digit planes, padded to whole 16-column loads */
#define QCAL_DIGIT_PLANES 2
#define QCAL_DIGIT_PAD 16
#define QCAL_TILE_DIGITS(RB, d, Kp, K, w, wsum, ws, E, y) tile_digits<RB>(d, Kp, K, w, wsum, ws, E, y)
#include "int8_digits.h"  // the driver (ISA-neutral): shared with the AVX-512 build

/* ---------------------------------------------- dynamic A8W8 (w8a8_mm_small)

   Each row quantized by rowquant_avx2.h (csrc/rowquant.h's codes and scales: scale = FLT_MIN + amax / 127, code =
   x / scale rounded half to even, a NaN scale for a row holding NaN or Inf) into signed bytes (rows padded with
   zeros to Kp), then sum_k q w (int32, modulo 2^32 as vpdpbusd) and xs * ws in fp32 as the AVX-512 kernel does.
   The integer sums, 32 columns a step, without widening either operand: vpmaddubsw(|w|, sign(q, w)) is the pairs
   q[2i] w[2i] + q[2i + 1] w[2i + 1] in 16 bits, exact (|w| <= 128 read unsigned, |q| <= 127: a pair is at most
   2 * 128 * 127 = 32512, never saturated; codes are within +-127 because amax / scale <= 127 (1 + 2^-23), and 0 for
   a nonfinite row), widened and summed in int32 by vpmaddwd with ones. The AVX-512 kernel's sum_k (q + 128) w - 128
   wsum is the same integer modulo 2^32 (wsum is not read here). A weight row by an input row takes vpsignb,
   vpmaddubsw, vpmaddwd and vpaddd per 32 columns (and a vpabsb per weight row), where both operands widened to 16
   bits took two vpmaddwd and two vpaddd and the widening (SmolLM2 prefill of 512 tokens, 2 threads: 1.1-1.3x). */

/* acc += the products of 32 columns of one input row's codes x and one weight row's bytes wv (aw = |wv|), in pairs.
   The empty asm keeps GCC from reassociating the sums of successive steps: it then held one step's products across
   the next, more registers than AVX2 has, and kept accumulators in memory. */
AI void a8w8_dot(__m256i &acc, __m256i x, __m256i wv, __m256i aw, __m256i ones) {
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, wv)), ones));
    __asm__("" : "+x"(acc));
}

/* The int32 lanes (modulo 2^32) of R (1..4) weight rows (at w, ldw bytes apart) by MM (1..2) input rows' codes (at
   q, Kp apart) over n32 blocks of 32 columns, into acc[r][m] (their sums over the lanes are the caller's). The
   accumulators are named variables, not an array (as an array, GCC kept them in memory); 64 columns an iteration,
   prefetching as many lines ahead as it reads (a tile's weight rows are one block, read front to back). */
template <int R, int MM>
AI void a8w8_blocks(const int8_t *q, int64_t Kp, const int8_t *w, int64_t ldw, int64_t n32, __m256i acc[4][2]) {
    const __m256i ones = _mm256_set1_epi16(1), z = _mm256_setzero_si256();
    __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z;
    auto step = [&](int64_t k) __attribute__((always_inline)) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m256i x1 = MM > 1 ? _mm256_loadu_si256((const __m256i *)(q + Kp + k)) : x0;
        auto row = [&](int r, __m256i &c0, __m256i &c1) __attribute__((always_inline)) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * ldw + k)), aw = _mm256_abs_epi8(wv);
            a8w8_dot(c0, x0, wv, aw, ones);
            if (MM > 1) a8w8_dot(c1, x1, wv, aw, ones);
        };
        row(0, a00, a01);
        if (R > 1) row(1, a10, a11);
        if (R > 2) row(2, a20, a21);
        if (R > 3) row(3, a30, a31);
    };
    int64_t b = 0;
    for (; b + 2 <= n32; b += 2) {
        prefetch_ahead(w, R * 32 * b, R);
        step(32 * b);
        step(32 * b + 32);
    }
    if (b < n32) step(32 * b);
    acc[0][0] = a00, acc[0][1] = a01, acc[1][0] = a10, acc[1][1] = a11;
    acc[2][0] = a20, acc[2][1] = a21, acc[3][0] = a30, acc[3][1] = a31;
}

/* The sums of the last K % 32 columns into s[m R + r]: the codes are zero past K (Kp), the weight is read from a
   zero-padded copy only to stay inside it. Called by the tile before its accumulators live (across a call GCC
   keeps them in memory). */
template <int R, int MM>
__attribute__((noinline)) static void a8w8_tail(const int8_t *q, int64_t Kp, const int8_t *w, int64_t K,
                                                uint32_t *s) {
    const int64_t k = K / 32 * 32;
    int8_t wt[R][32];
    memset(wt, 0, sizeof(wt));
    for (int r = 0; r < R; r++) memcpy(wt[r], w + r * K + k, (size_t)(K - k));
    __m256i acc[4][2];
    a8w8_blocks<R, MM>(q + k, Kp, wt[0], 32, 1, acc);
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MM; m++) s[m * R + r] = hsum_epi32_wrap(acc[r][m]);
}

/* R weight rows x MM input rows: y[m ldy + r] = bf16(float(sum) * xs[m] * ws[r]). */
template <int R, int MM>
AI void tile_a8w8(const int8_t *q, int64_t Kp, int64_t K, const int8_t *w, const float *ws, const float *xs,
                  uint16_t *y, int64_t ldy) {
    alignas(32) uint32_t s[8] = {0}; /* modulo 2^32, [m R + r] */
    if (K % 32) a8w8_tail<R, MM>(q, Kp, w, K, s);
    __m256i acc[4][2];
    a8w8_blocks<R, MM>(q, Kp, w, K, K / 32, acc);
    if constexpr (R == 4 && MM == 2) { /* the 8 sums as one vector [m0: r0..r3, m1: r0..r3], rescaled at once */
        const __m256i u0 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0][0], acc[1][0]),
                                             _mm256_hadd_epi32(acc[2][0], acc[3][0]));
        const __m256i u1 = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[0][1], acc[1][1]),
                                             _mm256_hadd_epi32(acc[2][1], acc[3][1]));
        const __m256i sum = _mm256_add_epi32(
            _mm256_load_si256((const __m256i *)s),
            _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31)));
        const __m128 w4 = _mm_loadu_ps(ws);
        const __m256 xs2 = _mm256_setr_m128(_mm_set1_ps(xs[0]), _mm_set1_ps(xs[1]));
        const __m256 f = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), xs2), _mm256_setr_m128(w4, w4));
        const __m256i h = _mm256_srli_epi32(qcal_bf16_bits8(f), 16);
        const __m128i b = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        _mm_storel_epi64((__m128i *)y, b);
        _mm_storel_epi64((__m128i *)(y + ldy), _mm_unpackhi_epi64(b, b));
    } else {
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MM; m++) {
                const int32_t sum = (int32_t)(s[m * R + r] + hsum_epi32_wrap(acc[r][m]));
                y[m * ldy + r] = qcal_float_to_bf16((float)sum * xs[m] * ws[r]);
            }
    }
}

typedef struct {
    const int8_t *q; /* (M, Kp) codes */
    const int8_t *w;
    const float *ws, *xs;
    uint16_t *y;
    int64_t N, K, Kp;
} a8w8_ctx;

static void a8w8_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const a8w8_ctx *a = (const a8w8_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K, Kp = a->Kp;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
    for (int m = 0; m < mb; m += 2) {
        const int mm = mb - m >= 2 ? 2 : 1;
        const int8_t *q = a->q + (m0 + m) * Kp;
        const int8_t *w = a->w + n0 * K;
        const float *ws = a->ws + n0, *xs = a->xs + m0 + m;
        uint16_t *y = a->y + (m0 + m) * N + n0;
#define T8(R, MM) tile_a8w8<R, MM>(q, Kp, K, w, ws, xs, y, N)
        switch (rb * 2 + mm) {
        case 3: T8(1, 1); break;
        case 4: T8(1, 2); break;
        case 5: T8(2, 1); break;
        case 6: T8(2, 2); break;
        case 7: T8(3, 1); break;
        case 8: T8(3, 2); break;
        case 9: T8(4, 1); break;
        default: T8(4, 2); break;
        }
#undef T8
    }
}

/* x (M, K) bf16, each row quantized once, times n int8 weights w[i] (N[i], K) row-major with scales ws[i] (N[i])
   fp32 into y[i] (M, N[i]) bf16, the weights' units one pool. Returns 0, -1 for unsupported arguments (nothing
   written), -2 on allocation failure. */
static int w8a8_parts(const uint16_t *x, int n, const int8_t *const *w, const float *const *ws, uint16_t *const *y,
                      const int64_t *N, int64_t M, int64_t K, int nthreads) {
    if (K <= 0 || M < 0 || n < 1 || n > QCAL_MAX_WEIGHTS) return -1;
    for (int i = 0; i < n; i++)
        if (N[i] < 0) return -1;
    const int64_t Kp = (K + 31) / 32 * 32;
    int8_t *q = (int8_t *)malloc((size_t)(M > 0 ? M : 1) * (size_t)Kp);
    float *xs = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!q || !xs) {
        free(q);
        free(xs);
        return -2;
    }
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        xs[m] = qcal_quantize_row(x + m * K, K, (uint8_t *)q + m * Kp, 0);
        memset(q + m * Kp + K, 0, (size_t)(Kp - K));
    }
    a8w8_ctx ctx[QCAL_MAX_WEIGHTS];
    const void *ctxs[QCAL_MAX_WEIGHTS];
    int64_t first[QCAL_MAX_WEIGHTS + 1] = {0};
    for (int i = 0; i < n; i++) {
        ctx[i] = {q, w[i], ws[i], xs, y[i], N[i], K, Kp};
        ctxs[i] = &ctx[i];
        first[i + 1] = first[i] + (N[i] + 3) / 4; /* units: 4 weight rows */
    }
    if (n == 1) {
        qcal_run_units(M, first[1], nthreads, &ctx[0], a8w8_unit);
    } else {
        const qcal_parts_job job = {ctxs, first, n, a8w8_unit};
        qcal_run_units(M, first[n], nthreads, &job, qcal_parts_unit);
    }
    free(q);
    free(xs);
    return 0;
}

/* One weight (N, K) (wsum: the AVX-512 kernel's, not read here). */
static int w8a8_small(const uint16_t *x, const int8_t *w, const int32_t *, const float *ws, uint16_t *y, int64_t M,
                      int64_t N, int64_t K, int nthreads) {
    return w8a8_parts(x, 1, &w, &ws, &y, &N, M, K, nthreads);
}

/* ------------------------------------------------------------------ operators */

#include "bf16_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build
#include "int8_api.h"

/* ------------------------------------------------------------------ several weights on one input (this build only) */

/* w8a8_mm_small for a list of weights sharing x (q / k / v, gate / up): each output w8a8_mm_small's for its weight,
   bit for bit, the rows quantized once and the weights' units one pool for the threads. */
static std::vector<at::Tensor> w8a8_mm_small_multi(const at::Tensor &x, at::TensorList w, at::TensorList wsum,
                                                   at::TensorList ws) {
    const char *op = "qcal::w8a8_mm_small_multi";
    qcal::multi_checked(op, w.size(), wsum.size(), "wsum");
    qcal::multi_checked(op, w.size(), ws.size(), "ws");
    const int n = (int)w.size();
    const int8_t *wp[QCAL_MAX_WEIGHTS];
    const float *wsp[QCAL_MAX_WEIGHTS];
    uint16_t *yp[QCAL_MAX_WEIGHTS];
    int64_t N[QCAL_MAX_WEIGHTS], K = 0;
    for (int i = 0; i < n; i++) {
        const std::string opi = qcal::weight_op(op, i);
        w8_weight_checked(opi.c_str(), w[i], ws[i]);
        qcal::check_tensor(opi.c_str(), "wsum", wsum[i], at::kInt, {w[i].size(0)});
        TORCH_CHECK_VALUE(i == 0 || w[i].size(1) == K, opi, ": K=", w[i].size(1), " where weight 0 has K=", K,
                          " (one input)");
        K = w[i].size(1);
        wp[i] = qcal::in<int8_t>(w[i]);
        wsp[i] = qcal::in<float>(ws[i]);
        N[i] = w[i].size(0);
    }
    const at::Tensor xc = qcal::rows(op, x, K);
    std::vector<at::Tensor> ys = qcal::multi_outputs(xc, w, yp);
    qcal::check_rc(op, w8a8_parts(qcal::in<uint16_t>(xc), n, wp, wsp, yp, N, xc.size(0), K, qcal::threads()));
    return ys;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w8a8_mm_small_multi(Tensor x, Tensor[] w, Tensor[] wsum, Tensor[] ws) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w8a8_mm_small_multi", &w8a8_mm_small_multi);
}
