/* The thread split shared by qcal's small-M matmul kernels. */
#ifndef QCAL_PARALLEL_H
#define QCAL_PARALLEL_H

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <atomic>
#include <exception>

/* How far ahead (bytes) the AVX-512 small-M kernels that stream weight rows (bf16, the int8 A8W8 and widening
   tiles, fp6 / fp5 / fp4) prefetch each row. A unit's rows of SmolLM2 are a few KiB, so a stream prefetched 256
   bytes ahead (or not at all) started every row with DRAM misses. Decode step, 2 threads, processes alternating,
   ms per token: bf16 256 bytes 12.0, 2048 11.4, 4096 9.5-9.7, 8192 9.1, 16384 9.4, 32768 10.0; int8dq none 7.2, 4096
   6.4, 8192 6.0; the builds before and after alternating: bf16 13.6 -> 11.1, int8dq 8.4 -> 6.4, fp8wo (256 before)
   12.2 -> 7.1, fp6wo (none) 12.8 -> 7.9, fp4wo-64 7.6 -> 5.7. (The int8 digit and group kernels keep their own
   4096; the int4 kernels prefetch the next unit, int4_shape.h.) */
#define QCAL_STREAM_AHEAD 8192

/* Thread t's share of n units among T threads. */
static inline void qcal_share(int64_t n, int t, int T, int64_t *lo, int64_t *hi) {
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* Decode attention's work items (KV head g x slice c of L positions in `slices`) of thread t of T, a contiguous share
   as OpenMP's static schedule gives: f(item, g, first position, end position) for each. */
template <class F> static inline void qcal_slice_items(int64_t items, int64_t slices, int64_t L, int t, int T, F &&f) {
    int64_t lo, hi;
    qcal_share(items, t, T, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        const int64_t c = it % slices;
        f(it, it / slices, L * c / slices, L * (c + 1) / slices);
    }
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
   rows shared among the threads (qcal_units_share), fn(ctx, m0, mb, unit) computing one tile. */
typedef void (*qcal_unit_fn)(const void *ctx, int64_t m0, int mb, int64_t unit);

/* A thread's share of a job's units, [front, back) packed in one word: its owner claims from the front, a thread out
   of work steals from the back. */
struct alignas(64) qcal_share_range {
    std::atomic<uint64_t> fb;
};
#define QCAL_MAX_SHARES 64

typedef struct {
    int64_t M, units, first; /* units first .. first + units - 1 (fewer than 2^32) */
    const void *ctx;
    qcal_unit_fn fn;
    int shares;
    mutable qcal_share_range share[QCAL_MAX_SHARES];
} qcal_units_job;

/* Takes one unit from the front (own) or back (steal) of a share; false when it is empty. */
static inline bool qcal_take(std::atomic<uint64_t> &fb, bool front, int64_t *p) {
    uint64_t cur = fb.load(std::memory_order_relaxed);
    for (;;) {
        const uint64_t f = cur & 0xffffffffu, b = cur >> 32;
        if (f >= b) return false;
        const uint64_t next = front ? cur + 1 : cur - (uint64_t(1) << 32);
        if (fb.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
            *p = (int64_t)(front ? f : b - 1);
            return true;
        }
    }
}

/* Thread t's units: its own share front to back, then the rest of the others' shares from their backs, so that a
   thread slowed for a while (its core shared with another process, a busier cache) does fewer units instead of
   holding the others at the join. Each unit runs for every block of input rows (its weight stays in L1); the outputs
   are disjoint, so no barrier is needed. */
static void qcal_units_share(const void *arg, int t, int T) {
    const qcal_units_job *j = (const qcal_units_job *)arg;
    auto unit = [j](int64_t p) {
        for (int64_t m0 = 0; m0 < j->M; m0 += 4)
            j->fn(j->ctx, m0, j->M - m0 < 4 ? (int)(j->M - m0) : 4, j->first + p);
    };
    int64_t p;
    if (t < j->shares)
        while (qcal_take(j->share[t].fb, true, &p)) unit(p);
    for (int s = 1; s < j->shares; s++) {
        const int o = (t + s) % j->shares;
        while (qcal_take(j->share[o].fb, false, &p)) unit(p);
    }
}

static inline void qcal_units_init(qcal_units_job *j, int64_t M, int64_t first, int64_t units, int nthreads,
                                   const void *ctx, qcal_unit_fn fn) {
    j->M = M;
    j->first = first;
    j->units = units;
    j->ctx = ctx;
    j->fn = fn;
    j->shares = nthreads < 1 ? 1 : nthreads < QCAL_MAX_SHARES ? nthreads : QCAL_MAX_SHARES;
    for (int s = 0; s < j->shares; s++) {
        int64_t lo, hi;
        qcal_share(units, s, j->shares, &lo, &hi);
        j->share[s].fb.store((uint64_t)lo | (uint64_t)hi << 32, std::memory_order_relaxed);
    }
}

/* Shares the units of fn among the threads (one share per thread of nthreads, at most QCAL_MAX_SHARES; a share's
   bounds are 32-bit, so more than 2^31 units run as several jobs). */
static inline void qcal_run_units(int64_t M, int64_t units, int nthreads, const void *ctx, qcal_unit_fn fn) {
    const int64_t most = int64_t(1) << 31;
    for (int64_t first = 0; first < units; first += most) {
        qcal_units_job job;
        qcal_units_init(&job, M, first, units - first < most ? units - first : most, nthreads, ctx, fn);
        qcal_parallel(nthreads, qcal_units_share, &job);
    }
}

/* Several kernels' units as one pool (the weights of one input, each with its own context): pooled unit p with
   first[i] <= p < first[i + 1] runs fn(ctxs[i], m0, mb, p - first[i]). Run with qcal_run_units(M, first[n], ...,
   job, qcal_parts_unit). */
typedef struct {
    const void *const *ctxs;
    const int64_t *first; /* n + 1 entries */
    int n;
    qcal_unit_fn fn;
} qcal_parts_job;

static inline void qcal_parts_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const qcal_parts_job *j = (const qcal_parts_job *)c;
    int i = 0;
    while (i + 1 < j->n && j->first[i + 1] <= p) i++;
    j->fn(j->ctxs[i], m0, mb, p - j->first[i]);
}

#endif
