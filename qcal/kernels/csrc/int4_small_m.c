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
   Scales and offsets: bf16 bit patterns, (N/16, G, 2, 16): per block and group, 16 scales then 16 offsets.
   Products and sums are fp32 (integer inputs, e.g. 8da4w's int8 codes, stay exact). */

#include <float.h>
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))
#define MAX_GROUPS 1024

AI __m512bh nibbles(__m512i v, int q) {
    __m512i sh = q ? _mm512_srli_epi16(v, 4 * q) : v;
    return (__m512bh)_mm512_ternarylogic_epi32(sh, _mm512_set1_epi16(0x000f), _mm512_set1_epi16(0x4300), 0xEA);
}

AI __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* RB blocks of 16 rows (1 or 2) x MM input rows (1..4); two accumulator chains per pair hide latency. */
AI void tile(const uint16_t *x, int64_t K, const uint8_t *w, int64_t bstride, const uint16_t *sz, int HZ,
             const float *X, int64_t G, int64_t gs, uint16_t *y, int64_t ldy, const float *rs, int RB, int MM) {
    __m512 acc[2][4], t0[2][4], t1[2][4];
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) acc[b][m] = _mm512_setzero_ps();
    const int64_t opg = gs / 8;
    for (int64_t g = 0; g < G; g++) {
        for (int b = 0; b < RB; b++)
            for (int m = 0; m < MM; m++) t0[b][m] = t1[b][m] = _mm512_setzero_ps();
        for (int64_t o = g * opg; o < (g + 1) * opg; o++) {
            __m512i v[2];
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
            const uint16_t *p = sz + (b * G + g) * 32;
            __m512 sv = load_bf16x16(p);
            for (int m = 0; m < MM; m++) {
                __m512 d = _mm512_sub_ps(_mm512_add_ps(t0[b][m], t1[b][m]), _mm512_set1_ps(136.f * X[m * G + g]));
                acc[b][m] = _mm512_fmadd_ps(d, sv, acc[b][m]);
            }
            if (HZ) {
                __m512 zv = load_bf16x16(p + 16);
                for (int m = 0; m < MM; m++) acc[b][m] = _mm512_fnmadd_ps(zv, _mm512_set1_ps(X[m * G + g]), acc[b][m]);
            }
        }
    }
    for (int b = 0; b < RB; b++)
        for (int m = 0; m < MM; m++) {
            __m512 r = rs ? _mm512_mul_ps(acc[b][m], _mm512_set1_ps(rs[m])) : acc[b][m];
            _mm256_storeu_si256((__m256i *)(y + m * ldy + 16 * b), (__m256i)_mm512_cvtneps_pbh(r));
        }
}

#define TILE(RB, MM)                                                                                          \
    (has_zero ? tile(xm, K, wp, bstride, szp, 1, X, G, gs, yp, N, rsm, RB, MM)                                \
              : tile(xm, K, wp, bstride, szp, 0, X, G, gs, yp, N, rsm, RB, MM))

static float bf16_to_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static uint16_t float_to_bf16(float f) { /* exact for the integer codes it is used on */
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)(b >> 16);
}

/* Next-call prefetch. In a decode step the int4 layers run in the same order every token, each
   streaming its weight from DRAM, and every call starts cold. The library remembers which weight was
   called after which (a small table keyed by weight address, learned as calls arrive) and, while a call
   computes, each thread prefetches into its L2 the part of the next call's weight it will compute
   itself (same static split of the work), up to PF_MAX bytes. The hints never fault: a stale entry
   (a freed model) costs wasted reads, nothing else. */
#define PF_SLOTS 1024
#define PF_MAX (192 * 1024)
typedef struct {
    const uint8_t *key; /* the weight this entry follows */
    const uint8_t *w;
    const uint16_t *sz;
    int64_t units, unit_bytes, sz_unit_bytes;
} next_call;
static next_call pf_table[PF_SLOTS];
static const uint8_t *pf_last;
static int pf_enabled = 1;

void qcal_set_prefetch(int on) { pf_enabled = on; }

static size_t pf_slot(const void *p) { return ((uintptr_t)p >> 6) * 2654435761u % PF_SLOTS; }

/* Thread t's share of n units among T threads (the split every call uses). */
AI void share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

static void prefetch_range(const uint8_t *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + o), _MM_HINT_T1);
}

static int mm(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int has_zero, uint16_t *y, int64_t M,
              int64_t N, int64_t K, int64_t gs, int nthreads, const float *rowscale) {
    const int64_t G = K / gs, bstride = 16 * K / 2, blocks = N / 16;
    const int64_t units = (blocks + 1) / 2; /* pairs of blocks; the last one may be single */
    next_call next = {0};
    if (pf_enabled) {
        if (pf_last && pf_last != w) {
            next_call *e = &pf_table[pf_slot(pf_last)];
            e->w = w;
            e->sz = sz;
            e->units = units;
            e->unit_bytes = 2 * bstride;
            e->sz_unit_bytes = 2 * G * 32 * 2;
            e->key = pf_last;
        }
        pf_last = w;
        next = pf_table[pf_slot(w)];
        if (next.key != w) next.w = NULL;
    }
    if (nthreads < 1) nthreads = 1;
    float X[4 * MAX_GROUPS];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mb = M - m0 < 4 ? (int)(M - m0) : 4;
        const uint16_t *xm = x + m0 * K;
        const float *rsm = rowscale ? rowscale + m0 : NULL;
        for (int m = 0; m < mb; m++)
            for (int64_t g = 0; g < G; g++) {
                float a = 0.f;
                for (int64_t k = g * gs; k < (g + 1) * gs; k++) a += bf16_to_float(xm[m * K + k]);
                X[m * G + g] = a;
            }
        const int last_rows = m0 + 4 >= M;
        #pragma omp parallel num_threads(nthreads)
        {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t lo, hi, nlo = 0, nhi = 0, pf_per_unit = 0, pf_done = 0;
        share(units, t, T, &lo, &hi);
        const uint8_t *pf_base = NULL;
        if (next.w && last_rows && hi > lo) { /* my part of the next call's weight, spread over my units */
            share(next.units, t, T, &nlo, &nhi);
            int64_t bytes = (nhi - nlo) * next.unit_bytes;
            if (bytes > PF_MAX) bytes = PF_MAX;
            pf_base = next.w + nlo * next.unit_bytes;
            pf_per_unit = (bytes / (hi - lo) + 63) & ~(int64_t)63;
            pf_done = bytes;
            prefetch_range((const uint8_t *)(next.sz + nlo * next.sz_unit_bytes / 2),
                           (nhi - nlo) * next.sz_unit_bytes < 16384 ? (nhi - nlo) * next.sz_unit_bytes : 16384);
        }
        for (int64_t p = lo; p < hi; p++) {
            if (pf_base) {
                const int64_t off = (p - lo) * pf_per_unit;
                if (off < pf_done) prefetch_range(pf_base + off, off + pf_per_unit > pf_done ? pf_done - off : pf_per_unit);
            }
            const int64_t blk = 2 * p;
            const uint8_t *wp = w + blk * bstride;
            const uint16_t *szp = sz + blk * G * 32;
            uint16_t *yp = y + m0 * N + blk * 16;
            if (blk + 1 < blocks) {
                switch (mb) {
                case 1: TILE(2, 1); break;
                case 2: TILE(2, 2); break;
                case 3: TILE(2, 3); break;
                default: TILE(2, 4); break;
                }
            } else {
                switch (mb) {
                case 1: TILE(1, 1); break;
                case 2: TILE(1, 2); break;
                case 3: TILE(1, 3); break;
                default: TILE(1, 4); break;
                }
            }
        }
        }
    }
    return 0;
}

static int bad_args(int64_t M, int64_t N, int64_t K, int64_t gs) {
    return N % 16 || K % 8 || gs <= 0 || gs % 8 || K % gs || K / gs > MAX_GROUPS || M < 0;
}

/* y = x @ W^T. Returns 0, or -1 for unsupported arguments (nothing written). */
int qcal_int4_mm_small(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int has_zero, uint16_t *y,
                       int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (bad_args(M, N, K, gs)) return -1;
    return mm(x, w, sz, has_zero, y, M, N, K, gs, nthreads, NULL);
}

/* 8da4w: each row of x quantized to symmetric int8 (scale = FLT_MIN + amax / 127 in fp32, codes rounded
   half to even, as qcal.kernels.common.quantize_per_token), the exact integer product computed as above,
   and rescaled by the row's scale before the one rounding to bf16. Returns 0, -1 (arguments), -2 (memory). */
int qcal_int4_mm_small_q8(const uint16_t *x, const uint8_t *w, const uint16_t *sz, int has_zero, uint16_t *y,
                          int64_t M, int64_t N, int64_t K, int64_t gs, int nthreads) {
    if (bad_args(M, N, K, gs)) return -1;
    uint16_t *codes = malloc((size_t)(M * K) * sizeof(uint16_t) + 64);
    float *scale = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!codes || !scale) {
        free(codes);
        free(scale);
        return -2;
    }
    for (int64_t m = 0; m < M; m++) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(bf16_to_float(x[m * K + k])));
        const float s = FLT_MIN + amax / 127.f;
        scale[m] = s;
        for (int64_t k = 0; k < K; k++) codes[m * K + k] = float_to_bf16(nearbyintf(bf16_to_float(x[m * K + k]) / s));
    }
    int rc = mm(codes, w, sz, has_zero, y, M, N, K, gs, nthreads, scale);
    free(codes);
    free(scale);
    return rc;
}
