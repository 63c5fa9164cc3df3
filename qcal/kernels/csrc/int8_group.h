/* qcal: int8 weights with a scale (and optionally a float zero-point) per group of input columns -- GGUF Q8_0
   (groups of 32, symmetric), GPTQ int8 with groups, asymmetric int8 -- times bf16 activations, for small M
   (decode). One source compiled into both libraries (csrc/int8_group_mm.cpp, csrc_avx2/int8_group_avx2.cpp) with
   AVX2/FMA instructions, so both give the same numbers; the AVX-512 library's one-row tile runs two weight rows a
   512-bit vector, each lane's operations those of the 256-bit tile (w8g_tile_pairs).

   Each weight is the dequantizer's fp32 value w = (q - z) s before its rounding to bf16 (computed as
   (2^24 q - 2^24 z) (2^-24 s): the power-of-two scalings are exact, so are the codes' conversions, and the product
   rounds as (q - z) s does -- for scales above 2^-102, far below any real one). Per 32 columns k .. k + 31 and
   lane i (0..7), one fp32 chain takes columns 4 i then 4 i + 1, another 4 i + 2 then 4 i + 3, one fused
   multiply-add of x[m, k] w[n, k] a step (one rounding), the blocks of 32 in order; then the two chains are
   added, the 8 lanes summed as (i, i + 4), (i, i + 2), (0, 1), and the sum rounded once to bf16 (nearest even; NaN
   stays NaN). The reference (the dequantized weight rounded to bf16, then the GEMM) agrees to about that weight
   rounding, 2^-9 relative a weight; these numbers are closer to the exact product.

   The weight is read in place, its canonical (N, K) int8 layout: 32 codes a load, each byte shifted to the top of
   its 32-bit lane and converted (no sign extension); threads share units of 4 weight rows, each unit serving every
   input row (tiles of 4 weight rows x 1 input row, 2 x 2, or 1 x 3-4) with the weight prefetched ahead, so it
   streams from memory once per call. Needs group_size % 32 == 0 and K % group_size == 0. */
#ifndef QCAL_INT8_GROUP_H
#define QCAL_INT8_GROUP_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_scalar.h"
#include "bound.h"
#include "ops.h"
#include "parallel.h"

#define W8G_AI static inline __attribute__((always_inline))

static inline bool w8g_fits(int64_t N, int64_t K, int64_t gs) {
    return N >= 0 && K > 0 && gs > 0 && gs % 32 == 0 && K % gs == 0;
}

W8G_AI float w8g_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 codes (columns k .. k + 31) as fp32 times 2^24 (exact): q[b] lane i holds column k + 4 i + b, the byte
   shifted to the top of its 32-bit lane and the rest masked off (no sign extension needed). */
W8G_AI void w8g_codes(const int8_t *p, __m256 q[4]) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), top = _mm256_set1_epi32((int)0xff000000u);
    q[0] = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 24));
    q[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_slli_epi32(v, 16), top));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_slli_epi32(v, 8), top));
    q[3] = _mm256_cvtepi32_ps(_mm256_and_si256(v, top));
}

/* How far ahead (bytes) the weight is prefetched: a tile's rows are one contiguous block of the weight and a
   thread's next tiles follow it, so the prefetch walks that block linearly (as the AVX2 small-M kernels do). */
#define W8G_AHEAD 4096

typedef struct {
    const float *xf; /* (M, K) the activations as fp32 (exact) */
    const int8_t *w;
    const float *s, *z; /* (N, G) scales, zero-points (NULL: symmetric) */
    uint16_t *y;
    int64_t N, K, gs;
} w8g_ctx;

/* RB weight rows (from n0) x MM input rows (from m0); RB MM <= 4 (8 accumulators). x: each 32 columns as 4
   vectors, vector b lane i holding column 4 i + b (the codes' order). */
template <int RB, int MM, bool HZ> W8G_AI void w8g_tile(const w8g_ctx *a, int64_t m0, int64_t n0) {
    const int64_t K = a->K, gs = a->gs, G = K / gs;
    const int8_t *w = a->w + n0 * K;
    const float *x = a->xf + m0 * K, *s = a->s + n0 * G, *z = HZ ? a->z + n0 * G : nullptr;
    const __m256 down = _mm256_set1_ps(0x1p-24f), up = _mm256_set1_ps(0x1p24f);
    __m256 acc[RB][MM][2];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    const int64_t bpg = gs / 32; /* 32-column blocks a group */
    int64_t g = 0, left = bpg;
    for (int64_t k = 0; k < K; k += 32) {
        if (!(k & 63))
            for (int r = 0; r < RB; r++) _mm_prefetch((const char *)w + RB * k + 64 * r + W8G_AHEAD, _MM_HINT_T0);
        for (int r = 0; r < RB; r++) {
            __m256 q[4];
            w8g_codes(w + r * K + k, q);
            /* (q - z) s exactly as the dequantizer's fp32 value: (2^24 q - 2^24 z) (2^-24 s) */
            const __m256 sv = _mm256_mul_ps(_mm256_broadcast_ss(s + r * G + g), down);
            if (HZ) {
                const __m256 zv = _mm256_mul_ps(_mm256_broadcast_ss(z + r * G + g), up);
                for (int b = 0; b < 4; b++) q[b] = _mm256_sub_ps(q[b], zv);
            }
            for (int b = 0; b < 4; b++) q[b] = _mm256_mul_ps(q[b], sv);
            for (int m = 0; m < MM; m++) {
                const float *xk = x + m * K + k;
                acc[r][m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xk), q[0], acc[r][m][0]);
                acc[r][m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 16), q[2], acc[r][m][1]);
                acc[r][m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 8), q[1], acc[r][m][0]);
                acc[r][m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xk + 24), q[3], acc[r][m][1]);
            }
        }
        if (--left == 0) {
            g++;
            left = bpg;
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++)
            a->y[(m0 + m) * a->N + n0 + r] =
                qcal_float_to_bf16(w8g_hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1])));
}

#ifdef __AVX512F__
/* [lo, hi]: two 256-bit halves as one 512-bit vector, and the upper half back (AVX512F only). */
W8G_AI __m512 w8g_join(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
W8G_AI __m256 w8g_upper(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* One input row x 2 RP weight rows (from n0), two rows a 512-bit vector (row n0 + 2 p in its lower 8 lanes, row
   n0 + 2 p + 1 in its upper 8): each lane runs the 256-bit tile's operations in its order (same numbers), with one
   vpshufb a code vector where w8g_codes takes a shift and a mask. The 256-bit tile is bound by its integer-to-float
   work, not by memory: a 1536 x 576 weight, one thread, in cache, 69.4 -> 54.2 us; two threads streamed, 39.3 ->
   35.7 us; the SmolLM2 gguf-q8_0 decode step (2 threads, the builds alternating) 7.7 -> 6.9 ms twice, 7.0 -> 7.2
   once. */
template <int RP, bool HZ> W8G_AI void w8g_tile_pairs(const w8g_ctx *a, int64_t m0, int64_t n0) {
    const int64_t K = a->K, gs = a->gs, G = K / gs;
    const int8_t *w = a->w + n0 * K;
    const float *x = a->xf + m0 * K, *s = a->s + n0 * G, *z = HZ ? a->z + n0 * G : nullptr;
    const __m512 down = _mm512_set1_ps(0x1p-24f), up = _mm512_set1_ps(0x1p24f);
    /* vpshufb controls: byte b of each 32-bit lane j to its byte 3 (index 4 j + b within the 16-byte lane), bytes
       0..2 zero */
    const __m512i lane = _mm512_set_epi32(12 << 24, 8 << 24, 4 << 24, 0, 12 << 24, 8 << 24, 4 << 24, 0, 12 << 24,
                                          8 << 24, 4 << 24, 0, 12 << 24, 8 << 24, 4 << 24, 0);
    __m512i to_top[4];
    for (int b = 0; b < 4; b++) to_top[b] = _mm512_add_epi32(_mm512_set1_epi32(0x00808080 | (b << 24)), lane);
    __m512 acc[RP][2], sv[RP], zv[RP];
    for (int p = 0; p < RP; p++) acc[p][0] = acc[p][1] = _mm512_setzero_ps();
    const int64_t bpg = gs / 32;
    int64_t g = 0, left = bpg;
    for (int64_t k = 0; k < K; k += 32) {
        if (!(k & 63))
            for (int r = 0; r < 2 * RP; r++)
                _mm_prefetch((const char *)w + 2 * RP * k + 64 * r + W8G_AHEAD, _MM_HINT_T0);
        if (left == bpg) /* a new group: the rows' scales (and zero-points), scaled as the 256-bit tile does */
            for (int p = 0; p < RP; p++) {
                const int64_t r0 = 2 * p * G + g, r1 = r0 + G;
                sv[p] = _mm512_mul_ps(w8g_join(_mm256_set1_ps(s[r0]), _mm256_set1_ps(s[r1])), down);
                if (HZ) zv[p] = _mm512_mul_ps(w8g_join(_mm256_set1_ps(z[r0]), _mm256_set1_ps(z[r1])), up);
            }
        __m512 xb[4];
        for (int b = 0; b < 4; b++) {
            const __m256 xv = _mm256_loadu_ps(x + k + 8 * b);
            xb[b] = w8g_join(xv, xv);
        }
        for (int p = 0; p < RP; p++) {
            const int8_t *w0 = w + 2 * p * K + k;
            const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w0)),
                                                 _mm256_loadu_si256((const __m256i *)(w0 + K)), 1);
            __m512 q[4]; /* byte b of each lane to its top byte, the rest zero: w8g_codes' values */
            for (int b = 0; b < 4; b++) q[b] = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, to_top[b]));
            if (HZ)
                for (int b = 0; b < 4; b++) q[b] = _mm512_sub_ps(q[b], zv[p]);
            for (int b = 0; b < 4; b++) q[b] = _mm512_mul_ps(q[b], sv[p]);
            acc[p][0] = _mm512_fmadd_ps(xb[0], q[0], acc[p][0]);
            acc[p][1] = _mm512_fmadd_ps(xb[2], q[2], acc[p][1]);
            acc[p][0] = _mm512_fmadd_ps(xb[1], q[1], acc[p][0]);
            acc[p][1] = _mm512_fmadd_ps(xb[3], q[3], acc[p][1]);
        }
        if (--left == 0) {
            g++;
            left = bpg;
        }
    }
    for (int p = 0; p < RP; p++) {
        const __m512 t = _mm512_add_ps(acc[p][0], acc[p][1]);
        uint16_t *yr = a->y + m0 * a->N + n0 + 2 * p;
        yr[0] = qcal_float_to_bf16(w8g_hsum8(_mm512_castps512_ps256(t)));
        yr[1] = qcal_float_to_bf16(w8g_hsum8(w8g_upper(t)));
    }
}
#endif

template <bool HZ> static void w8g_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const w8g_ctx *a = (const w8g_ctx *)c;
    const int64_t n0 = 4 * p;
    const int rb = a->N - n0 < 4 ? (int)(a->N - n0) : 4;
#ifdef __AVX512F__
    if (mb == 1) {
        if (rb >= 2) {
            if (rb == 2 || rb == 3) w8g_tile_pairs<1, HZ>(a, m0, n0);
            else w8g_tile_pairs<2, HZ>(a, m0, n0);
        }
        if (rb & 1) w8g_tile<1, 1, HZ>(a, m0, n0 + rb - 1);
        return;
    }
#endif
    if (mb == 1) {
        switch (rb) {
        case 1: w8g_tile<1, 1, HZ>(a, m0, n0); break;
        case 2: w8g_tile<2, 1, HZ>(a, m0, n0); break;
        case 3: w8g_tile<3, 1, HZ>(a, m0, n0); break;
        default: w8g_tile<4, 1, HZ>(a, m0, n0); break;
        }
    } else if (mb == 2) {
        for (int r = 0; r < rb; r += 2) {
            if (rb - r >= 2) w8g_tile<2, 2, HZ>(a, m0, n0 + r);
            else w8g_tile<1, 2, HZ>(a, m0, n0 + r);
        }
    } else {
        for (int r = 0; r < rb; r++) {
            if (mb == 3) w8g_tile<1, 3, HZ>(a, m0, n0 + r);
            else w8g_tile<1, 4, HZ>(a, m0, n0 + r);
        }
    }
}

/* y = x @ W^T for x (M, K) bf16, w (N, K) int8, s / z (N, K / gs) fp32 (z NULL: symmetric). Returns 0, -1
   (arguments), -2 (memory). */
static int w8g_mm(const uint16_t *x, const int8_t *w, const float *s, const float *z, uint16_t *y, int64_t M,
                  int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (!w8g_fits(N, K, gs) || M < 0) return -1;
    if (M == 0 || N == 0) return 0;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
    if (!xf) return -2;
    for (int64_t i = 0; i < M * K; i += 32) /* K % 32 == 0: each 32 columns in the codes' order */
        for (int b = 0; b < 4; b++)
            for (int l = 0; l < 8; l++) xf[i + 8 * b + l] = qcal_bf16_to_float(x[i + 4 * l + b]);
    const w8g_ctx ctx = {xf, w, s, z, y, N, K, gs};
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, z ? w8g_unit<true> : w8g_unit<false>);
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------ operator */

/* w (N, K) int8; sz (1 + has_zero, N, K / group_size) fp32: the scales, then the zero-points. Returns K. */
static int64_t w8g_weight_checked(const char *op, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                  int64_t group_size) {
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K), got ", w.sizes());
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK_VALUE(w8g_fits(N, K, group_size), op, ": unsupported shape N=", N, " K=", K, " group_size=",
                      group_size, " (group_size a positive multiple of 32 dividing K)");
    qcal::check_tensor(op, "w", w, at::kChar, {N, K});
    qcal::check_tensor(op, "sz", sz, at::kFloat, {has_zero ? 2 : 1, N, K / group_size});
    return K;
}

static at::Tensor w8a16_group_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                 int64_t group_size) {
    const char *op = "qcal::w8a16_group_mm";
    const int64_t K = w8g_weight_checked(op, w, sz, has_zero, group_size), N = w.size(0);
    at::Tensor xc = qcal::rows(op, x, K), y = qcal::matmul_out(xc, w);
    const float *s = qcal::in<float>(sz);
    qcal::check_rc(op, w8g_mm(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), s, has_zero ? s + N * (K / group_size)
                                                                                        : nullptr,
                              qcal::out<uint16_t>(y), xc.size(0), N, K, group_size, qcal::threads()));
    return y;
}

static qcal::Bound w8g_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), sz = a[1].toTensor();
    const bool has_zero = a[2].toBool();
    const int64_t gs = a[3].toInt(), K = w8g_weight_checked(op, w, sz, has_zero, gs), N = w.size(0);
    const int8_t *wp = qcal::in<int8_t>(w);
    const float *s = qcal::in<float>(sz), *z = has_zero ? s + N * (K / gs) : nullptr;
    return {K, N, {w, sz}, [=](const uint16_t *x, uint16_t *y) {
                return w8g_mm(x, wp, s, z, y, 1, N, K, gs, qcal::threads());
            }};
}

static const qcal::BindAs w8g_bound("w8a16_group_mm", w8g_bind);

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w8a16_group_mm(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("w8a16_group_mm", &w8a16_group_mm); }

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("w8a16_group_mm", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, bool, int64_t) {
        return qcal::matmul_meta(x, w);
    });
}

#endif
