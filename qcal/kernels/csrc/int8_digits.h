/* The int8 weight-only digit kernel's driver, shared by the AVX-512 (int8_small_m.cpp) and AVX2
   (csrc_avx2/mm_avx2.cpp) builds: each activation row as exact fixed-point digit planes, tiles of up to 4 weight
   rows per input row split among the threads, rows holding NaN / Inf (and K > DIGITS_MAX_K) through the widening
   kernel. The including file defines what differs: qcal_digit_t and QCAL_DIGIT_PLANES (the digits' type and
   count), QCAL_DIGIT_PAD (the planes' column padding), DIGITS_MAX_K, row_digits, w8a16_small and
   QCAL_TILE_DIGITS(RB, d, Kp, K, w, wsum, ws, E, y). */
#ifndef QCAL_INT8_DIGITS_H
#define QCAL_INT8_DIGITS_H

typedef struct {
    const qcal_digit_t *d; /* (M, QCAL_DIGIT_PLANES, Kp) digit planes */
    const int *E;
    const int8_t *w;
    const int32_t *wsum;
    const float *ws;
    uint16_t *y;
    int64_t N, K, Kp;
} digits_ctx;

static void digits_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const digits_ctx *a = (const digits_ctx *)c;
    const int64_t n0 = 4 * p, N = a->N, K = a->K, Kp = a->Kp;
    const int rb = N - n0 < 4 ? (int)(N - n0) : 4;
    for (int64_t m = m0; m < m0 + mb; m++) {
        const qcal_digit_t *d = a->d + m * QCAL_DIGIT_PLANES * Kp;
#define TD(RB) QCAL_TILE_DIGITS(RB, d, Kp, K, a->w + n0 * K, a->wsum + n0, a->ws + n0, a->E[m], a->y + m * N + n0)
        switch (rb) {
        case 1: TD(1); break;
        case 2: TD(2); break;
        case 3: TD(3); break;
        default: TD(4); break;
        }
#undef TD
    }
}

/* x (M, K) bf16; w (N, K) int8; wsum (N) int32 row sums; ws (N) fp32; y (M, N) bf16. Returns 0, -1 (arguments), -2
   (memory). */
static int w8a16_digits(const uint16_t *x, const int8_t *w, const int32_t *wsum, const float *ws, uint16_t *y,
                        int64_t M, int64_t N, int64_t K, int nthreads) {
    if (K <= 0 || N < 0 || M < 0) return -1;
    if (K > DIGITS_MAX_K) return w8a16_small(x, w, ws, y, M, N, K, nthreads);
    const int64_t Kp = (K + QCAL_DIGIT_PAD - 1) / QCAL_DIGIT_PAD * QCAL_DIGIT_PAD;
    qcal_digit_t *d = (qcal_digit_t *)malloc((size_t)(M > 0 ? M : 1) * QCAL_DIGIT_PLANES * (size_t)Kp *
                                             sizeof(qcal_digit_t));
    int *E = (int *)malloc((size_t)(M > 0 ? M : 1) * sizeof(int));
    if (!d || !E) {
        free(d);
        free(E);
        return -2;
    }
    int bad = 0;
    for (int64_t m = 0; m < M && !bad; m++) bad = row_digits(x + m * K, K, Kp, d + m * QCAL_DIGIT_PLANES * Kp, E + m);
    int rc = 0;
    if (bad) {
        rc = w8a16_small(x, w, ws, y, M, N, K, nthreads);
    } else {
        const digits_ctx ctx = {d, E, w, wsum, ws, y, N, K, Kp};
        qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, digits_unit);
    }
    free(d);
    free(E);
    return rc;
}

#endif
