// Attention over a bf16 KV cache, AVX2/FMA: the AVX-512 decode_attention.cpp (decode_attention,
// decode_step_attention) and prefill_attention.cpp (prefill_attention) of qcal/runtime/csrc for CPUs without
// AVX-512, with the same schemas, checks, work split and results.
//
// decode_attention: one query over the cache. The G = hq / hkv query heads that share a KV head are processed
// together; work items are (KV head, slice of positions), each keeping an online softmax (running max, sum, fp32
// accumulator) over blocks of 128 positions; the slices are merged at the end. Masked positions (mask[j] == 0)
// contribute exactly nothing; a query that sees no position gets zeros. Accumulation is fp32, the output is rounded
// once to bf16.
//
// prefill_attention: causal attention of n query positions, flash style. Query i sits at position start + i and sees
// keys 0 .. start + i. Work items of 4 query rows x one KV head's G query heads walk the visible keys in blocks of
// 64: fp32 scores, online softmax (fp32), probabilities rounded to bf16 for the P V product (fp32 accumulators), one
// rounding of the output. Query rows and outputs are token-major. The item's rows of all G heads run together in
// tiles of 6 rows x 16 keys (scores) or 16 dimensions (P V): 12 independent accumulator chains, as the panels' tiles.
//
// Bit for bit the AVX-512 kernels' results, computed in the same order:
// - decode: each 16-lane accumulator of the AVX-512 kernel is two 8-lane ones here, holding the head dimensions
//   {0-3, 8-11} and {4-7, 12-15} of every 16 (the order in which vpunpck{l,h}wd widens bf16); a score is reduced
//   across lanes by the same tree of adds as there (sum16's transposing tree for positions in whole groups of 16 of a
//   block, _mm512_reduce_add_ps's for the rest), and the softmax sums and the slice merge (a fused multiply-add, as
//   the compiler contracts it there) likewise.
// - prefill: vdpbf16ps is two fp32 multiply-adds a pair of dimensions, the odd one first, each rounded once (as Intel's
//   SDM defines it; the bf16 products are exact in fp32), done here with FMAs on keys and values widened to fp32 once
//   a call (twice the AVX-512 kernel's packed bytes); the running sum's update is the fused multiply-add the compiler
//   makes of it there. The AVX-512 kernel's work items (4 query rows, blocks of 64 keys) are kept: they decide which
//   blocks a row walks.
// The work split over threads is the AVX-512 kernels' too: decode's slices of positions, and so its results, depend
// on the thread count as there.
// What differs, only around 2^-126: vcvtneps2bf16 flushes denormal values to zero where avx2.h rounds them as PyTorch
// does, and vdpbf16ps treats denormal inputs and products as zero where FMAs keep them.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <initializer_list>

#include "avx2.h"
#include "ops.h"
#include "parallel.h"
#include "rope_avx2.h"

#define QCAL_ATTN_MAX_G 16
#define QCAL_ATTN_MAX_D 256
#define QCAL_ATTN_BLOCK 128

// A per-thread scratch buffer reused across calls (grown when too small): no allocation on a decode step once warm.
// Requests over QCAL_SCRATCH_KEEP bytes are allocated and freed per call instead of being kept.
#define QCAL_SCRATCH_KEEP ((size_t)64 << 20)

namespace {
struct Scratch {
    void *kept = nullptr, *once = nullptr;
    size_t cap = 0;
    ~Scratch() {
        free(kept);
        free(once);
    }
};
thread_local Scratch scratch_slot;

// 64-byte aligned scratch of `bytes` for the current call, or NULL when out of memory; release() after the call.
void *scratch_get(size_t bytes) {
    Scratch &s = scratch_slot;
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes == 0) bytes = 64;
    if (bytes > QCAL_SCRATCH_KEEP) return s.once = aligned_alloc(64, bytes);
    if (bytes > s.cap) {
        void *p = aligned_alloc(64, bytes);
        if (!p) return nullptr;
        free(s.kept);
        s.kept = p;
        s.cap = bytes;
    }
    return s.kept;
}

void scratch_release() {
    free(scratch_slot.once);
    scratch_slot.once = nullptr;
}
}  // namespace

// ------------------------------------------------------------------ decode

// 16 bf16 values as fp32, lo: elements 0-3 and 8-11, hi: elements 4-7 and 12-15 (the lanes of vpunpck{l,h}wd).
static inline void widen16(const uint16_t *p, __m256 &lo, __m256 &hi) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
}

// Round lo / hi (widen16's layout) to bf16 and store the 16 values in order.
static inline void store16_bf16(uint16_t *p, __m256 lo, __m256 hi) {
    const __m256i a = _mm256_srli_epi32(qcal_bf16_bits8(lo), 16), b = _mm256_srli_epi32(qcal_bf16_bits8(hi), 16);
    _mm256_storeu_si256((__m256i *)p, _mm256_packus_epi32(a, b));
}

// The per-128-bit-lane totals of 8 vectors (v[k]'s lane total at element k % 4 of y[k / 4]), each total
// (e0 + e2) + (e1 + e3): the first two levels of the AVX-512 sum16 tree.
static inline void lane_totals(const __m256 *v, __m256 *y) {
    __m256 x[4];
    for (int k = 0; k < 4; k++)
        x[k] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm256_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 2; k++) {
        const __m256d a = _mm256_castps_pd(x[2 * k]), b = _mm256_castps_pd(x[2 * k + 1]);
        y[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
}

// The sums of 8 positions' 16-lane products (lo / hi in widen16's layout), as sum16 adds them: the total of each
// group of 4 AVX-512 lanes {0-3}, {4-7}, {8-11}, {12-15} (S0..S3) as (e0 + e2) + (e1 + e3), then (S0 + S1) + (S2 + S3).
static inline __m256 sum8(const __m256 *lo, const __m256 *hi) {
    __m256 yl[2], yh[2];
    lane_totals(lo, yl); /* S0 | S2 */
    lane_totals(hi, yh); /* S1 | S3 */
    const __m256 z0 = _mm256_add_ps(yl[0], yh[0]), z1 = _mm256_add_ps(yl[1], yh[1]);
    return _mm256_add_ps(_mm256_permute2f128_ps(z0, z1, 0x20), _mm256_permute2f128_ps(z0, z1, 0x31));
}

// One position's sum as _mm512_reduce_add_ps adds the 16 lanes: t[i] = e[i] + e[i + 8], u[i] = t[i] + t[i + 4],
// then (u0 + u2) + (u1 + u3).
static inline float sum1(__m256 lo, __m256 hi) {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
    __m128 s = _mm_add_ps(a, b);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// A key row's 16-lane products with the scaled query qv (2T vectors in widen16's layout), lane by lane as the AVX-512
// kernel: the first group multiplied, the others fused-multiply-added in order.
template <int TT>
static inline __attribute__((always_inline)) void dot_row(const __m256 *qv, const uint16_t *row, int64_t T,
                                                          __m256 &lo, __m256 &hi) {
    if (TT) T = TT;
    __m256 a, b;
    widen16(row, a, b);
    lo = _mm256_mul_ps(qv[0], a);
    hi = _mm256_mul_ps(qv[1], b);
    for (int64_t t = 1; t < T; t++) {
        widen16(row + 16 * t, a, b);
        lo = _mm256_fmadd_ps(qv[2 * t], a, lo);
        hi = _mm256_fmadd_ps(qv[2 * t + 1], b, hi);
    }
}

// Scores of one query head against the nb keys of a block (rows of stride rs from k) into s: positions in the block's
// whole groups of 16 by sum16's tree, the others by the reduce's.
template <int TT>
static inline __attribute__((always_inline)) void block_scores(const __m256 *qv, const uint16_t *k, int64_t rs,
                                                               int64_t nb, int64_t T, float *s) {
    const int64_t whole = nb & ~(int64_t)15;
    int64_t i = 0;
    for (; i < whole; i += 8) {
        __m256 lo[8], hi[8];
        for (int p = 0; p < 8; p++) dot_row<TT>(qv, k + (i + p) * rs, T, lo[p], hi[p]);
        _mm256_store_ps(s + i, sum8(lo, hi));
    }
    for (; i < nb; i++) {
        __m256 lo, hi;
        dot_row<TT>(qv, k + i * rs, T, lo, hi);
        s[i] = sum1(lo, hi);
    }
}

// acc (NT groups of 16 in widen16's layout) += p[i] v[i] over the block's positions, skipping zero weights (a masked
// position's value may be anything).
template <int NT>
static inline __attribute__((always_inline)) void pv_groups(const float *p, const uint16_t *v, int64_t rs, int64_t nb,
                                                            float *acc) {
    __m256 a[2 * NT];
    for (int t = 0; t < 2 * NT; t++) a[t] = _mm256_loadu_ps(acc + 8 * t);
    for (int64_t i = 0; i < nb; i++) {
        if (p[i] == 0.0f) continue;
        const __m256 w = _mm256_set1_ps(p[i]);
        const uint16_t *row = v + i * rs;
        for (int t = 0; t < NT; t++) {
            __m256 lo, hi;
            widen16(row + 16 * t, lo, hi);
            a[2 * t] = _mm256_fmadd_ps(w, lo, a[2 * t]);
            a[2 * t + 1] = _mm256_fmadd_ps(w, hi, a[2 * t + 1]);
        }
    }
    for (int t = 0; t < 2 * NT; t++) _mm256_storeu_ps(acc + 8 * t, a[t]);
}

// The largest of s[0 .. n) that is not NaN (-inf when none): a max is exact in any order (a zero's sign aside, which
// no later step can tell).
static inline float block_max(const float *s, int64_t n) {
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) mx = _mm256_max_ps(_mm256_load_ps(s + i), mx); /* a NaN score leaves mx as it is */
    float m = qcal_hmax8(mx);
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    return m;
}

static inline float rounded(float x) { /* x as computed: never fused into a later add */
    __asm__("" : "+x"(x));
    return x;
}

// One work item: KV head g's G query heads over positions [j0, j1). Leaves the running max m[r], sum l[r] and
// unnormalised accumulator acc[r * D ...] (widen16's layout) of each query head r.
template <int TT>
static void attend_slice(const uint16_t *q, const uint16_t *kg, int64_t krs, const uint16_t *vg, int64_t vrs,
                         const uint8_t *mask, int64_t j0, int64_t j1, int64_t G, int64_t D, float scale, float *m,
                         float *l, float *acc) {
    const int64_t T = TT ? TT : D / 16;
    for (int64_t r = 0; r < G; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        memset(acc + r * D, 0, sizeof(float) * D);
    }
    float s[QCAL_ATTN_BLOCK] __attribute__((aligned(32))) = {};
    __m256 qv[2 * (QCAL_ATTN_MAX_D / 16)];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t b0 = j0; b0 < j1; b0 += QCAL_ATTN_BLOCK) {
        const int64_t nb = (j1 - b0) < QCAL_ATTN_BLOCK ? (j1 - b0) : QCAL_ATTN_BLOCK;
        int any = 0;
        for (int64_t i = 0; i < nb && !any; i++) any = !mask || mask[b0 + i];
        if (!any) continue;
        const uint16_t *kb = kg + b0 * krs, *vb = vg + b0 * vrs;
        for (int64_t r = 0; r < G; r++) {
            const __m256 sc = _mm256_set1_ps(scale);
            for (int64_t t = 0; t < T; t++) {
                __m256 lo, hi;
                widen16(q + r * D + 16 * t, lo, hi);
                qv[2 * t] = _mm256_mul_ps(lo, sc);
                qv[2 * t + 1] = _mm256_mul_ps(hi, sc);
            }
            block_scores<TT>(qv, kb, krs, nb, T, s);
            if (mask)
                for (int64_t i = 0; i < nb; i++)
                    if (!mask[b0 + i]) s[i] = -INFINITY;
            float bmax = block_max(s, nb);
            float *a = acc + r * D;
            if (bmax > m[r]) { /* rescale what was accumulated under the old max */
                const float c = m[r] == -INFINITY ? 0.0f : expf(m[r] - bmax);
                l[r] = rounded(l[r] * c);
                const __m256 vc = _mm256_set1_ps(c);
                for (int64_t t = 0; t < 2 * T; t++)
                    _mm256_storeu_ps(a + 8 * t, _mm256_mul_ps(_mm256_loadu_ps(a + 8 * t), vc));
                m[r] = bmax;
            }
            __m256 sum_lo = _mm256_setzero_ps(), sum_hi = _mm256_setzero_ps();
            const __m256 vm = _mm256_set1_ps(m[r]), ninf = _mm256_set1_ps(-INFINITY);
            for (int64_t i = 0; i < nb; i += 16) {
                for (int h = 0; h < 2; h++) { /* the two halves of the AVX-512 kernel's 16 lanes */
                    const int64_t i8 = i + 8 * h;
                    const __m256 x = _mm256_load_ps(s + i8);
                    const __m256 tail =
                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(nb - i8)), lane));
                    const __m256 live = _mm256_and_ps(tail, _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
                    const __m256 p = _mm256_and_ps(live, qcal_exp8_nonpos(_mm256_sub_ps(x, vm)));
                    _mm256_store_ps(s + i8, p);
                    if (h)
                        sum_hi = _mm256_add_ps(sum_hi, p);
                    else
                        sum_lo = _mm256_add_ps(sum_lo, p);
                }
            }
            l[r] += qcal_hsum8(_mm256_add_ps(sum_lo, sum_hi));
            for (int64_t t0 = 0; t0 < T; t0 += 4) { /* accumulate p V, 64 dimensions at a time */
                const int64_t nt = T - t0 < 4 ? T - t0 : 4;
                if (nt == 4)
                    pv_groups<4>(s, vb + 16 * t0, vrs, nb, a + 16 * t0);
                else if (nt == 3)
                    pv_groups<3>(s, vb + 16 * t0, vrs, nb, a + 16 * t0);
                else if (nt == 2)
                    pv_groups<2>(s, vb + 16 * t0, vrs, nb, a + 16 * t0);
                else
                    pv_groups<1>(s, vb + 16 * t0, vrs, nb, a + 16 * t0);
            }
        }
    }
}

typedef struct {
    const uint16_t *q, *k;
    int64_t khs, krs;
    const uint16_t *v;
    int64_t vhs, vrs;
    const uint8_t *mask;
    int64_t L, D, G, slices, items;
    float scale;
    float *ml, *accs;
} attend_job;

// Thread t's items of T (qcal_slice_items: KV heads x position slices).
static void attend_share(const void *arg, int t, int T) {
    const attend_job *a = (const attend_job *)arg;
    const int64_t G = a->G, D = a->D;
    qcal_slice_items(a->items, a->slices, a->L, t, T, [&](int64_t it, int64_t g, int64_t j0, int64_t j1) {
        float *m = a->ml + it * G * 2, *l = m + G, *acc = a->accs + it * G * D;
        const uint16_t *qg = a->q + g * G * D, *kg = a->k + g * a->khs, *vg = a->v + g * a->vhs;
        if (D == 64)
            attend_slice<4>(qg, kg, a->krs, vg, a->vrs, a->mask, j0, j1, G, 64, a->scale, m, l, acc);
        else if (D == 128)
            attend_slice<8>(qg, kg, a->krs, vg, a->vrs, a->mask, j0, j1, G, 128, a->scale, m, l, acc);
        else
            attend_slice<0>(qg, kg, a->krs, vg, a->vrs, a->mask, j0, j1, G, D, a->scale, m, l, acc);
    });
}

// q (hq, D) bf16 contiguous; k / v: head h, position j at k + h khs + j krs (v likewise); mask: L bytes (0 = masked)
// or NULL; out (hq, D) bf16. Returns 0, or -1 on an unsupported shape, -2 on allocation failure.
static int attend(const uint16_t *q, const uint16_t *k, int64_t khs, int64_t krs, const uint16_t *v, int64_t vhs,
                  int64_t vrs, const uint8_t *mask, uint16_t *out, int64_t hq, int64_t hkv, int64_t L, int64_t D,
                  float scale, int nthreads) {
    if (hkv <= 0 || hq % hkv || hq / hkv > QCAL_ATTN_MAX_G || D % 16 || D <= 0 || D > QCAL_ATTN_MAX_D || L < 0)
        return -1;
    const int64_t G = hq / hkv;
    if (nthreads < 1) nthreads = 1;
    int64_t slices = 1;  // split positions until the threads get equal shares (not below 64 positions a slice)
    while (slices < 64 && (hkv * slices) % nthreads && hkv * slices < 8 * nthreads && L / (slices + 1) >= 64)
        slices++;
    const int64_t items = hkv * slices;
    float *ml = (float *)scratch_get(sizeof(float) * items * G * (2 + D));
    if (!ml) return -2;
    float *accs = ml + items * G * 2;
    const attend_job job = {q, k, khs, krs, v, vhs, vrs, mask, L, D, G, slices, items, scale, ml, accs};
    if (nthreads > 1 && items > 1) qcal_parallel(nthreads, attend_share, &job);
    else attend_share(&job, 0, 1);
    for (int64_t g = 0; g < hkv; g++) {
        for (int64_t r = 0; r < G; r++) {
            float mx = -INFINITY;
            for (int64_t c = 0; c < slices; c++) {
                const float mc = ml[(g * slices + c) * G * 2 + r];
                mx = mc > mx ? mc : mx;
            }
            float total = 0.0f;
            float w[64];
            const int64_t ns = slices < 64 ? slices : 64;
            for (int64_t c = 0; c < ns; c++) {
                const float *mc = ml + (g * slices + c) * G * 2;
                w[c] = mc[r] == -INFINITY ? 0.0f : expf(mc[r] - mx);
                total = fmaf(w[c], mc[G + r], total);
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            uint16_t *o = out + (g * G + r) * D;
            for (int64_t t = 0; t < D / 16; t++) {
                __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
                for (int64_t c = 0; c < ns; c++) {
                    const float *a = accs + ((g * slices + c) * G + r) * D + 16 * t;
                    const __m256 wc = _mm256_set1_ps(w[c]);
                    lo = _mm256_fmadd_ps(wc, _mm256_loadu_ps(a), lo);
                    hi = _mm256_fmadd_ps(wc, _mm256_loadu_ps(a + 8), hi);
                }
                const __m256 vinv = _mm256_set1_ps(inv);
                store16_bf16(o + 16 * t, _mm256_mul_ps(lo, vinv), _mm256_mul_ps(hi, vinv));
            }
        }
    }
    return 0;
}

// Attention over a bf16 cache given by pointers and (head, position) strides, its scratch released: the form the
// operators share with the AVX-512 build.
static int attend_bf16(const uint16_t *q, const uint16_t *k, int64_t k_hs, int64_t k_ps, const uint16_t *v,
                       int64_t v_hs, int64_t v_ps, const uint8_t *mask, uint16_t *out, int64_t hq, int64_t hkv,
                       int64_t L, int64_t D, float scale, int nthreads) {
    const int rc = attend(q, k, k_hs, k_ps, v, v_hs, v_ps, mask, out, hq, hkv, L, D, scale, nthreads);
    scratch_release();
    return rc;
}

#include "decode_attention_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build

// ------------------------------------------------------------------ prefill

#define PA_QB 4  /* query rows per work item */
#define PA_KB 64 /* keys per block */
#define PA_MAX_D 256
#define PA_MAX_G 8 /* query heads of one KV head attended together */

typedef struct {
    const uint16_t *q;
    uint16_t *out;
    const float *kp, *vp; /* widened keys / values, per KV head */
    int64_t q_rs, o_rs, n, G, start, D, lpad;
    float scale;
} pa_ctx;

// Columns of the 8 x 8 matrix whose rows are r[0..7], in place: r[t] becomes (r[0][t], .., r[7][t]).
static inline void transpose8(__m256 *r) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

// Keys widened to fp32 in groups of 8 (per pair t of dimensions: the 8 keys' odd dimension 2t + 1, then their even
// one 2t); values widened to fp32 rows. Zeros past L.
static void pack_kv(const uint16_t *k, const uint16_t *v, int64_t kv_rs, int64_t L, int64_t lpad, int64_t D,
                    float *kp, float *vp) {
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t j0 = 0; j0 < lpad; j0 += 8) {
        float *kb = kp + j0 * D;
        for (int64_t d0 = 0; d0 < D; d0 += 16) { /* 8 keys x 16 dimensions: 8 pairs */
            __m256 ev[8], od[8];
            for (int i = 0; i < 8; i++) {
                if (j0 + i < L) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(k + (j0 + i) * kv_rs + d0));
                    ev[i] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16)); /* dimensions d0 + 2t */
                    od[i] = _mm256_castsi256_ps(_mm256_and_si256(raw, odd)); /* d0 + 2t + 1 */
                } else {
                    ev[i] = od[i] = _mm256_setzero_ps();
                }
            }
            transpose8(ev);
            transpose8(od);
            for (int t = 0; t < 8; t++) {
                _mm256_store_ps(kb + 16 * (d0 / 2 + t), od[t]);
                _mm256_store_ps(kb + 16 * (d0 / 2 + t) + 8, ev[t]);
            }
        }
        for (int64_t j = j0; j < j0 + 8; j++) {
            float *vr = vp + j * D;
            if (j >= L) {
                memset(vr, 0, sizeof(float) * D);
                continue;
            }
            for (int64_t d = 0; d < D; d += 8) _mm256_store_ps(vr + d, qcal_load8_bf16(v + j * kv_rs + d));
        }
    }
}

// The rows of one work item: mb <= PA_QB positions of each of the (up to PA_MAX_G) query heads of a KV head, row
// rho = r mb + m (head r, position i0 + m); every row's q widened, scores, probabilities, output and softmax state.
#define PA_ROWS (PA_MAX_G * PA_QB)
#define PA_MR 6 /* rows a tile: 12 accumulators, two vectors of keys (dimensions) and a broadcast in 16 registers */
/* The tiles are inlined into rows_tile: called, GCC kept a memory copy of the accumulators, stored every step. */
#define PA_TILE static inline __attribute__((always_inline))

// acc[m] += x[m stride] * (a, b) for the tile's MR rows: one step of 12 independent chains.
template <int MR>
PA_TILE void tile_step(__m256 (&acc)[MR][2], const float *x, int64_t stride, const float *a, const float *b) {
    const __m256 va = _mm256_load_ps(a), vb = _mm256_load_ps(b);
    for (int m = 0; m < MR; m++) {
        const __m256 xb = _mm256_broadcast_ss(x + m * stride);
        acc[m][0] = _mm256_fmadd_ps(xb, va, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(xb, vb, acc[m][1]);
    }
}

// Scores of MR rows (q fp32, row stride D) against the 16 keys from key0 (two groups of 8 in pack_kv's layout),
// scaled, into s[m][col0 ..]: per key the dimension pairs in order, odd then even, as vdpbf16ps accumulates. The
// odd dimensions of a pair for all rows, then the even ones: 12 independent chains, two key vectors loaded a step.
template <int MR>
PA_TILE void score_tile(const float *qf, const float *kp, int64_t D, int64_t key0, int64_t col0, float scale,
                        float (*s)[PA_KB]) {
    const float *k0 = kp + key0 * D, *k1 = k0 + 8 * D;
    __m256 acc[MR][2];
    for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t t = 0; t < D / 2; t++) {
        tile_step<MR>(acc, qf + 2 * t + 1, D, k0 + 16 * t, k1 + 16 * t); /* dimension 2t + 1 first */
        tile_step<MR>(acc, qf + 2 * t, D, k0 + 16 * t + 8, k1 + 16 * t + 8);
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int m = 0; m < MR; m++) {
        _mm256_store_ps(s[m] + col0, _mm256_mul_ps(acc[m][0], sc));
        _mm256_store_ps(s[m] + col0 + 8, _mm256_mul_ps(acc[m][1], sc));
    }
}

// o[m][d0 .. d0 + 16) (row stride D) += P V over key pairs [kb0, kb0 + 2 pairs): per pair the odd key, then the
// even one, as vdpbf16ps accumulates; the odd key for all rows, then the even one (12 independent chains).
template <int MR>
PA_TILE void pv_tile(const float (*p)[PA_KB], const float *vp, int64_t D, int64_t kb0, int64_t pairs, int64_t d0,
                     float *o) {
    __m256 acc[MR][2];
    for (int m = 0; m < MR; m++) {
        acc[m][0] = _mm256_load_ps(o + m * D + d0);
        acc[m][1] = _mm256_load_ps(o + m * D + d0 + 8);
    }
    const float *ve = vp + kb0 * D + d0;
    for (int64_t u = 0; u < pairs; u++, ve += 2 * D) {
        tile_step<MR>(acc, p[0] + 2 * u + 1, PA_KB, ve + D, ve + D + 8); /* key kb0 + 2u + 1 first */
        tile_step<MR>(acc, p[0] + 2 * u, PA_KB, ve, ve + 8);
    }
    for (int m = 0; m < MR; m++) {
        _mm256_store_ps(o + m * D + d0, acc[m][0]);
        _mm256_store_ps(o + m * D + d0 + 8, acc[m][1]);
    }
}

// Scores of rows [r0, r0 + mr) against the block's nch chunks of 16 keys, or (pv) their P V into o.
template <int MR>
static void rows_tile(bool scores, const float *qf, const float *kp, const float *vp, int64_t D, int64_t kb0, int nch,
                      float scale, float (*s)[PA_KB], const float (*p)[PA_KB], float *o) {
    if (scores) {
        for (int ch = 0; ch < nch; ch++) score_tile<MR>(qf, kp, D, kb0 + 16 * ch, 16 * ch, scale, s);
    } else {
        for (int64_t d0 = 0; d0 < D; d0 += 16) pv_tile<MR>(p, vp, D, kb0, 8 * nch, d0, o);
    }
}

static void rows_tiles(bool scores, int rows, const float *qf, const float *kp, const float *vp, int64_t D,
                       int64_t kb0, int nch, float scale, float (*s)[PA_KB], const float (*p)[PA_KB], float *o) {
    for (int r0 = 0; r0 < rows; r0 += PA_MR) {
        const float *q = qf + r0 * D;
        float *orow = o + r0 * D;
        switch (rows - r0 < PA_MR ? rows - r0 : PA_MR) {
        case 1: rows_tile<1>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        case 2: rows_tile<2>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        case 3: rows_tile<3>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        case 4: rows_tile<4>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        case 5: rows_tile<5>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        default: rows_tile<6>(scores, q, kp, vp, D, kb0, nch, scale, s + r0, p + r0, orow); break;
        }
    }
}

/* The query heads sharing KV head g (up to PA_MAX_G at a time), rows i0 .. i0 + mb - 1 of each, block of keys by
   block of keys: each block is read once for all of them, their rows run together in tiles of PA_MR. Every head's
   numbers are those of attending it alone. */
static void attend_rows(const pa_ctx *c, int64_t g, int64_t i0, int mb) {
    const int64_t D = c->D;
    const float *kp = c->kp + g * c->lpad * D, *vp = c->vp + g * c->lpad * D;
    float s[PA_ROWS][PA_KB] __attribute__((aligned(32)));
    float p[PA_ROWS][PA_KB] __attribute__((aligned(32)));
    float o[PA_ROWS * PA_MAX_D] __attribute__((aligned(32)));
    float qf[PA_ROWS * PA_MAX_D] __attribute__((aligned(32)));
    float mx[PA_ROWS], l[PA_ROWS];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int64_t last = c->start + i0 + mb - 1; /* the last position these rows see */
    for (int64_t h0 = 0; h0 < c->G; h0 += PA_MAX_G) {
        const int nr = c->G - h0 < PA_MAX_G ? (int)(c->G - h0) : PA_MAX_G, rows = nr * mb;
        for (int rho = 0; rho < rows; rho++) {
            const int64_t h = g * c->G + h0 + rho / mb, m = rho % mb;
            mx[rho] = -INFINITY;
            l[rho] = 0.0f;
            memset(o + rho * D, 0, (size_t)D * sizeof(float));
            const uint16_t *qr = c->q + (i0 + m) * c->q_rs + h * D;
            for (int64_t d = 0; d < D; d += 8) _mm256_store_ps(qf + rho * D + d, qcal_load8_bf16(qr + d));
        }
        for (int64_t kb0 = 0; kb0 <= last; kb0 += PA_KB) {
            const int64_t kc = last + 1 - kb0 < PA_KB ? last + 1 - kb0 : PA_KB;
            const int nch = (int)((kc + 15) / 16);
            rows_tiles(true, rows, qf, kp, vp, D, kb0, nch, c->scale, s, p, o);
            for (int rho = 0; rho < rows; rho++) { /* mask, online softmax, probabilities as bf16 */
                const int64_t see = c->start + i0 + rho % mb - kb0 + 1; /* keys of this block the row sees */
                const int64_t live = see < 16 * nch ? see : 16 * nch;
                __m256 vmax = _mm256_set1_ps(-INFINITY); /* NaN scores skipped, as a scalar s > max ? s : max */
                for (int64_t j = 0; j < live; j += 8) {
                    const __m256 on = _mm256_castsi256_ps(
                        _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(live - j > 8 ? 8 : live - j)), lane));
                    vmax = _mm256_max_ps(_mm256_blendv_ps(vmax, _mm256_load_ps(s[rho] + j), on), vmax);
                }
                const float bm = qcal_hmax8(vmax);
                const float mnew = bm > mx[rho] ? bm : mx[rho];
                const float corr = mx[rho] == -INFINITY ? 0.0f : expf(mx[rho] - mnew);
                __m256 sum_lo = _mm256_setzero_ps(), sum_hi = _mm256_setzero_ps();
                const __m256 vm = _mm256_set1_ps(mnew);
                for (int64_t j = 0; j < 16 * nch; j += 8) {
                    const int64_t left = live - j;
                    const __m256 on = _mm256_castsi256_ps(
                        _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < 0 ? 0 : left > 8 ? 8 : left)), lane));
                    const __m256 e = qcal_round8_bf16(
                        _mm256_and_ps(on, qcal_exp8_nonpos(_mm256_sub_ps(_mm256_load_ps(s[rho] + j), vm))));
                    _mm256_store_ps(p[rho] + j, e);
                    if (j & 8)
                        sum_hi = _mm256_add_ps(sum_hi, e);
                    else
                        sum_lo = _mm256_add_ps(sum_lo, e);
                }
                /* the sum of the bf16 weights P V uses; l * corr + sum is one fused multiply-add, as compiled there */
                l[rho] = fmaf(l[rho], corr, qcal_hsum8(_mm256_add_ps(sum_lo, sum_hi)));
                mx[rho] = mnew;
                if (corr != 1.0f) {
                    const __m256 vc = _mm256_set1_ps(corr);
                    float *orow = o + rho * D;
                    for (int64_t d = 0; d < D; d += 8)
                        _mm256_store_ps(orow + d, _mm256_mul_ps(_mm256_load_ps(orow + d), vc));
                }
            }
            rows_tiles(false, rows, qf, kp, vp, D, kb0, nch, c->scale, s, p, o);
        }
        for (int rho = 0; rho < rows; rho++) {
            const int64_t h = g * c->G + h0 + rho / mb, m = rho % mb;
            const __m256 inv = _mm256_set1_ps(l[rho] > 0.0f ? 1.0f / l[rho] : 0.0f);
            uint16_t *orow = c->out + (i0 + m) * c->o_rs + h * D;
            for (int64_t d = 0; d < D; d += 8)
                qcal_store8_bf16(orow + d, _mm256_mul_ps(_mm256_load_ps(o + rho * D + d), inv));
        }
    }
}

/* q: token i, head h at q + i q_rs + h D; k, v: KV head g, position j at k + g kv_hs + j kv_rs; out like q with
   row stride o_rs. n query rows at positions start .. start + n - 1 over start + n keys. D % 16 == 0, D <= 256,
   hq % hkv == 0. Returns 0, -1 (arguments), -2 (memory). */
static int attend_causal_rows(const uint16_t *q, int64_t q_rs, const uint16_t *k, const uint16_t *v, int64_t kv_hs,
                              int64_t kv_rs, uint16_t *out, int64_t o_rs, int64_t n, int64_t hq, int64_t hkv,
                              int64_t start, int64_t D, float scale, int nthreads) {
    if (n < 0 || start < 0 || hkv <= 0 || hq % hkv || D <= 0 || D % 16 || D > PA_MAX_D) return -1;
    const int64_t L = start + n, lpad = (L + PA_KB - 1) / PA_KB * PA_KB;
    float *kp = (float *)scratch_get(sizeof(float) * 2 * hkv * lpad * D);
    if (!kp) return -2;
    float *vp = kp + hkv * lpad * D;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && hkv > 1)
    for (int64_t g = 0; g < hkv; g++)
        pack_kv(k + g * kv_hs, v + g * kv_hs, kv_rs, L, lpad, D, kp + g * lpad * D, vp + g * lpad * D);
    const pa_ctx c = {q, out, kp, vp, q_rs, o_rs, n, hq / hkv, start, D, lpad, scale};
    const int64_t blocks = (n + PA_QB - 1) / PA_QB;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1 && hkv * blocks > 1)
    for (int64_t item = 0; item < hkv * blocks; item++) {
        const int64_t b = blocks - 1 - item / hkv; /* the longest rows first */
        const int64_t i0 = b * PA_QB;
        attend_rows(&c, item % hkv, i0, n - i0 < PA_QB ? (int)(n - i0) : PA_QB);
    }
    return 0;
}

// attend_causal_rows with its scratch released (the operator the AVX-512 build shares calls this).
static int attend_causal(const uint16_t *q, int64_t q_rs, const uint16_t *k, const uint16_t *v, int64_t kv_hs,
                         int64_t kv_rs, uint16_t *out, int64_t o_rs, int64_t n, int64_t hq, int64_t hkv,
                         int64_t start, int64_t D, float scale, int nthreads) {
    const int rc = attend_causal_rows(q, q_rs, k, v, kv_hs, kv_rs, out, o_rs, n, hq, hkv, start, D, scale, nthreads);
    scratch_release();
    return rc;
}

#include "prefill_attention_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build

// ------------------------------------------------------------------ registration

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
    m.def("decode_step_attention(Tensor(a!) q, Tensor k, Tensor v, Tensor(b!) k_cache, Tensor(c!) v_cache, int pos, "
          "Tensor cos, Tensor sin, float scale) -> Tensor");
    m.def("prefill_attention(Tensor q, Tensor k, Tensor v, int start, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("decode_attention", &decode_attention);
    m.impl("decode_step_attention", &decode_step_attention);
    m.impl("prefill_attention", &prefill_attention);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("decode_attention", [](const at::Tensor &q, const at::Tensor &, const at::Tensor &,
                                  const std::optional<at::Tensor> &, double) {
        return at::empty_symint({1, 1, q.sym_size(1), q.sym_size(3)}, q.options());
    });
}
