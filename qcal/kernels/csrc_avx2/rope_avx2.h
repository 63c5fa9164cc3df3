/* Rotary embedding (rotate-half form, Hugging Face's bf16 rounding) of head rows into any strided destination, or a
   plain strided copy, AVX2: shared by the rope_store operator and the fused decode-step attention. The AVX-512
   rope.h's arithmetic in 8-lane halves of its 16-lane blocks, so every value rounds as there; rotate_half's negation
   is even reproduced to the sign of zero (0 - x in whole blocks, -x in a block that straddles the middle). */
#ifndef QCAL_ROPE_AVX2_H
#define QCAL_ROPE_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "avx2.h"

#define QCAL_ROPE_MAX_D 512

static inline int rope_rows(const uint16_t *src, int64_t src_tok_stride, uint16_t *dst, int64_t dst_tok_stride,
                            int64_t dst_head_stride, int64_t m, int64_t heads, int64_t d, const uint16_t *cos,
                            const uint16_t *sin) {
    if (m < 0 || heads <= 0 || d <= 0 || d % 2 || d > QCAL_ROPE_MAX_D) return -1;
    const int64_t half = d / 2;
    float row[QCAL_ROPE_MAX_D] __attribute__((aligned(32)));
    for (int64_t t = 0; t < m; t++) {
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *s = src + t * src_tok_stride + h * d;
            uint16_t *o = dst + t * dst_tok_stride + h * dst_head_stride;
            if (!cos) { /* 16 values at a time, each read before it is written, as the AVX-512 kernel copies */
                for (int64_t j = 0; j < d; j += 16) {
                    uint16_t tmp[16];
                    const size_t bytes = (size_t)(d - j < 16 ? d - j : 16) * 2;
                    memcpy(tmp, s + j, bytes);
                    memcpy(o + j, tmp, bytes);
                }
                continue;
            }
            /* the whole row first (src may be dst); lanes past d up to a multiple of 8 hold zeros */
            for (int64_t j = 0; j < d; j += 8)
                _mm256_store_ps(row + j, d - j >= 8 ? qcal_load8_bf16(s + j) : qcal_load8_bf16_tail(s + j, d - j));
            const uint16_t *c = cos + t * d, *sn = sin + t * d;
            for (int64_t j = 0; j < d; j += 8) {
                const int64_t left = d - j, j16 = j & ~(int64_t)15; /* j16: the AVX-512 kernel's 16-lane block */
                __m256 rot; /* rotate_half: (-x2, x1) */
                if (j16 + 16 <= half) {
                    rot = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(row + half + j));
                } else if (j16 >= half) {
                    rot = _mm256_loadu_ps(row + j - half);
                } else { /* a block straddling the middle (half not a multiple of 16) */
                    float tmp[8] __attribute__((aligned(32)));
                    for (int64_t i = 0; i < 8; i++) {
                        const int64_t jj = j + i;
                        tmp[i] = jj >= d ? 0.0f : (jj < half ? -row[jj + half] : row[jj - half]);
                    }
                    rot = _mm256_load_ps(tmp);
                }
                const bool full = left >= 8;
                const __m256 cv = full ? qcal_load8_bf16(c + j) : qcal_load8_bf16_tail(c + j, left);
                const __m256 sv = full ? qcal_load8_bf16(sn + j) : qcal_load8_bf16_tail(sn + j, left);
                const __m256 a = qcal_round8_bf16(_mm256_mul_ps(_mm256_load_ps(row + j), cv));
                const __m256 b = qcal_round8_bf16(_mm256_mul_ps(rot, sv));
                const __m256 y = _mm256_add_ps(a, b);
                if (full)
                    qcal_store8_bf16(o + j, y);
                else
                    qcal_store8_bf16_tail(o + j, y, left);
            }
        }
    }
    return 0;
}

#endif
