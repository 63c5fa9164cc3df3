/* The int8-weight operators (w8a8_mm_small, w8a16_mm_vnni, w8a16_mm_small), fp8 weight-only (wf8a16_mm_small: the
   int8 widening kernel on float8 e4m3fn bytes) and fp8 with dynamic fp8 activations (wf8a8_mm: the activations'
   quantization, that kernel on their codes and the rescale in one call): argument checks, calls and registrations,
   shared by the AVX-512 (int8_small_m.cpp) and AVX2 (csrc_avx2/mm_avx2.cpp) builds. Included after the kernels they
   call: w8a8_small, w8a16_digits, w8a16_small (its last argument: fp8 bytes). */
#ifndef QCAL_INT8_API_H
#define QCAL_INT8_API_H

#include <float.h>

#include <cmath>
#include <cstring>

#include "bf16_scalar.h"
#include "bound.h"

/* w (N, K) int8, contiguous; ws (N) fp32. */
static void w8_weight_checked(const char *op, const at::Tensor &w, const at::Tensor &ws) {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0, op, ": w must be (N, K), got ", w.sizes());
    qcal::check_tensor(op, "w", w, at::kChar, w.sizes());
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
}

/* x (M, K) bf16 and the weight as above [; wsum (N) int32]. */
static at::Tensor w8_checked(const char *op, const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    w8_weight_checked(op, w, ws);
    return qcal::rows(op, x, w.size(1));
}

/* The operators over an int8 weight with its row sums (A8W8, and A16W8 through the activation digits): the same
   arguments, checked once, for `kernel`. */
typedef int (*w8_sums_kernel)(const uint16_t *, const int8_t *, const int32_t *, const float *, uint16_t *, int64_t,
                              int64_t, int64_t, int);

static at::Tensor w8_sums_op(const char *op, w8_sums_kernel kernel, const at::Tensor &x, const at::Tensor &w,
                             const at::Tensor &wsum, const at::Tensor &ws) {
    at::Tensor xc = w8_checked(op, x, w, ws), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "wsum", wsum, at::kInt, {w.size(0)});
    qcal::check_rc(op, kernel(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<int32_t>(wsum),
                              qcal::in<float>(ws), qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1),
                              qcal::threads()));
    return y;
}

static at::Tensor w8a8_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum,
                                const at::Tensor &ws) {
    return w8_sums_op("qcal::w8a8_mm_small", w8a8_small, x, w, wsum, ws);
}

static at::Tensor w8a16_mm_vnni(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum,
                                const at::Tensor &ws) {
    return w8_sums_op("qcal::w8a16_mm_vnni", w8a16_digits, x, w, wsum, ws);
}

static at::Tensor w8a16_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    const char *op = "qcal::w8a16_mm_small";
    at::Tensor xc = w8_checked(op, x, w, ws), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, w8a16_small(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<float>(ws),
                                   qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), qcal::threads()));
    return y;
}

/* The decode step's bindings (bound.h): args (w, wsum, ws) for the operators with row sums, (w, ws). */
template <w8_sums_kernel kernel> static qcal::Bound w8_sums_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), wsum = a[1].toTensor(), ws = a[2].toTensor();
    w8_weight_checked(op, w, ws);
    qcal::check_tensor(op, "wsum", wsum, at::kInt, {w.size(0)});
    const int64_t N = w.size(0), K = w.size(1);
    const int8_t *wp = qcal::in<int8_t>(w);
    const int32_t *sp = qcal::in<int32_t>(wsum);
    const float *wsp = qcal::in<float>(ws);
    return {K, N, {w, wsum, ws}, [=](const uint16_t *x, uint16_t *y) {
                return kernel(x, wp, sp, wsp, y, 1, N, K, qcal::threads());
            }};
}

static qcal::Bound w8a16_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), ws = a[1].toTensor();
    w8_weight_checked(op, w, ws);
    const int64_t N = w.size(0), K = w.size(1);
    const int8_t *wp = qcal::in<int8_t>(w);
    const float *wsp = qcal::in<float>(ws);
    return {K, N, {w, ws}, [=](const uint16_t *x, uint16_t *y) {
                return w8a16_small(x, wp, wsp, y, 1, N, K, qcal::threads());
            }};
}

/* fp8 weight-only: w (N, K) float8_e4m3fn, contiguous; ws (N) fp32. */
static void wf8_weight_checked(const char *op, const at::Tensor &w, const at::Tensor &ws) {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0, op, ": w must be (N, K), got ", w.sizes());
    qcal::check_tensor(op, "w", w, at::kFloat8_e4m3fn, w.sizes());
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
}

static at::Tensor wf8a16_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    const char *op = "qcal::wf8a16_mm_small";
    wf8_weight_checked(op, w, ws);
    at::Tensor xc = qcal::rows(op, x, w.size(1)), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, w8a16_small(qcal::in<uint16_t>(xc), static_cast<const int8_t *>(w.const_data_ptr()),
                                   qcal::in<float>(ws), qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1),
                                   qcal::threads(), true));
    return y;
}

/* v rounded to the nearest float8 e4m3fn value (ties to even), for |v| <= 448 or NaN, as PyTorch converts: below
   2^-6 a multiple of 2^-9, else 3 mantissa bits. */
static inline float qcal_e4m3_round(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    const uint32_t sign = b & 0x80000000u, a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return v;
    uint32_t r;
    if (a < (121u << 23)) { /* below 2^-6 */
        float f;
        std::memcpy(&f, &a, 4);
        f = std::nearbyint(f * 512.0f) * 0x1p-9f; /* exact scalings; the default rounding: to nearest even */
        std::memcpy(&r, &f, 4);
    } else {
        r = (a + 0x7ffffu + ((a >> 20) & 1)) & 0xfff00000u;
    }
    r |= sign;
    float out;
    std::memcpy(&out, &r, 4);
    return out;
}

/* fp8dq: x (M, K) bf16 quantized as the reference does (qcal.kernels.cpu._fp8_codes): s = max(amax / 448, FLT_MIN)
   per row (per_token) or over all of x, codes = e4m3(clamp(x / s, +-448)) (a row, or x, holding NaN or Inf: a NaN or
   infinite scale, NaN outputs as there); y = bf16(bf16(sum_k code w) ws[n] s) with the fp8 kernel on the codes (unit
   scales), the product rounded to bf16 once, then both scales in fp32: the reference path's numbers. w (N, K) float8
   e4m3fn, ws (N) fp32. Returns 0, -1 (arguments), -2 (memory). */
static int wf8a8(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N, int64_t K,
                 bool per_token, int nthreads) {
    if (K <= 0 || N < 0 || M < 0) return -1;
    if (M == 0 || N == 0) return 0;
    uint16_t *xq = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(M * K + M * N));
    float *buf = (float *)malloc(sizeof(float) * (size_t)(M + N));
    if (!xq || !buf) {
        free(xq);
        free(buf);
        return -2;
    }
    uint16_t *yq = xq + M * K;
    float *s = buf, *ones = buf + M;
    for (int64_t n = 0; n < N; n++) ones[n] = 1.0f;
    auto amax_of = [&](int64_t m0, int64_t m1) { /* NaN where a value is NaN, as torch.amax */
        float a = 0.0f;
        for (int64_t i = m0 * K; i < m1 * K; i++) {
            const float v = std::fabs(qcal_bf16_to_float(x[i]));
            a = v != v ? v : (a != a ? a : (v > a ? v : a));
        }
        const float t = a / 448.0f;
        return t < FLT_MIN ? FLT_MIN : t; /* NaN stays NaN (clamp_min) */
    };
    if (!per_token) {
        const float t = amax_of(0, M);
        for (int64_t m = 0; m < M; m++) s[m] = t;
    }
    for (int64_t m = 0; m < M; m++) {
        if (per_token) s[m] = amax_of(m, m + 1);
        for (int64_t k = 0; k < K; k++) {
            float v = qcal_bf16_to_float(x[m * K + k]) / s[m];
            v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v); /* NaN stays NaN */
            xq[m * K + k] = qcal_float_to_bf16(qcal_e4m3_round(v)); /* exact in bf16 */
        }
    }
    int rc = w8a16_small(xq, w, ones, yq, M, N, K, nthreads, true);
    if (rc == 0)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++)
                y[m * N + n] = qcal_float_to_bf16(qcal_bf16_to_float(yq[m * N + n]) * ws[n] * s[m]);
    free(xq);
    free(buf);
    return rc;
}

static at::Tensor wf8a8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws, bool per_token) {
    const char *op = "qcal::wf8a8_mm";
    wf8_weight_checked(op, w, ws);
    at::Tensor xc = qcal::rows(op, x, w.size(1)), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, wf8a8(qcal::in<uint16_t>(xc), static_cast<const int8_t *>(w.const_data_ptr()),
                             qcal::in<float>(ws), qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), per_token,
                             qcal::threads()));
    return y;
}

/* The decode step's binding of an fp8 operator: args (w, ws[, per_token]); KERNEL runs one row. */
template <int (*KERNEL)(const uint16_t *, const int8_t *, const float *, uint16_t *, int64_t, int64_t)>
static qcal::Bound wf8_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), ws = a[1].toTensor();
    wf8_weight_checked(op, w, ws);
    const int64_t N = w.size(0), K = w.size(1);
    const int8_t *wp = static_cast<const int8_t *>(w.const_data_ptr());
    const float *wsp = qcal::in<float>(ws);
    return {K, N, {w, ws}, [=](const uint16_t *x, uint16_t *y) { return KERNEL(x, wp, wsp, y, N, K); }};
}

static int wf8a16_row(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t N, int64_t K) {
    return w8a16_small(x, w, ws, y, 1, N, K, qcal::threads(), true);
}

static int wf8a8_row(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t N, int64_t K) {
    return wf8a8(x, w, ws, y, 1, N, K, true, qcal::threads()); /* one row: per token and per tensor agree */
}

static const qcal::BindAs wf8a16_bound("wf8a16_mm_small", wf8_bind<wf8a16_row>),
    wf8a8_bound("wf8a8_mm", wf8_bind<wf8a8_row>);

static const qcal::BindAs w8a8_bound("w8a8_mm_small", w8_sums_bind<w8a8_small>),
    w8a16_vnni_bound("w8a16_mm_vnni", w8_sums_bind<w8a16_digits>), w8a16_bound("w8a16_mm_small", w8a16_bind);

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w8a8_mm_small(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("w8a16_mm_small(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("w8a16_mm_vnni(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("wf8a16_mm_small(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("wf8a8_mm(Tensor x, Tensor w, Tensor ws, bool per_token) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w8a8_mm_small", &w8a8_mm_small);
    m.impl("w8a16_mm_small", &w8a16_mm_small);
    m.impl("w8a16_mm_vnni", &w8a16_mm_vnni);
    m.impl("wf8a16_mm_small", &wf8a16_mm_small);
    m.impl("wf8a8_mm", &wf8a8_mm);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("w8a8_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("w8a16_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("w8a16_mm_vnni", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("wf8a16_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("wf8a8_mm", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, bool) {
        return qcal::matmul_meta(x, w);
    });
}

#endif
