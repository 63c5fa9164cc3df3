/* The int8-weight operators (w8a8_mm_small, w8a16_mm_vnni, w8a16_mm_small) and fp8 weight-only (wf8a16_mm_small:
   the int8 widening kernel on float8 e4m3fn bytes): argument checks, calls and registrations, shared by the AVX-512
   (int8_small_m.cpp) and AVX2 (csrc_avx2/mm_avx2.cpp) builds. Included after the kernels they call: w8a8_small,
   w8a16_digits, w8a16_small (its last argument: fp8 bytes). */
#ifndef QCAL_INT8_API_H
#define QCAL_INT8_API_H

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

static qcal::Bound wf8a16_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), ws = a[1].toTensor();
    wf8_weight_checked(op, w, ws);
    const int64_t N = w.size(0), K = w.size(1);
    const int8_t *wp = static_cast<const int8_t *>(w.const_data_ptr());
    const float *wsp = qcal::in<float>(ws);
    return {K, N, {w, ws}, [=](const uint16_t *x, uint16_t *y) {
                return w8a16_small(x, wp, wsp, y, 1, N, K, qcal::threads(), true);
            }};
}

static const qcal::BindAs wf8a16_bound("wf8a16_mm_small", wf8a16_bind);

static const qcal::BindAs w8a8_bound("w8a8_mm_small", w8_sums_bind<w8a8_small>),
    w8a16_vnni_bound("w8a16_mm_vnni", w8_sums_bind<w8a16_digits>), w8a16_bound("w8a16_mm_small", w8a16_bind);

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w8a8_mm_small(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("w8a16_mm_small(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("w8a16_mm_vnni(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("wf8a16_mm_small(Tensor x, Tensor w, Tensor ws) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w8a8_mm_small", &w8a8_mm_small);
    m.impl("w8a16_mm_small", &w8a16_mm_small);
    m.impl("w8a16_mm_vnni", &w8a16_mm_vnni);
    m.impl("wf8a16_mm_small", &wf8a16_mm_small);
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
}

#endif
