/* The thread split shared by qcal's small-M matmul kernels. */
#ifndef QCAL_PARALLEL_H
#define QCAL_PARALLEL_H

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <atomic>
#include <exception>

/* How far ahead (bytes) the small-M kernels prefetch each weight row or block they stream from DRAM. 256 made
   int8 weight-only ~10% and int4 ~7% faster through DRAM (bench_kernels --cold); 1024 was slower than none. */
#define QCAL_STREAM_AHEAD 256

/* Thread t's share of n units among T threads. */
static inline void qcal_share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* A team of threads kept for a run of kernel calls (a decode step's ~240): its leader runs the calls, the other
   threads wait spinning on an atomic job counter inside one OpenMP region, so a call's parallel part costs two
   cache-line handoffs instead of an OpenMP region's start and end (each a futex system call). A thread leads at
   most one team, set in qcal_my_team for the run (qcal_lead_team); qcal_parallel posts to it. */
typedef void (*qcal_job_fn)(const void *arg, int t, int T);

struct qcal_team {
    int T = 1;
    std::atomic<uint64_t> posted{0}; /* jobs posted */
    std::atomic<int> pending{0};     /* helpers still on the current job */
    std::atomic<bool> quit{false};
    qcal_job_fn fn = nullptr;
    const void *arg = nullptr;
};
inline thread_local qcal_team *qcal_my_team = nullptr;

/* fn(arg, t, T) for every thread t of T: on the calling thread's team where it leads one (with nthreads > 1),
   else in an OpenMP region of nthreads. Returns when every share is done. */
static inline void qcal_parallel(int nthreads, qcal_job_fn fn, const void *arg) {
    qcal_team *team = qcal_my_team;
    if (team && nthreads > 1 && team->T > 1) {
        team->fn = fn;
        team->arg = arg;
        team->pending.store(team->T - 1, std::memory_order_relaxed);
        team->posted.fetch_add(1, std::memory_order_release);
        fn(arg, 0, team->T);
        while (team->pending.load(std::memory_order_acquire)) _mm_pause();
        return;
    }
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    fn(arg, omp_get_thread_num(), omp_get_num_threads());
}

/* Runs body() on the calling thread as the leader of a team of nthreads, at most one a processor (the helpers spin:
   more would wait on each other's time slices), the helpers serving qcal_parallel's jobs until body returns; body's
   exception, if any, is rethrown after the team is released. */
template <class Body> static inline void qcal_lead_team(int nthreads, Body &&body) {
    qcal_team team;
    std::exception_ptr error;
    const int procs = omp_get_num_procs();
#pragma omp parallel num_threads(nthreads < procs ? nthreads : procs)
    {
        if (omp_get_thread_num() == 0) {
            qcal_team *outer = qcal_my_team; /* a team led inside another (nested: one thread) */
            team.T = omp_get_num_threads();
            qcal_my_team = &team;
            try {
                body();
            } catch (...) {
                error = std::current_exception();
            }
            qcal_my_team = outer;
            team.quit.store(true, std::memory_order_release);
        } else {
            uint64_t seen = 0;
            const int t = omp_get_thread_num();
            for (;;) {
                const uint64_t job = team.posted.load(std::memory_order_acquire);
                if (job != seen) {
                    seen = job;
                    team.fn(team.arg, t, team.T);
                    team.pending.fetch_sub(1, std::memory_order_release);
                } else if (team.quit.load(std::memory_order_acquire)) {
                    break;
                } else {
                    _mm_pause();
                }
            }
        }
    }
    if (error) std::rethrow_exception(error);
}

/* The driver every small-M matmul kernel shares: input rows in blocks of 4 (the tiles' MM), units of output
   rows split among the threads with qcal_share, fn(ctx, m0, mb, unit) computing one tile. */
typedef void (*qcal_unit_fn)(const void *ctx, int64_t m0, int mb, int64_t unit);

typedef struct {
    int64_t M, units;
    const void *ctx;
    qcal_unit_fn fn;
} qcal_units_job;

/* Thread t's units, each for every block of input rows (its part of the weight stays warm in its cache); the outputs
   are disjoint, so no barrier is needed. */
static void qcal_units_share(const void *arg, int t, int T) {
    const qcal_units_job *j = (const qcal_units_job *)arg;
    int64_t lo, hi;
    qcal_share(j->units, t, T, &lo, &hi);
    for (int64_t m0 = 0; m0 < j->M; m0 += 4) {
        const int mb = j->M - m0 < 4 ? (int)(j->M - m0) : 4;
        for (int64_t p = lo; p < hi; p++) j->fn(j->ctx, m0, mb, p);
    }
}

static inline void qcal_run_units(int64_t M, int64_t units, int nthreads, const void *ctx, qcal_unit_fn fn) {
    const qcal_units_job job = {M, units, ctx, fn};
    qcal_parallel(nthreads, qcal_units_share, &job);
}

#endif
