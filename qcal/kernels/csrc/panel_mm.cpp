/* qcal: large-M (prefill) GEMMs on canonical int8 / int4 weights, AVX512-VNNI/BF16.

   The small-M kernels read a canonical (N, K) row-major weight in place and end every output with a
   horizontal sum: right when the weight streams from DRAM once per token, too slow when hundreds of
   input rows reuse it. Here each thread re-lays the rows it owns, one panel of up to 64 rows at a time,
   into a small scratch (16 rows interleaved per 64-byte line, the order vpdpbusd / vdpbf16ps consume)
   and runs every input row against the panel while it sits in L1/L2: the layout costs a pass over the
   weight per call (a few percent at M = 512), no second copy is kept, and every output lane is one
   output row (no horizontal sums).

   w8a8_panel: dynamic A8W8, the numbers of the small-M A8W8 kernel (exact int32 sums of the
     per-row int8 codes and the weight, (float)sum * xs[m] * ws[n], one rounding to bf16).
   w8a16_panel: int8 weight-only, y = ws[n] * sum_k x[m, k] w[n, k] in fp32 (bf16 products exact).
   w4a16_panel: int4 weight-only, w = bf16((u - 8 - zp[n, g]) * s[n, g]) (the one-pass dequantizer's
     values), y = sum_k x[m, k] w[n, k] in fp32: dequantize + bf16 GEMM without the dequantized weight. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "rowquant.h"
#include "tiles.h"
#include "a8w8.h"
#include "ops.h"
#include "panel_api.h"

#define AI static inline __attribute__((always_inline))
#define PANEL_BLOCKS 4 /* 16-row blocks per panel */

/* ------------------------------------------------------------------ shared driver */

typedef void (*pack_fn)(const void *ctx, int64_t blk, uint8_t *dst);            /* one 16-row block */
typedef void (*tile_fn)(const void *ctx, const uint8_t *panel, int64_t blk0, int rb, int64_t m0, int mb);

/* Blocks of 16 rows split evenly among the threads; each thread packs PANEL_BLOCKS blocks at a time and runs
   all input rows (in blocks of 4) against them. block_bytes: the packed size of one block. */
static int run_panels(int64_t M, int64_t blocks, int64_t block_bytes, int nthreads, const void *ctx, pack_fn pack,
                      tile_fn tile) {
    if (nthreads < 1) nthreads = 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = blocks * t / T, hi = blocks * (t + 1) / T;
        uint8_t *panel = (uint8_t *)aligned_alloc(64, (size_t)(PANEL_BLOCKS * block_bytes + 64) & ~(size_t)63);
        if (!panel) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t b0 = lo; b0 < hi; b0 += PANEL_BLOCKS) {
                const int rb = hi - b0 < PANEL_BLOCKS ? (int)(hi - b0) : PANEL_BLOCKS;
                for (int r = 0; r < rb; r++) pack(ctx, b0 + r, panel + r * block_bytes);
                for (int64_t m0 = 0; m0 < M; m0 += 4) tile(ctx, panel, b0, rb, m0, M - m0 < 4 ? (int)(M - m0) : 4);
            }
            free(panel);
        }
    }
    return failed ? -2 : 0;
}

/* Byte offsets of the 16 rows of a block in a row-major weight with `row_bytes` bytes a row. */
AI __m512i row_offsets(int64_t row_bytes) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32((int)row_bytes));
}

/* ------------------------------------------------------------------ A8W8 (vpdpbusd) */

/* Block layout: per column quad j, 64 bytes = the 16 rows' w[r, 4j .. 4j + 3]. */
static void a8_pack(const void *c, int64_t blk, uint8_t *dst) {
    const qcal_a8w8_args *a = (const qcal_a8w8_args *)c;
    const int64_t K = a->K;
    const int8_t *base = a->w + blk * 16 * K;
    const __m512i idx = row_offsets(K);
    for (int64_t j = 0; j < K / 4; j++) _mm512_store_si512(dst + 64 * j, _mm512_i32gather_epi32(idx, base + 4 * j, 1));
}

AI void a8_tile_rm(const qcal_a8w8_args *a, const uint8_t *panel, int64_t blk0, int64_t m0, int RB, int MM) {
    const int64_t K = a->K, bb = 16 * K;
    const uint8_t *xq = a->xq + m0 * K;
    __m512i acc[4][4];
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) acc[b][m] = _mm512_setzero_si512();
    for (int64_t j = 0; j < K / 4; j++) {
        __m512i wv[4];
        for (int b = 0; b < RB; b++) wv[b] = _mm512_load_si512(panel + b * bb + 64 * j);
        for (int m = 0; m < MM; m++) {
            int32_t q;
            memcpy(&q, xq + m * K + 4 * j, 4);
            const __m512i xb = _mm512_set1_epi32(q);
            for (int b = 0; b < RB; b++) acc[b][m] = _mm512_dpbusd_epi32(acc[b][m], xb, wv[b]);
        }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t n0 = (blk0 + b) * 16;
        const __m512i off = _mm512_slli_epi32(_mm512_loadu_si512(a->wsum + n0), 7); /* 128 * wsum */
        const __m512 wsv = _mm512_loadu_ps(a->ws + n0);
        for (int m = 0; m < MM; m++) {
            const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[b][m], off));
            const __m512 r = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_set1_ps(a->xs[m0 + m])), wsv);
            _mm256_storeu_si256((__m256i *)(a->y + (m0 + m) * a->N + n0), (__m256i)_mm512_cvtneps_pbh(r));
        }
    }
}

static void a8_tile(const void *c, const uint8_t *panel, int64_t blk0, int rb, int64_t m0, int mb) {
#define TA(RB, MM) a8_tile_rm((const qcal_a8w8_args *)c, panel, blk0, m0, RB, MM)
    QCAL_RB_X_MB(TA)
#undef TA
}

/* x (M, K) bf16; w (N, K) int8; wsum (N) int32 row sums; ws (N) fp32; y (M, N) bf16. N % 16 == 0, K % 4 == 0.
   Returns 0, -1 (arguments), -2 (memory). */
static int w8a8_panel(const uint16_t *x, const int8_t *w, const int32_t *wsum, const float *ws, uint16_t *y,
                      int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M < 0 || !panel_fits(N, K, 0)) return -1;
    uint8_t *xq;
    float *xs;
    if (qcal_a8w8_quantize(x, M, K, nthreads, &xq, &xs)) return -2;
    const qcal_a8w8_args ctx = {xq, w, wsum, ws, xs, y, N, K};
    const int rc = run_panels(M, N / 16, 16 * K, nthreads, &ctx, a8_pack, a8_tile);
    free(xq);
    free(xs);
    return rc;
}

/* ------------------------------------------------------------------ bf16 x (int8 | int4) weights (vdpbf16ps) */

typedef struct {
    const uint16_t *x;
    const void *w;        /* int8 (N, K), or int4 codes (N, K / 2), low nibble = even column */
    const float *s, *zp;  /* int8: ws (N); int4: s, zp (N, G), zp may be NULL */
    uint16_t *y;
    int64_t N, K, gs;
} bw_ctx;

/* Block layout: per column pair j, 64 bytes = the 16 rows' (w[r, 2j], w[r, 2j + 1]) as bf16. */
static void w8_pack(const void *c, int64_t blk, uint8_t *dst) {
    const bw_ctx *a = (const bw_ctx *)c;
    const int64_t K = a->K;
    const int8_t *base = (const int8_t *)a->w + blk * 16 * K;
    const __m512i idx = row_offsets(K);
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t q = 0; q < K / 4; q++) { /* 4 columns of 16 rows -> two pair lines */
        const __m512i g = _mm512_i32gather_epi32(idx, base + 4 * q, 1);
        __m512i f[4]; /* fp32 bits of the 4 signed bytes (exact in bf16: its upper half) */
        for (int i = 0; i < 4; i++)
            f[i] = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(g, 24 - 8 * i), 24)));
        for (int p = 0; p < 2; p++)
            _mm512_store_si512(dst + 64 * (2 * q + p), _mm512_or_si512(_mm512_srli_epi32(f[2 * p], 16),
                                                                        _mm512_and_si512(f[2 * p + 1], hi16)));
    }
}

AI __m512i round_pair(__m512 lo, __m512 hi) { /* two fp32 vectors -> bf16 pairs (lo in the low half), RNE */
    const __m512i a = _mm512_castps_si512(lo), b = _mm512_castps_si512(hi), one = _mm512_set1_epi32(1);
    const __m512i bias = _mm512_set1_epi32(0x7FFF);
    const __m512i ra = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(a, bias), _mm512_and_si512(_mm512_srli_epi32(a, 16), one)), 16);
    const __m512i rb = _mm512_add_epi32(_mm512_add_epi32(b, bias), _mm512_and_si512(_mm512_srli_epi32(b, 16), one));
    return _mm512_or_si512(ra, _mm512_and_si512(rb, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static void w4_pack(const void *c, int64_t blk, uint8_t *dst) {
    const bw_ctx *a = (const bw_ctx *)c;
    const int64_t K = a->K, G = K / a->gs, r0 = blk * 16;
    const uint8_t *base = (const uint8_t *)a->w + r0 * (K / 2);
    const __m512i idx = row_offsets(K / 2), gidx = row_offsets(G * 4), nib = _mm512_set1_epi32(15);
    for (int64_t g = 0; g < G; g++) {
        const __m512 sv = _mm512_i32gather_ps(gidx, a->s + r0 * G + g, 1);
        const __m512 ov = _mm512_add_ps(_mm512_set1_ps(8.0f), a->zp ? _mm512_i32gather_ps(gidx, a->zp + r0 * G + g, 1)
                                                                     : _mm512_setzero_ps());
        for (int64_t q = g * a->gs / 8; q < (g + 1) * a->gs / 8; q++) { /* 8 columns of 16 rows -> four pair lines */
            const __m512i v = _mm512_i32gather_epi32(idx, base + 4 * q, 1);
            for (int p = 0; p < 4; p++) {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * p), nib));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * p + 4), nib));
                _mm512_store_si512(dst + 64 * (4 * q + p), round_pair(_mm512_mul_ps(_mm512_sub_ps(lo, ov), sv),
                                                                      _mm512_mul_ps(_mm512_sub_ps(hi, ov), sv)));
            }
        }
    }
}

AI void bw_tile_rm(const bw_ctx *a, const uint8_t *panel, int64_t blk0, int64_t m0, int RB, int MM, int scaled) {
    const int64_t K = a->K, bb = 32 * K; /* bytes of a packed block: 16 rows x K bf16 */
    const uint16_t *x = a->x + m0 * K;
    __m512 acc[4][4];
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) acc[b][m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < K / 2; j++) {
        __m512bh wv[4];
        for (int b = 0; b < RB; b++) wv[b] = (__m512bh)_mm512_load_si512(panel + b * bb + 64 * j);
        for (int m = 0; m < MM; m++) {
            int32_t pair;
            memcpy(&pair, x + m * K + 2 * j, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int b = 0; b < RB; b++) acc[b][m] = _mm512_dpbf16_ps(acc[b][m], xb, wv[b]);
        }
    }
    for (int b = 0; b < RB; b++) {
        const int64_t n0 = (blk0 + b) * 16;
        const __m512 wsv = scaled ? _mm512_loadu_ps(a->s + n0) : _mm512_set1_ps(1.0f);
        for (int m = 0; m < MM; m++) {
            const __m512 r = scaled ? _mm512_mul_ps(acc[b][m], wsv) : acc[b][m];
            _mm256_storeu_si256((__m256i *)(a->y + (m0 + m) * a->N + n0), (__m256i)_mm512_cvtneps_pbh(r));
        }
    }
}

static void w8_tile(const void *c, const uint8_t *panel, int64_t blk0, int rb, int64_t m0, int mb) {
#define TW(RB, MM) bw_tile_rm((const bw_ctx *)c, panel, blk0, m0, RB, MM, 1)
    QCAL_RB_X_MB(TW)
#undef TW
}

static void w4_tile(const void *c, const uint8_t *panel, int64_t blk0, int rb, int64_t m0, int mb) {
#define TW(RB, MM) bw_tile_rm((const bw_ctx *)c, panel, blk0, m0, RB, MM, 0)
    QCAL_RB_X_MB(TW)
#undef TW
}

/* x (M, K) bf16; w (N, K) int8; ws (N) fp32; y (M, N) bf16. N % 16 == 0, K % 4 == 0. */
static int w8a16_panel(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N,
                     int64_t K, int nthreads) {
    if (M < 0 || !panel_fits(N, K, 0)) return -1;
    const bw_ctx ctx = {x, w, ws, NULL, y, N, K, K};
    return run_panels(M, N / 16, 32 * K, nthreads, &ctx, w8_pack, w8_tile);
}

/* x (M, K) bf16; u (N, K / 2) int4 codes; s, zp (N, K / gs) fp32 (zp may be NULL); y (M, N) bf16.
   N % 16 == 0, gs % 8 == 0, K % gs == 0. */
static int w4a16_panel(const uint16_t *x, const uint8_t *u, const float *s, const float *zp, uint16_t *y, int64_t M,
                     int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (M < 0 || !panel_fits(N, K, gs) || gs == 0) return -1;
    const bw_ctx ctx = {x, u, s, zp, y, N, K, gs};
    return run_panels(M, N / 16, 32 * K, nthreads, &ctx, w4_pack, w4_tile);
}

/* ------------------------------------------------------------------ operators */

static at::Tensor w8a8_mm_panel(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum,
                                const at::Tensor &ws) {
    const char *op = "qcal::w8a8_mm_panel";
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K), got ", w.sizes());
    at::Tensor xc = panel_checked(op, x, w, at::kChar, w.size(1), 0), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "wsum", wsum, at::kInt, {w.size(0)});
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
    qcal::check_rc(op, w8a8_panel(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<int32_t>(wsum),
                                  qcal::in<float>(ws), qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1),
                                  qcal::threads()));
    return y;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) { m.def("w8a8_mm_panel(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor"); }

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("w8a8_mm_panel", &w8a8_mm_panel); }
