/* The thread split shared by qcal's small-M matmul kernels. */
#ifndef QCAL_PARALLEL_H
#define QCAL_PARALLEL_H

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

/* How far ahead (bytes) the small-M kernels prefetch each weight row or block they stream from DRAM. 256 made
   int8 weight-only ~10% and int4 ~7% faster through DRAM (bench_kernels --cold); 1024 was slower than none. */
#define QCAL_STREAM_AHEAD 256

/* Thread t's share of n units among T threads. */
static inline void qcal_share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* The driver every small-M matmul kernel shares: input rows in blocks of 4 (the tiles' MM), units of output
   rows split among the threads with qcal_share, fn(ctx, m0, mb, unit) computing one tile. */
typedef void (*qcal_unit_fn)(const void *ctx, int64_t m0, int mb, int64_t unit);

static inline void qcal_run_units(int64_t M, int64_t units, int nthreads, const void *ctx, qcal_unit_fn fn) {
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
            for (int64_t p = lo; p < hi; p++) fn(ctx, m0, mb, p);
        }
    }
}

#endif
