/* The shapes the int4 kernels of both builds (int4_small_m.cpp, csrc_avx2/int4_avx2.cpp) take. */
#ifndef QCAL_INT4_SHAPE_H
#define QCAL_INT4_SHAPE_H

#include <stdint.h>

#define MAX_GROUPS 1024

/* Blocks of 16 rows, octets of 8 columns, groups of a multiple of 8 dividing K. */
static inline bool w4_fits(int64_t N, int64_t K, int64_t gs) {
    return N > 0 && K > 0 && N % 16 == 0 && K % 8 == 0 && gs > 0 && gs % 8 == 0 && K % gs == 0 &&
           K / gs <= MAX_GROUPS && K <= (1 << 26);
}

/* The scales' planes (pack_scales): 1 (scales) or 2 (scales, offsets); has_zero reads the offsets. */
static inline bool w4_planes_fit(int planes, int has_zero) { return planes == 2 || (planes == 1 && !has_zero); }

#endif
