/* Next-call weight prefetch shared by qcal's matmul kernels (prefetch.c).

   In a decode step the quantized layers run in the same order every token, each streaming its weight
   from DRAM, and every call starts cold. The library remembers which weight was called after which (a
   small table keyed by weight address, learned as calls arrive) and, while a call computes, each thread
   prefetches into its L2 the part of the next call's weight it will compute itself (every kernel splits
   its units of work among threads with share()), up to PF_MAX bytes. The hints never fault: a stale
   entry (a freed model) costs wasted reads, nothing else. */
#ifndef QCAL_PREFETCH_H
#define QCAL_PREFETCH_H

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define QCAL_PF_MAX (192 * 1024)

/* Within a call: how far ahead (bytes) the small-M kernels prefetch each weight row or block they stream from
   DRAM. 256 made int8 weight-only ~10% and int4 ~7% faster through DRAM (bench_kernels --cold); 1024 was
   slower than none. */
#define QCAL_STREAM_AHEAD 256

typedef struct {
    const void *key; /* the weight this entry follows */
    const uint8_t *w, *aux; /* the next call's weight and its per-unit side data (scales) */
    int64_t units, unit_bytes, aux_unit_bytes;
} qcal_next_call;

/* Record that weight w (units of unit_bytes, side data aux) is called now, and return what followed it last
   time (w == NULL when unknown or prefetch is off). */
qcal_next_call qcal_pf_step(const uint8_t *w, int64_t units, int64_t unit_bytes, const void *aux,
                            int64_t aux_unit_bytes);

/* Thread t's share of n units among T threads (the split every kernel uses). */
static inline void qcal_share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

static inline void qcal_prefetch_range(const uint8_t *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(p + o), _MM_HINT_T1);
}

/* Per-thread prefetch plan: my share of the next call's weight, spread over my units [lo, hi). */
typedef struct {
    const uint8_t *base;
    int64_t per_unit, total;
} qcal_pf_plan;

static inline qcal_pf_plan qcal_pf_begin(const qcal_next_call *next, int t, int T, int64_t lo, int64_t hi) {
    qcal_pf_plan plan = {0, 0, 0};
    if (!next->w || hi <= lo) return plan;
    int64_t nlo, nhi;
    qcal_share(next->units, t, T, &nlo, &nhi);
    int64_t bytes = (nhi - nlo) * next->unit_bytes;
    if (bytes > QCAL_PF_MAX) bytes = QCAL_PF_MAX;
    plan.base = next->w + nlo * next->unit_bytes;
    plan.per_unit = (bytes / (hi - lo) + 63) & ~(int64_t)63;
    plan.total = bytes;
    if (next->aux) {
        int64_t aux = (nhi - nlo) * next->aux_unit_bytes;
        qcal_prefetch_range(next->aux + nlo * next->aux_unit_bytes, aux < 16384 ? aux : 16384);
    }
    return plan;
}

/* Issue the prefetches that belong to my i-th unit. */
static inline void qcal_pf_unit(const qcal_pf_plan *plan, int64_t i) {
    if (!plan->base) return;
    const int64_t off = i * plan->per_unit;
    if (off < plan->total)
        qcal_prefetch_range(plan->base + off, off + plan->per_unit > plan->total ? plan->total - off : plan->per_unit);
}

/* The driver every small-M matmul kernel shares: input rows in blocks of 4 (the tiles' MM), units of
   output rows split among the threads with qcal_share (each thread prefetching its part of the next
   call's weight while it works on the last block of rows), fn(ctx, m0, mb, unit) computing one tile. */
typedef void (*qcal_unit_fn)(const void *ctx, int64_t m0, int mb, int64_t unit);

static inline void qcal_run_units(int64_t M, int64_t units, int nthreads, const qcal_next_call *next,
                                  const void *ctx, qcal_unit_fn fn) {
    if (nthreads < 1) nthreads = 1;
    /* one parallel region for all input rows: each thread keeps its units (and so its part of the weight,
       warm in its cache) and walks the row blocks; the outputs are disjoint, so no barrier is needed */
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t lo, hi;
        qcal_share(units, t, T, &lo, &hi);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mb = M - m0 < 4 ? (int)(M - m0) : 4;
            const qcal_pf_plan plan = m0 + 4 >= M ? qcal_pf_begin(next, t, T, lo, hi) : (qcal_pf_plan){0, 0, 0};
            for (int64_t p = lo; p < hi; p++) {
                qcal_pf_unit(&plan, p - lo);
                fn(ctx, m0, mb, p);
            }
        }
    }
}

#endif
