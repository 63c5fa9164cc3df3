/* The arguments of an A8W8 product (dynamic int8 rows x int8 weight), shared by the small-M and panel kernels. */
#ifndef QCAL_A8W8_H
#define QCAL_A8W8_H

#include <stdint.h>
#include <stdlib.h>

#include "rowquant.h"

typedef struct {
    const uint8_t *xq; /* the rows' int8 codes + 128, (M, K) */
    const int8_t *w;   /* (N, K) row-major */
    const int32_t *wsum;
    const float *ws, *xs;
    uint16_t *y;
    int64_t N, K;
} qcal_a8w8_args;

/* Quantize the M rows of x (K bf16 each) into new buffers *xq (codes + 128, for vpdpbusd's unsigned operand)
   and *xs (per-row scales), the rows split among the threads when there are many. Returns 0, or -2 (memory:
   nothing allocated). The caller frees both. */
static inline int qcal_a8w8_quantize(const uint16_t *x, int64_t M, int64_t K, int nthreads, uint8_t **xq, float **xs) {
    *xq = (uint8_t *)malloc((size_t)(M * K) + 64);
    *xs = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!*xq || !*xs) {
        free(*xq);
        free(*xs);
        return -2;
    }
    uint8_t *q = *xq;
    float *s = *xs;
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++) s[m] = qcal_quantize_row(x + m * K, K, q + m * K, 0x80);
    return 0;
}

#endif
