/* The bf16-weight operator (w16a16_mm_small): argument checks, call, the decode step's binding and registrations,
   shared by the AVX-512 (bf16_small_m.cpp) and AVX2 (csrc_avx2/mm_avx2.cpp) builds. Included after the kernel it
   calls: w16a16_small(x, w, y, M, N, K, nthreads). */
#ifndef QCAL_BF16_API_H
#define QCAL_BF16_API_H

#include "bound.h"

/* w (N, K) bf16, contiguous. */
static void w16_weight_checked(const char *op, const at::Tensor &w) {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0, op, ": w must be (N, K), got ", w.sizes());
    qcal::check_tensor(op, "w", w, at::kBFloat16, w.sizes());
}

/* x (M, K) bf16 and the weight as above. Returns (M, N) bf16. */
static at::Tensor w16a16_mm_small(const at::Tensor &x, const at::Tensor &w) {
    const char *op = "qcal::w16a16_mm_small";
    w16_weight_checked(op, w);
    at::Tensor xc = qcal::rows(op, x, w.size(1)), y = qcal::matmul_out(xc, w);
    w16a16_small(qcal::in<uint16_t>(xc), qcal::in<uint16_t>(w), qcal::out<uint16_t>(y), xc.size(0), w.size(0),
                 w.size(1), qcal::threads());
    return y;
}

/* The decode step's binding (bound.h): args (w). */
static qcal::Bound w16a16_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor();
    w16_weight_checked(op, w);
    const int64_t N = w.size(0), K = w.size(1);
    const uint16_t *wp = qcal::in<uint16_t>(w);
    return {K, N, {w}, [=](const uint16_t *x, uint16_t *y) {
                w16a16_small(x, wp, y, 1, N, K, qcal::threads());
                return 0;
            }};
}

static const qcal::BindAs w16a16_bound("w16a16_mm_small", w16a16_bind);

TORCH_LIBRARY_FRAGMENT(qcal, m) { m.def("w16a16_mm_small(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("w16a16_mm_small", &w16a16_mm_small); }

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("w16a16_mm_small", [](const at::Tensor &x, const at::Tensor &w) { return qcal::matmul_meta(x, w); });
}

#endif
