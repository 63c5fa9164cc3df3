/* The shapes the int4 kernels of both builds (int4_small_m.cpp, csrc_avx2/int4_avx2.cpp) take. */
#ifndef QCAL_INT4_SHAPE_H
#define QCAL_INT4_SHAPE_H

#include <immintrin.h>
#include <stdint.h>

#define MAX_GROUPS 1024

/* Blocks of 16 rows, octets of 8 columns, groups of a multiple of 8 dividing K. */
static inline bool w4_fits(int64_t N, int64_t K, int64_t gs) {
    return N > 0 && K > 0 && N % 16 == 0 && K % 8 == 0 && gs > 0 && gs % 8 == 0 && K % gs == 0 &&
           K / gs <= MAX_GROUPS && K <= (1 << 26);
}

/* The scales' planes (pack_scales): 1 (scales) or 2 (scales, offsets); has_zero reads the offsets. */
static inline bool w4_planes_fit(int planes, int has_zero) { return planes == 2 || (planes == 1 && !has_zero); }

/* The line the int4 kernels of both builds prefetch as they read the one at p: the same offset in the next unit (a
   pair of 16-row blocks, 2 bstride bytes on), the thread's next unit as it takes its share front to back. A unit of
   the model's matrices is a few KiB, so a stream prefetched only a few lines ahead started each unit with DRAM
   misses: SmolLM2 int4wo decode on the AVX2 CPU 99 -> 118 tok/s (256 bytes ahead -> the next unit; 16 interleaved
   rounds, 2 threads), 8da4w and 4096 x 11008 weights equal; on the AVX-512 CPU the decode step (2 threads, the two
   builds alternating, either first) int4wo-64 3.39 -> 3.07 and 4.56 -> 3.11 ms, 8da4w-64 2.30 -> 1.90 and 2.81 ->
   1.98 (one earlier run in a busier hour: 3.8 -> 4.6 and 2.4 -> 2.5). */
static inline void prefetch_next_unit(const uint8_t *p, int64_t bstride) {
    _mm_prefetch((const char *)(p + 2 * bstride), _MM_HINT_T0);
}

#endif
