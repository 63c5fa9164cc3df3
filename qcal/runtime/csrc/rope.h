// Rotary embedding (rotate-half form, Hugging Face's bf16 rounding) of head rows into any strided destination, or
// a plain strided copy: shared by the rope_store operator and the fused decode-step attention.
#ifndef QCAL_ROPE_H
#define QCAL_ROPE_H

#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"

#define QCAL_ROPE_MAX_D 512

static inline int rope_rows(const uint16_t *src, int64_t src_tok_stride, uint16_t *dst, int64_t dst_tok_stride,
                    int64_t dst_head_stride, int64_t m, int64_t heads, int64_t d, const uint16_t *cos,
                    const uint16_t *sin) {
    if (m < 0 || heads <= 0 || d <= 0 || d % 2 || d > QCAL_ROPE_MAX_D) return -1;
    const int64_t half = d / 2;
    float row[QCAL_ROPE_MAX_D] __attribute__((aligned(64)));
    for (int64_t t = 0; t < m; t++) {
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *s = src + t * src_tok_stride + h * d;
            uint16_t *o = dst + t * dst_tok_stride + h * dst_head_stride;
            if (!cos) {
                for (int64_t j = 0; j < d; j += 16) {
                    const __mmask16 live = qcal_tail16(d - j);
                    _mm256_mask_storeu_epi16(o + j, live, _mm256_maskz_loadu_epi16(live, s + j));
                }
                continue;
            }
            for (int64_t j = 0; j < d; j += 16) {  // read the whole row first: src may be dst
                const __mmask16 live = qcal_tail16(d - j);
                _mm512_mask_storeu_ps(row + j, live, qcal_load_bf16_masked(s + j, live));
            }
            const uint16_t *c = cos + t * d, *sn = sin + t * d;
            for (int64_t j = 0; j < d; j += 16) {
                const __mmask16 live = qcal_tail16(d - j);
                __m512 rot;  // rotate_half: (-x2, x1)
                if (j + 16 <= half) {
                    rot = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(row + half + j));
                } else if (j >= half) {
                    rot = _mm512_loadu_ps(row + j - half);
                } else {  // a block straddling the middle (half not a multiple of 16)
                    float tmp[16];
                    for (int64_t i = 0; i < 16; i++) {
                        const int64_t jj = j + i;
                        tmp[i] = jj >= d ? 0.0f : (jj < half ? -row[jj + half] : row[jj - half]);
                    }
                    rot = _mm512_loadu_ps(tmp);
                }
                const __m512 a = qcal_round_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + j),
                                                          qcal_load_bf16_masked(c + j, live)));
                const __m512 b = qcal_round_bf16(_mm512_mul_ps(rot, qcal_load_bf16_masked(sn + j, live)));
                qcal_store_bf16_masked(o + j, _mm512_add_ps(a, b), live);
            }
        }
    }
    return 0;
}

#endif
