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

#endif
