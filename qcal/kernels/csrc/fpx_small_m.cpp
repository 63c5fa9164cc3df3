/* qcal: small-M weight-only matmul over sub-byte float weights (fp6 e3m2, fp5 e2m2, fp4 e2m1), AVX512-BF16.

   y[m, n] = sum_g ws[n, g] * sum_{k in group g} x[m, k] * v(code[n, k]),   v = the format's value of a code.

   The weight is read in place in its canonical bit planes (qcal.primitives.pack): per row, the low 4 bits of
   every code two a byte, then the high bits (2 a code for fp6, 1 for fp5) packed low first. 32 codes become 32
   exact bf16 values in registers (the nibbles interleaved, the high bits spread by a lane permute and a variable
   shift, then a table lookup of 16 / 32 / 64 entries: every value of these formats has at most 3 significant
   bits) and one vdpbf16ps multiplies them with 32 activations; each group's partial sums are scaled once. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"
#include "tiles.h"
#include "ops.h"

#define AI static inline __attribute__((always_inline))

/* Codes k .. k + 31 of a row (k a multiple of 32) as 16-bit lanes: the nibbles interleaved, then (fp6, fp5) the
   high bits, hb a code and 8 / hb codes a byte: lane j takes byte j / (8 / hb) shifted right by hb * (j % (8 / hb)). */
template <int BITS> AI __m512i fpx_codes32(const uint8_t *lo, const uint8_t *hi, int64_t k) {
    const __m128i b = _mm_loadu_si128((const __m128i *)(lo + k / 2));
    const __m128i nib = _mm_set1_epi8(0x0F);
    const __m128i l = _mm_and_si128(b, nib), h = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
    const __m512i codes = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h)));
    if (BITS == 4) return codes;
    const int hb = BITS - 4, per_log2 = hb == 2 ? 2 : 3;
    uint64_t raw;  /* constant-size loads: a 4-byte copy into 8 bytes would stall store forwarding */
    if (BITS == 6) {
        memcpy(&raw, hi + k / 4, 8);
    } else {
        uint32_t r32;
        memcpy(&r32, hi + k / 8, 4);
        raw = r32;
    }
    const __m512i lane = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                          12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx = _mm512_srli_epi16(lane, per_log2);
    const __m512i sh = _mm512_mullo_epi16(_mm512_and_si512(lane, _mm512_set1_epi16((1 << per_log2) - 1)),
                                          _mm512_set1_epi16(hb));
    const __m512i hw = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_cvtsi64_si128((int64_t)raw)));
    const __m512i top = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi16(idx, hw), sh),
                                         _mm512_set1_epi16((1 << hb) - 1));
    return _mm512_or_si512(codes, _mm512_slli_epi16(top, 4));
}

/* The bf16 values of 32 codes: lut0 holds codes 0..31, lut1 codes 32..63 (fp6 only). */
template <int BITS> AI __m512bh fpx_values32(__m512i codes, __m512i lut0, __m512i lut1) {
    return (__m512bh)(BITS == 6 ? _mm512_permutex2var_epi16(lut0, codes, lut1) : _mm512_permutexvar_epi16(codes, lut0));
}

typedef struct {
    const uint16_t *x;
    const uint8_t *w;
    const float *ws;
    const uint16_t *lut;
    uint16_t *y;
    int64_t N, K, G, row_bytes;
    int bits;
} fpx_ctx;

/* RB weight rows (1..4) x MM input rows (1..4). */
template <int BITS> AI void fpx_tile(const fpx_ctx *a, int64_t m0, int64_t n0, int RB, int MM) {
    const int64_t K = a->K, G = a->G, gs = K / G, N = a->N;
    const __m512i lut0 = _mm512_loadu_si512(a->lut);
    const __m512i lut1 = BITS == 6 ? _mm512_loadu_si512(a->lut + 32) : lut0;
    __m512 acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 part[4][4];
        for (int r = 0; r < RB; r++)
            for (int m = 0; m < MM; m++) part[r][m] = _mm512_setzero_ps();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            __m512bh wv[4];
            for (int r = 0; r < RB; r++) {
                const uint8_t *row = a->w + (n0 + r) * a->row_bytes;
                if (!(k & 127)) { /* a line of each stream ahead: the nibbles (64 codes), the high bits */
                    _mm_prefetch((const char *)(row + k / 2) + QCAL_STREAM_AHEAD, _MM_HINT_T0);
                    if (BITS > 4) {
                        const uint8_t *hi = row + K / 2 + k * (BITS - 4) / 8;
                        _mm_prefetch((const char *)hi + QCAL_STREAM_AHEAD, _MM_HINT_T0);
                    }
                }
                wv[r] = fpx_values32<BITS>(fpx_codes32<BITS>(row, row + K / 2, k), lut0, lut1);
            }
            for (int m = 0; m < MM; m++) {
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(a->x + (m0 + m) * K + k);
                for (int r = 0; r < RB; r++) part[r][m] = _mm512_dpbf16_ps(part[r][m], xv, wv[r]);
            }
        }
        for (int r = 0; r < RB; r++) {
            const __m512 s = _mm512_set1_ps(a->ws[(n0 + r) * G + g]);
            for (int m = 0; m < MM; m++) acc[r][m] = _mm512_fmadd_ps(part[r][m], s, acc[r][m]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int m = 0; m < MM; m++) a->y[(m0 + m) * N + n0 + r] = qcal_float_to_bf16(_mm512_reduce_add_ps(acc[r][m]));
}

template <int BITS> static void fpx_unit(const void *c, int64_t m0, int mb, int64_t p) {
    const fpx_ctx *a = (const fpx_ctx *)c;
    const int64_t n0 = 4 * p;
    const int rb = a->N - n0 < 4 ? (int)(a->N - n0) : 4;
#define TFX(RB, MM) fpx_tile<BITS>(a, m0, n0, RB, MM)
    QCAL_RB_X_MB(TFX)
#undef TFX
}

/* The kernel (fpx_api.h's entry): lut_pad holds 64 bf16 entries, the format's first. */
static void fpx_run(const uint16_t *x, const uint8_t *w, const float *ws, const uint16_t *lut_pad, uint16_t *y,
                    int64_t M, int64_t N, int64_t K, int64_t G, int64_t row_bytes, int bits, int nthreads) {
    const fpx_ctx ctx = {x, w, ws, lut_pad, y, N, K, G, row_bytes, bits};
    qcal_run_units(M, (N + 3) / 4, nthreads, &ctx, bits == 6 ? fpx_unit<6> : (bits == 5 ? fpx_unit<5> : fpx_unit<4>));
}

#include "fpx_api.h"  // the operator (ISA-neutral): shared with the AVX2 build
