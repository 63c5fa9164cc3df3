/* qcal: per-tensor int8 activation codes for oneDNN's int8 convolution, one pass (two when the scale is dynamic).

   codes[i] = clamp(round_half_even(x[i] / s), -128, 127) + 128   (uint8, zero point 128)

   the reference's symmetric int8 quantization (x in fp32, divided by the fp32 scale) shifted to the unsigned codes
   oneDNN reads. A dynamic scale (s <= 0 passed) is the reference's per-tensor one: max(|min|, |max|) / 127, |c| for
   a constant tensor (1 for zero), at least FLT_MIN. The input is read flat: the caller passes a 4-D tensor that is
   channels-last (or NCHW) contiguous and the codes keep its layout. NaN makes the returned scale NaN (the caller
   takes the reference path, which propagates it); +-Inf saturates like the reference's clamp, but a dynamic scale
   of a tensor holding Inf is NaN as well. */
#include <immintrin.h>
#include <stdint.h>

#include <cfloat>
#include <cmath>
#include <tuple>

#include "bf16.h"
#include "ops.h"

static inline __m512 load16(const void *x, bool bf16, int64_t i, __mmask16 k) {
    return bf16 ? qcal_load_bf16_masked((const uint16_t *)x + i, k) : _mm512_maskz_loadu_ps(k, (const float *)x + i);
}

/* min and max of x (NaN seen -> *nan = 1); n > 0 */
static void minmax(const void *x, bool bf16, int64_t n, float *mn, float *mx, int *nan, int nthreads) {
    float lo = INFINITY, hi = -INFINITY;
    int bad = 0;
#pragma omp parallel num_threads(nthreads < 1 ? 1 : nthreads) reduction(min : lo) reduction(max : hi) reduction(| : bad)
    {
        __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
        __mmask16 unord = 0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = qcal_tail16(n - i);
            const __m512 v = load16(x, bf16, i, k);
            unord |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
            vlo = _mm512_mask_min_ps(vlo, k, vlo, v);
            vhi = _mm512_mask_max_ps(vhi, k, vhi, v);
        }
        lo = _mm512_reduce_min_ps(vlo);
        hi = _mm512_reduce_max_ps(vhi);
        bad |= unord != 0;
    }
    *mn = lo;
    *mx = hi;
    *nan = bad;
}

/* codes of x with scale s; returns 1 where NaN was seen */
static int quantize(const void *x, bool bf16, int64_t n, float s, uint8_t *q, int nthreads) {
    int bad = 0;
    const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i off = _mm512_set1_epi32(128);
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static) reduction(| : bad)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = qcal_tail16(n - i);
        const __m512 v = _mm512_div_ps(load16(x, bf16, i, k), sv);
        bad |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q) != 0;
        const __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi)), off);
        _mm_mask_storeu_epi8(q + i, k, _mm512_cvtepi32_epi8(c));
    }
    return bad;
}

/* ------------------------------------------------------------------ operator */

/* x: 4-D bf16 or fp32 CPU tensor, contiguous in NCHW or channels-last order; scale > 0 static, <= 0 dynamic.
   Returns (uint8 codes in x's layout, the scale used; NaN when x holds NaN, or Inf with a dynamic scale). */
static std::tuple<at::Tensor, double> act_quant_u8(const at::Tensor &x, double scale) {
    const char *op = "qcal::act_quant_u8";
    TORCH_CHECK_TYPE((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.device().is_cpu(), op,
                     ": x must be a bf16 or float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.sizes());
    const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK_VALUE(cl || x.is_contiguous(), op, ": x must be contiguous (NCHW or channels-last)");
    TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
    at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte),
                             cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    const int64_t n = x.numel();
    if (n == 0) return {q, scale > 0 ? scale : 1.0};
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const void *src = x.const_data_ptr();
    float s = (float)scale;
    if (scale <= 0) {
        float mn, mx;
        int nan;
        minmax(src, bf16, n, &mn, &mx, &nan, qcal::threads());
        if (nan || std::isinf(mn) || std::isinf(mx)) return {q, NAN};
        if (mn == mx) {
            s = mx != 0.0f ? std::fabs(mx) : 1.0f;
        } else {
            s = std::fmax(std::fabs(mn), std::fabs(mx)) / 127.0f;
        }
        s = std::fmax(s, FLT_MIN);
    } else {
        TORCH_CHECK_VALUE(s > 0.0f && std::isfinite(s), op, ": scale ", scale, " is not a positive float32");
    }
    const int bad = quantize(src, bf16, n, s, qcal::out<uint8_t>(q), qcal::threads());
    return {q, bad ? NAN : (double)s};
}

TORCH_LIBRARY_FRAGMENT(qcal, m) { m.def("act_quant_u8(Tensor x, float scale) -> (Tensor, float)"); }

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("act_quant_u8", &act_quant_u8); }
