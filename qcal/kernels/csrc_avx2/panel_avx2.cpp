/* qcal: large-M (prefill) matmuls for AVX2/FMA CPUs: the AVX2 build of csrc/panel_mm.cpp's weight-only operators
   (panel_fits, w8a16_mm_panel, w4a16_mm_panel: panel_api.h's schemas and checks, the same numbers) and, in this
   build only, w16a16_mm_panel (a bf16 weight, the same product), w8a16_group_mm_panel (int8 in groups: each weight
   the dequantizer's fp32 value (q - z) s) and wf8a16_mm_panel (float8 e4m3fn: the codes' exact values, ws applied
   to the sum as for int8), wfx_mm_panel (fp6 / fp5 / fp4 bit planes: each weight its value times its group's
   scale in fp32, looked up as in fpx_avx2.cpp) and the *_multi forms of the bf16, int8 and int4 operators (several
   weights on one input in one call).

   Without bf16 hardware PyTorch's bf16 GEMM is emulated, so these paths used to widen both operands to fp32 (an
   int4 / int8 weight dequantized to bf16 first) for MKL's fp32 GEMM: two or three passes over the weight per call,
   the threads split statically. Here, as in the AVX-512 panel kernels, a thread re-lays one block of 16 weight rows
   at a time into a scratch of K lines of 16 fp32 values -- the bf16 weight widened; int4: the one-pass
   dequantizer's value bf16((u - (8 + zp)) * s); int8: the code, its scale applied to the sum -- and runs input
   rows against it in tiles of 6 rows x 16 columns (12 accumulators). The activations are widened once per call.

   Numbers: each output is one fp32 chain over k in vdpbf16ps's order (of each pair of columns the odd one first,
   every step a fused multiply-add of an exact product, rounded to nearest even), then [* ws[n]] and one rounding to
   bf16 -- the AVX-512 panel kernels' results bit for bit, independent of the number of threads. Inputs below
   2^-126 are flushed to zero as vdpbf16ps reads them; a partial sum that cancels below 2^-126 is not flushed here
   (avx2.h).

   Work: units of (one block, a range of input rows), block-major, shared among the threads with stealing
   (parallel.h); a thread keeps its last packed block for its next unit of the same block, so a block is re-laid
   about once per thread that works on it. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <string>
#include <vector>

#include "avx2.h"
#include "fpx_avx2.h"
#include "fpx_checks.h"
#include "multi.h"
#include "ops.h"
#include "panel_api.h"
#include "parallel.h"

#define AI static inline __attribute__((always_inline))
#define PANEL_MR 6 /* input rows a tile (widen_unit stores 6 lanes a column) */

/* ------------------------------------------------------------------ re-laying 16 weight rows */

/* Transposes 8 rows of 8 fp32 values (r[i] = row i) into columns (r[c] = column c of the 8 rows). */
AI void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* One weight of a call and its output. A call's weights share its activations (widened once) and their blocks are one
   pool of units. */
typedef struct {
    const void *w;       /* bf16 (N, K), int8 / fp8 (N, K), int4 codes (N, K / 2) or bit planes (N, K bits / 8) */
    const float *s, *zp; /* int8, fp8: ws (N); int4, grouped int8, fp6-fp4: s, zp (N, K / gs), zp may be NULL */
    uint16_t *y;         /* (M, N) */
    int64_t N, first;    /* first: the call's index of the weight's first block */
} panel_part;

typedef struct {
    const float *xf; /* the activations widened (denormals flushed), tiles of PANEL_MR rows k-major */
    const panel_part *parts;
    int nparts;
    int64_t M, K, gs, chunks, rows; /* units: block * chunks + chunk (blocks of all parts), `rows` input rows a chunk */
    int kind;                       /* 0 bf16, 1 int8, 2 int4, 3 grouped int8, 4 fp8 e4m3fn, 5 fp6/fp5/fp4 */
    const float *lut;               /* fp6/fp5/fp4: the format's values (64 fp32) */
    int bits, sym;                  /* fp6/fp5/fp4: bits a code, the table sign-symmetric */
    uint64_t call;
    mutable std::atomic<int> failed;
} panel_ctx;

/* Rows h..h+7 of the block (r[i]: row h + i's values of columns k, k + step, ...) -> the panel's lines k + step c,
   lanes h..h+7, for the first n columns. */
AI void store_lines(__m256 r[8], float *dst, int64_t k, int step, int n, int h) {
    transpose8(r);
    for (int c = 0; c < n; c++) _mm256_store_ps(dst + (k + step * c) * 16 + h, r[c]);
}

/* The dequantizer's values of codes u: bf16((u - (8 + zp)) * s) (ov = 8 + zp), read as vdpbf16ps reads them. */
AI __m256 w4_values(__m256 u, __m256 ov, __m256 sv) {
    return qcal_daz8(qcal_round8_bf16(_mm256_mul_ps(_mm256_sub_ps(u, ov), sv)));
}

/* t[idx] for codes idx in 0..15 (t_lo: 0..7, t_hi: 8..15). */
AI __m256 lookup16(__m256 t_lo, __m256 t_hi, __m256i idx) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* r[i] = columns k .. k + n - 1 (n = 8, or 4 at the end: K % 4 == 0) of bf16 row i of x (row stride K) widened,
   denormals flushed, for i < rows; zeros for the rest of the 8. */
AI void load_rows8(__m256 r[8], const uint16_t *x, int64_t K, int64_t k, int n, int rows) {
    for (int i = 0; i < 8; i++)
        r[i] = i >= rows ? _mm256_setzero_ps()
                         : qcal_daz8(n == 8 ? qcal_load8_bf16(x + i * K + k) : qcal_load8_bf16_tail(x + i * K + k, n));
}

/* Rows r .. r + 7 of sub-byte float codes (kind 5) -> the panel's lanes h .. h + 7: each weight its group's scale
   times the code's value in fp32 (the dequantizer's value before its rounding to bf16), 16 columns at a time. */
template <int BITS, bool SYM>
static void pack_fpx_rows(const panel_ctx *a, const panel_part &pt, int64_t r, float *dst, int h) {
    const int64_t K = a->K, G = K / a->gs, row_bytes = K * BITS / 8;
    for (int64_t k = 0; k < K; k += 16) {
        __m256 lo[8], hi[8]; /* row i's even / odd columns k, k + 2, ... */
        for (int i = 0; i < 8; i++) {
            const uint8_t *row = (const uint8_t *)pt.w + (r + i) * row_bytes;
            __m256i ce, co;
            fpx_codes16<BITS>(row, row + K / 2, k, &ce, &co);
            const __m256 sv = _mm256_set1_ps(pt.s[(r + i) * G + k / a->gs]);
            lo[i] = _mm256_mul_ps(fpx_lookup<BITS, SYM>(a->lut, ce), sv);
            hi[i] = _mm256_mul_ps(fpx_lookup<BITS, SYM>(a->lut, co), sv);
        }
        store_lines(lo, dst, k, 2, 8, h);
        store_lines(hi, dst, k + 1, 2, 8, h);
    }
}

static void pack_fpx(const panel_ctx *a, const panel_part &pt, int64_t r, float *dst, int h) {
    switch (a->bits * 2 + a->sym) {
    case 12: pack_fpx_rows<6, false>(a, pt, r, dst, h); break;
    case 13: pack_fpx_rows<6, true>(a, pt, r, dst, h); break;
    case 10: pack_fpx_rows<5, false>(a, pt, r, dst, h); break;
    case 11: pack_fpx_rows<5, true>(a, pt, r, dst, h); break;
    case 8: pack_fpx_rows<4, false>(a, pt, r, dst, h); break;
    default: pack_fpx_rows<4, true>(a, pt, r, dst, h); break;
    }
}

/* Block blk of the part's weight (its rows 16 blk ..) -> dst. */
static void pack_block(const panel_ctx *a, const panel_part &pt, int64_t blk, float *dst) {
    const int64_t K = a->K, r0 = blk * 16;
    for (int h = 0; h < 16; h += 8) {
        if (a->kind == 0) {
            const uint16_t *w = (const uint16_t *)pt.w + (r0 + h) * K;
            for (int64_t k = 0; k < K; k += 8) {
                const int n = K - k < 8 ? (int)(K - k) : 8;
                __m256 r[8];
                load_rows8(r, w, K, k, n, 8);
                store_lines(r, dst, k, 1, n, h);
            }
        } else if (a->kind == 5) { /* fp6/fp5/fp4 bit planes: 16 columns at a time, each value v(code) s, as int4 */
            pack_fpx(a, pt, r0 + h, dst, h);
        } else if (a->kind != 2) { /* int8 (1, 3: grouped) and fp8 (4) bytes, 8 columns at a time */
            const int8_t *w = (const int8_t *)pt.w + (r0 + h) * K;
            const int64_t G = a->kind == 3 ? K / a->gs : 0;
            __m256 sv[8], zv[8]; /* grouped: row i's scale and zero-point in the current group */
            for (int64_t k = 0, g = 0; k < K; k += 8) {
                __m256 r[8];
                const int n = K - k < 8 ? (int)(K - k) : 8;
                if (a->kind == 3 && k == g * a->gs) {
                    for (int i = 0; i < 8; i++) {
                        const int64_t at = (r0 + h + i) * G + g;
                        sv[i] = _mm256_set1_ps(pt.s[at]);
                        zv[i] = _mm256_set1_ps(pt.zp ? pt.zp[at] : 0.0f);
                    }
                    g++;
                }
                for (int i = 0; i < 8; i++) {
                    __m128i q;
                    if (n == 8) {
                        q = _mm_loadl_epi64((const __m128i *)(w + i * K + k));
                    } else { /* K % 8 == 4: the last 4 columns */
                        int32_t t;
                        memcpy(&t, w + i * K + k, 4);
                        q = _mm_cvtsi32_si128(t);
                    }
                    if (a->kind == 4) {
                        r[i] = qcal_e4m3_to_ps8(_mm256_cvtepu8_epi32(q));
                    } else {
                        r[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                        if (a->kind == 3) /* (q - z) s, the dequantizer's fp32 value */
                            r[i] = _mm256_mul_ps(pt.zp ? _mm256_sub_ps(r[i], zv[i]) : r[i], sv[i]);
                    }
                }
                store_lines(r, dst, k, 1, n, h);
            }
        } else { /* int4: 16 columns at a time (8 where a group is not a multiple of 16), looked up per group */
            const uint8_t *u = (const uint8_t *)pt.w + (r0 + h) * (K / 2);
            const int64_t G = K / a->gs, step = a->gs % 16 ? 8 : 16;
            __m256 t_lo[8], t_hi[8]; /* row i's values of codes 0..7 and 8..15 in the current group */
            for (int64_t k = 0; k < K; k += step) {
                if (k % a->gs == 0)
                    for (int i = 0; i < 8; i++) {
                        const int64_t at = (r0 + h + i) * G + k / a->gs;
                        const __m256 sv = _mm256_set1_ps(pt.s[at]);
                        const __m256 ov = _mm256_set1_ps(8.0f + (pt.zp ? pt.zp[at] : 0.0f));
                        t_lo[i] = w4_values(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), ov, sv);
                        t_hi[i] = w4_values(_mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), ov, sv);
                    }
                __m256 lo[8], hi[8]; /* row i's even / odd columns k, k + 2, ... */
                for (int i = 0; i < 8; i++) {
                    const uint8_t *b = u + i * (K / 2) + k / 2;
                    __m128i q;
                    if (step == 16) {
                        q = _mm_loadl_epi64((const __m128i *)b);
                    } else {
                        int32_t t;
                        memcpy(&t, b, 4);
                        q = _mm_cvtsi32_si128(t);
                    }
                    const __m256i v = _mm256_cvtepu8_epi32(q);
                    lo[i] = lookup16(t_lo[i], t_hi[i], _mm256_and_si256(v, _mm256_set1_epi32(15)));
                    hi[i] = lookup16(t_lo[i], t_hi[i], _mm256_srli_epi32(v, 4));
                }
                store_lines(lo, dst, k, 2, (int)step / 2, h);
                store_lines(hi, dst, k + 1, 2, (int)step / 2, h);
            }
        }
    }
}

/* ------------------------------------------------------------------ the tile: MM input rows x 16 weight rows */

/* x: the tile's rows k-major (column k of row m at x[k PANEL_MR + m]). */
template <int MM>
AI void tile(const float *x, int64_t K, const float *panel, const float *ws, uint16_t *y, int64_t ldy) {
    __m256 acc[MM][2];
    for (int m = 0; m < MM; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        for (int e = 1; e >= 0; e--) { /* the odd column first, as vdpbf16ps */
            const __m256 w0 = _mm256_load_ps(panel + (k + e) * 16), w1 = _mm256_load_ps(panel + (k + e) * 16 + 8);
            for (int m = 0; m < MM; m++) {
                const __m256 xb = _mm256_broadcast_ss(x + (k + e) * PANEL_MR + m);
                acc[m][0] = _mm256_fmadd_ps(xb, w0, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(xb, w1, acc[m][1]);
            }
        }
    }
    if (ws) {
        const __m256 s0 = _mm256_loadu_ps(ws), s1 = _mm256_loadu_ps(ws + 8);
        for (int m = 0; m < MM; m++) {
            acc[m][0] = _mm256_mul_ps(acc[m][0], s0);
            acc[m][1] = _mm256_mul_ps(acc[m][1], s1);
        }
    }
    for (int m = 0; m < MM; m++) {
        qcal_store8_bf16(y + m * ldy, acc[m][0]);
        qcal_store8_bf16(y + m * ldy + 8, acc[m][1]);
    }
}

/* A thread's scratch: its last packed block (of call `call`), kept for its next unit. */
struct panel_scratch {
    float *p = nullptr;
    size_t cap = 0;
    uint64_t call = 0;
    int64_t blk = -1;
    ~panel_scratch() { free(p); }
};
static thread_local panel_scratch tl_panel;
static std::atomic<uint64_t> panel_calls{0};

static void panel_unit(const void *c, int64_t, int, int64_t p) {
    const panel_ctx *a = (const panel_ctx *)c;
    const int64_t blk = p / a->chunks, K = a->K;
    int part = 0;
    while (part + 1 < a->nparts && a->parts[part + 1].first <= blk) part++;
    const panel_part &pt = a->parts[part];
    const int64_t N = pt.N, b = blk - pt.first;
    panel_scratch &s = tl_panel;
    const size_t need = ((size_t)K * 16 * sizeof(float) + 63) & ~(size_t)63;
    if (s.cap < need) {
        free(s.p);
        s.p = (float *)aligned_alloc(64, need);
        s.cap = s.p ? need : 0;
        s.blk = -1;
        if (!s.p) {
            a->failed.store(1, std::memory_order_relaxed);
            return;
        }
    }
    if (s.call != a->call || s.blk != blk) {
        pack_block(a, pt, b, s.p);
        s.call = a->call;
        s.blk = blk;
    }
    const int64_t n0 = b * 16, m0 = (p % a->chunks) * a->rows;
    const int64_t m1 = m0 + a->rows < a->M ? m0 + a->rows : a->M;
    const float *ws = a->kind == 1 || a->kind == 4 ? pt.s + n0 : nullptr;
    for (int64_t m = m0; m < m1; m += PANEL_MR) {
        const float *x = a->xf + m * K;
        uint16_t *y = pt.y + m * N + n0;
        switch (m1 - m < PANEL_MR ? (int)(m1 - m) : PANEL_MR) {
        case 1: tile<1>(x, K, s.p, ws, y, N); break;
        case 2: tile<2>(x, K, s.p, ws, y, N); break;
        case 3: tile<3>(x, K, s.p, ws, y, N); break;
        case 4: tile<4>(x, K, s.p, ws, y, N); break;
        case 5: tile<5>(x, K, s.p, ws, y, N); break;
        default: tile<6>(x, K, s.p, ws, y, N); break;
        }
    }
}

/* ------------------------------------------------------------------ driver */

typedef struct {
    const uint16_t *x;
    float *xf;
    int64_t M, K;
} widen_ctx;

/* Tile p's rows (PANEL_MR; past M, zeros) widened with denormals flushed, k-major: 8 columns of the rows at a time,
   transposed (two rows of zeros) and stored 8 lanes a column, each store's last two overwritten by the next column's
   (the tile's last column: its 6 lanes alone, the next tile being another thread's). */
static_assert(PANEL_MR == 6, "widen_unit transposes 8 rows, PANEL_MR of them the tile's");
static void widen_unit(const void *c, int64_t, int, int64_t p) {
    const widen_ctx *a = (const widen_ctx *)c;
    const int64_t K = a->K, m0 = p * PANEL_MR;
    float *xt = a->xf + m0 * K;
    const int rows = a->M - m0 < PANEL_MR ? (int)(a->M - m0) : PANEL_MR;
    for (int64_t k = 0; k < K; k += 8) {
        const int n = K - k < 8 ? (int)(K - k) : 8;
        __m256 r[8];
        load_rows8(r, a->x + m0 * K, K, k, n, rows);
        transpose8(r);
        const int full = k + n == K ? n - 1 : n;
        for (int i = 0; i < full; i++) _mm256_storeu_ps(xt + (k + i) * PANEL_MR, r[i]);
        if (full < n) {
            float *last = xt + (K - 1) * PANEL_MR;
            _mm_storeu_ps(last, _mm256_castps256_ps128(r[n - 1]));
            _mm_storel_pi((__m64 *)(last + 4), _mm256_extractf128_ps(r[n - 1], 1));
        }
    }
}

/* parts[0 .. nparts - 1] of one call (their `first` set here) on the M x K input x. */
static int run_panel(int kind, const uint16_t *x, panel_part *parts, int nparts, int64_t M, int64_t K, int64_t gs,
                     int nthreads, const float *lut = nullptr, int bits = 0, int sym = 0) {
    if (M < 0 || nparts < 1 || (kind == 2 || kind == 3 || kind == 5) != (gs > 0)) return -1;
    if (kind == 5 && (K % 32 || gs % 32 || !lut || bits < 4 || bits > 6)) return -1;
    int64_t blocks = 0;
    for (int i = 0; i < nparts; i++) {
        if (!panel_fits(parts[i].N, K, gs)) return -1;
        parts[i].first = blocks;
        blocks += parts[i].N / 16;
    }
    if (M == 0) return 0;
    const int64_t T = nthreads < 1 ? 1 : nthreads, tiles = (M + PANEL_MR - 1) / PANEL_MR;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(tiles * PANEL_MR) * (size_t)K);
    if (!xf) return -2;
    const widen_ctx wc = {x, xf, M, K};
    qcal_run_units(1, tiles, nthreads, &wc, widen_unit);
    /* Input rows split into chunks so that there are at least ~8 units a thread (stealing evens out the end). */
    int64_t chunks = (8 * T + blocks - 1) / blocks;
    if (chunks > tiles) chunks = tiles;
    const int64_t rows = (tiles + chunks - 1) / chunks * PANEL_MR;
    const panel_ctx ctx{xf, parts, nparts, M, K, gs, (M + rows - 1) / rows, rows, kind, lut, bits, sym,
                        panel_calls.fetch_add(1, std::memory_order_relaxed) + 1, {0}};
    qcal_run_units(1, blocks * ctx.chunks, nthreads, &ctx, panel_unit);
    free(xf);
    return ctx.failed.load(std::memory_order_relaxed) ? -2 : 0;
}

/* One weight (N, K): y = its product with x. */
static int run_panel1(int kind, const uint16_t *x, const void *w, const float *s, const float *zp, uint16_t *y,
                      int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads, const float *lut = nullptr,
                      int bits = 0, int sym = 0) {
    panel_part part{w, s, zp, y, N, 0};
    return run_panel(kind, x, &part, 1, M, K, gs, nthreads, lut, bits, sym);
}

static int w8a16_panel(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int nthreads) {
    return run_panel1(1, x, w, ws, nullptr, y, M, N, K, 0, nthreads);
}

static int w4a16_panel(const uint16_t *x, const uint8_t *u, const float *s, const float *zp, uint16_t *y, int64_t M,
                       int64_t N, int64_t K, int64_t gs, int nthreads) {
    return run_panel1(2, x, u, s, zp, y, M, N, K, gs, nthreads);
}

/* ------------------------------------------------------------------ the bf16-weight operator */

static at::Tensor w16a16_mm_panel(const at::Tensor &x, const at::Tensor &w) {
    const char *op = "qcal::w16a16_mm_panel";
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K), got ", w.sizes());
    at::Tensor xc = panel_checked(op, x, w, at::kBFloat16, w.size(1), 0), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, run_panel1(0, qcal::in<uint16_t>(xc), qcal::in<uint16_t>(w), nullptr, nullptr,
                                 qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), 0, qcal::threads()));
    return y;
}

/* ------------------------------------------------------------------ grouped int8 and fp8 weights (this build only) */

/* x (M, K) bf16; w (N, K) int8; sz (1 + has_zero, N, K / group_size) fp32: the scales, then the zero-points (the
   grouped small-M kernel's arguments, csrc/int8_group.h). y = sum_k x[m, k] (w[n, k] - z[n, g]) s[n, g], each weight
   the dequantizer's fp32 value before its rounding to bf16. */
static at::Tensor w8a16_group_mm_panel(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                       int64_t group_size) {
    const char *op = "qcal::w8a16_group_mm_panel";
    TORCH_CHECK_VALUE(w.dim() == 2 && group_size > 0, op, ": w must be (N, K) and group_size > 0, got ", w.sizes(),
                      ", ", group_size);
    const int64_t N = w.size(0), K = w.size(1);
    at::Tensor xc = panel_checked(op, x, w, at::kChar, K, group_size), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "sz", sz, at::kFloat, {has_zero ? 2 : 1, N, K / group_size});
    const float *s = qcal::in<float>(sz);
    qcal::check_rc(op, run_panel1(3, qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), s,
                                 has_zero ? s + N * (K / group_size) : nullptr, qcal::out<uint16_t>(y), xc.size(0), N,
                                 K, group_size, qcal::threads()));
    return y;
}

/* x (M, K) bf16; w (N, K) float8 e4m3fn; ws (N) fp32: y = ws[n] * sum_k x[m, k] v(w[n, k]). */
static at::Tensor wf8a16_mm_panel(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    const char *op = "qcal::wf8a16_mm_panel";
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K), got ", w.sizes());
    at::Tensor xc = panel_checked(op, x, w, at::kFloat8_e4m3fn, w.size(1), 0), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
    qcal::check_rc(op, run_panel1(4, qcal::in<uint16_t>(xc), w.const_data_ptr(), qcal::in<float>(ws), nullptr,
                                 qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), 0, qcal::threads()));
    return y;
}

/* x (M, K) bf16; w (N, K * bits / 8) uint8 bit planes; ws (N, G) fp32; lut (2^bits) bf16 (wfx_mm_small's
   arguments): y = sum_k x[m, k] v(code[n, k]) ws[n, g], each weight its fp32 value before the bf16 rounding. */
static at::Tensor wfx_mm_panel(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws, const at::Tensor &lut,
                               int64_t bits) {
    const char *op = "qcal::wfx_mm_panel";
    int64_t K, G;
    uint16_t lut16[64];
    fpx_checked(op, w, ws, lut, bits, &K, &G, lut16);
    const int64_t N = w.size(0), gs = K / G;
    at::Tensor xc = panel_checked(op, x, w, at::kByte, K, gs), y = qcal::matmul_out(xc, w);
    float lutf[64];
    const int sym = fpx_table(lut16, (int)bits, lutf) ? 1 : 0;
    qcal::check_rc(op, run_panel1(5, qcal::in<uint16_t>(xc), qcal::in<uint8_t>(w), qcal::in<float>(ws), nullptr,
                                 qcal::out<uint16_t>(y), xc.size(0), N, K, gs, qcal::threads(), lutf, (int)bits, sym));
    return y;
}

/* ------------------------------------------------------------------ several weights on one input (this build only) */

/* w16a16_mm_panel_multi, w8a16_mm_panel_multi, w4a16_mm_panel_multi: the one-weight operators' products for a
   list of weights that share the input (q / k / v, gate / up), each output what the one-weight operator returns for
   its weight, bit for bit, in one call: the input widened once and the weights' blocks one pool of units for the
   threads (a 192-row weight alone is 12 blocks for 2 threads). */

/* Weight i of a list, checked as the one-weight operator checks its weight (panel_checked), its errors under
   "<op> (weight i)": (N, cols) of `dtype`, N and K a shape the panels take. */
static std::string part_checked(const char *op, size_t i, const at::Tensor &xc, const at::Tensor &w,
                                at::ScalarType dtype, int64_t cols, int64_t K, int64_t gs) {
    std::string opi = qcal::weight_op(op, i);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == cols, opi, ": w must be (N, ", cols, "), got ", w.sizes());
    panel_checked(opi.c_str(), xc, w, dtype, K, gs);
    return opi;
}

/* Runs parts (their w, s, zp set) of the weights w on xc into fresh outputs. */
static std::vector<at::Tensor> run_parts(const char *op, int kind, const at::Tensor &xc, at::TensorList w,
                                         std::vector<panel_part> &parts, int64_t K, int64_t gs) {
    uint16_t *y[QCAL_MAX_WEIGHTS];
    std::vector<at::Tensor> ys = qcal::multi_outputs(xc, w, y);
    for (size_t i = 0; i < parts.size(); i++) parts[i].y = y[i];
    qcal::check_rc(op, run_panel(kind, qcal::in<uint16_t>(xc), parts.data(), (int)parts.size(), xc.size(0), K, gs,
                                 qcal::threads()));
    return ys;
}

/* The input's columns (K) from weight 0: (N, K) for bf16 and int8, (N, K / 2) codes for int4. */
static int64_t list_k(const char *op, const at::Tensor &w0, int64_t per_col) {
    TORCH_CHECK_VALUE(w0.dim() == 2, op, ": weight 0 must be 2-D, got ", w0.sizes());
    return per_col * w0.size(1);
}

static std::vector<at::Tensor> w16a16_mm_panel_multi(const at::Tensor &x, at::TensorList w) {
    const char *op = "qcal::w16a16_mm_panel_multi";
    qcal::multi_checked(op, w.size(), w.size(), "w");
    const int64_t K = list_k(op, w[0], 1);
    const at::Tensor xc = qcal::rows(op, x, K);
    std::vector<panel_part> parts;
    for (size_t i = 0; i < w.size(); i++) {
        part_checked(op, i, xc, w[i], at::kBFloat16, K, K, 0);
        parts.push_back({w[i].const_data_ptr(), nullptr, nullptr, nullptr, w[i].size(0), 0});
    }
    return run_parts(op, 0, xc, w, parts, K, 0);
}

static std::vector<at::Tensor> w8a16_mm_panel_multi(const at::Tensor &x, at::TensorList w, at::TensorList ws) {
    const char *op = "qcal::w8a16_mm_panel_multi";
    qcal::multi_checked(op, w.size(), ws.size(), "ws");
    const int64_t K = list_k(op, w[0], 1);
    const at::Tensor xc = qcal::rows(op, x, K);
    std::vector<panel_part> parts;
    for (size_t i = 0; i < w.size(); i++) {
        const std::string opi = part_checked(op, i, xc, w[i], at::kChar, K, K, 0);
        qcal::check_tensor(opi.c_str(), "ws", ws[i], at::kFloat, {w[i].size(0)});
        parts.push_back({w[i].const_data_ptr(), qcal::in<float>(ws[i]), nullptr, nullptr, w[i].size(0), 0});
    }
    return run_parts(op, 1, xc, w, parts, K, 0);
}

static std::vector<at::Tensor> w4a16_mm_panel_multi(const at::Tensor &x, at::TensorList qweight, at::TensorList scale,
                                                    const c10::List<std::optional<at::Tensor>> &zero_point,
                                                    int64_t group_size) {
    const char *op = "qcal::w4a16_mm_panel_multi";
    qcal::multi_checked(op, qweight.size(), scale.size(), "scale");
    qcal::multi_checked(op, qweight.size(), zero_point.size(), "zero_point");
    TORCH_CHECK_VALUE(group_size > 0, op, ": group_size must be > 0, got ", group_size);
    const int64_t K = list_k(op, qweight[0], 2);
    const at::Tensor xc = qcal::rows(op, x, K);
    std::vector<panel_part> parts;
    std::vector<at::Tensor> zps; /* the optional entries held while the kernel reads them */
    for (size_t i = 0; i < qweight.size(); i++) {
        const std::string opi = part_checked(op, i, xc, qweight[i], at::kByte, K / 2, K, group_size);
        const int64_t N = qweight[i].size(0);
        qcal::check_tensor(opi.c_str(), "scale", scale[i], at::kFloat, {N, K / group_size});
        const std::optional<at::Tensor> z = zero_point.get(i);
        zps.push_back(z.has_value() ? *z : at::Tensor());
        if (zps.back().defined())
            qcal::check_tensor(opi.c_str(), "zero_point", zps.back(), at::kFloat, {N, K / group_size});
        parts.push_back({qweight[i].const_data_ptr(), qcal::in<float>(scale[i]), qcal::in_opt<float>(zps.back()),
                         nullptr, N, 0});
    }
    return run_parts(op, 2, xc, qweight, parts, K, group_size);
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("wfx_mm_panel(Tensor x, Tensor w, Tensor ws, Tensor lut, int bits) -> Tensor");
    m.def("w16a16_mm_panel(Tensor x, Tensor w) -> Tensor");
    m.def("w8a16_group_mm_panel(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor");
    m.def("wf8a16_mm_panel(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("w16a16_mm_panel_multi(Tensor x, Tensor[] w) -> Tensor[]");
    m.def("w8a16_mm_panel_multi(Tensor x, Tensor[] w, Tensor[] ws) -> Tensor[]");
    m.def("w4a16_mm_panel_multi(Tensor x, Tensor[] qweight, Tensor[] scale, Tensor?[] zero_point, int group_size) "
          "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w16a16_mm_panel", &w16a16_mm_panel);
    m.impl("w8a16_group_mm_panel", &w8a16_group_mm_panel);
    m.impl("wf8a16_mm_panel", &wf8a16_mm_panel);
    m.impl("wfx_mm_panel", &wfx_mm_panel);
    m.impl("w16a16_mm_panel_multi", &w16a16_mm_panel_multi);
    m.impl("w8a16_mm_panel_multi", &w8a16_mm_panel_multi);
    m.impl("w4a16_mm_panel_multi", &w4a16_mm_panel_multi);
}
