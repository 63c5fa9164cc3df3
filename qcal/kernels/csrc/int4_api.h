/* The int4 operators (w4_fits, w4a16_mm_small, w4a8_mm): schemas, argument checks and registrations, shared by the
   AVX-512 (int4_small_m.cpp) and AVX2 (csrc_avx2/int4_avx2.cpp) builds. Included after what it calls: w4_fits, mm,
   mm_vnni and MAX_GROUPS. */
#ifndef QCAL_INT4_API_H
#define QCAL_INT4_API_H

/* ------------------------------------------------------------------ operators */

#include "bound.h"

/* sz's planes: 1 (the scales alone, a symmetric weight) where its third dimension is 1, else 2 (checked). */
static int w4_planes(const at::Tensor &sz) { return sz.dim() == 4 && sz.size(2) == 1 ? 1 : 2; }

/* w (N, K/2) uint8 in `layout`; sz (N/16, K/gs, planes, 16) bf16 (pack_scales: the scales, then the offsets where
   there are any; planes 1 or 2). Returns K. */
static int64_t w4_weight_checked(const char *op, const at::Tensor &w, const at::Tensor &sz, int64_t group_size) {
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K/2), got ", w.sizes());
    const int64_t N = w.size(0), K = 2 * w.size(1);
    TORCH_CHECK_VALUE(w4_fits(N, K, group_size), op, ": unsupported shape N=", N, " K=", K, " group_size=",
                      group_size, " (N % 16, K % 8, group_size % 8 == 0, dividing K, at most ", MAX_GROUPS,
                      " groups)");
    qcal::check_tensor(op, "w", w, at::kByte, {N, K / 2});
    qcal::check_tensor(op, "sz", sz, at::kBFloat16, {N / 16, K / group_size, w4_planes(sz), 16});
    return K;
}

/* x (M, K) bf16 and the weight as above. */
static at::Tensor w4_checked(const char *op, const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz,
                             int64_t group_size) {
    return qcal::rows(op, x, w4_weight_checked(op, w, sz, group_size));
}

/* has_zero needs the offsets' plane. */
static void w4_zero_checked(const char *op, const at::Tensor &sz, bool has_zero) {
    TORCH_CHECK_VALUE(w4_planes_fit(w4_planes(sz), has_zero), op,
                      ": has_zero needs sz with the offsets (N/16, K/group_size, 2, 16), got ", sz.sizes());
}

static at::Tensor w4a16_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                 int64_t group_size) {
    const char *op = "qcal::w4a16_mm_small";
    at::Tensor xc = w4_checked(op, x, w, sz, group_size), y = qcal::matmul_out(xc, w);
    w4_zero_checked(op, sz, has_zero);
    qcal::check_rc(op, w4a16_small(qcal::in<uint16_t>(xc), qcal::in<uint8_t>(w), qcal::in<uint16_t>(sz),
                                   w4_planes(sz), has_zero ? 1 : 0, qcal::out<uint16_t>(y), xc.size(0), w.size(0),
                                   xc.size(1), group_size, qcal::threads()));
    return y;
}

static at::Tensor w4a8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, int64_t group_size) {
    const char *op = "qcal::w4a8_mm";
    at::Tensor xc = w4_checked(op, x, w, sz, group_size), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, w4a8(qcal::in<uint16_t>(xc), qcal::in<uint8_t>(w), qcal::in<uint16_t>(sz), w4_planes(sz),
                            qcal::out<uint16_t>(y), xc.size(0), w.size(0), xc.size(1), group_size, qcal::threads()));
    return y;
}

/* The decode step's bindings (bound.h): args (w, sz, has_zero, group_size) and (w, sz, group_size). */
static qcal::Bound w4a16_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), sz = a[1].toTensor();
    const int has_zero = a[2].toBool() ? 1 : 0, planes = w4_planes(sz);
    const int64_t gs = a[3].toInt(), K = w4_weight_checked(op, w, sz, gs), N = w.size(0);
    w4_zero_checked(op, sz, has_zero);
    const uint8_t *wp = qcal::in<uint8_t>(w);
    const uint16_t *szp = qcal::in<uint16_t>(sz);
    return {K, N, {w, sz}, [=](const uint16_t *x, uint16_t *y) {
                return w4a16_small(x, wp, szp, planes, has_zero, y, 1, N, K, gs, qcal::threads());
            }};
}

static qcal::Bound w4a8_bind(const char *op, const std::vector<c10::IValue> &a) {
    const at::Tensor w = a[0].toTensor(), sz = a[1].toTensor();
    const int64_t gs = a[2].toInt(), K = w4_weight_checked(op, w, sz, gs), N = w.size(0);
    const int planes = w4_planes(sz);
    const uint8_t *wp = qcal::in<uint8_t>(w);
    const uint16_t *szp = qcal::in<uint16_t>(sz);
    return {K, N, {w, sz}, [=](const uint16_t *x, uint16_t *y) {
                return w4a8(x, wp, szp, planes, y, 1, N, K, gs, qcal::threads());
            }};
}

static const qcal::BindAs w4a16_bound("w4a16_mm_small", w4a16_bind), w4a8_bound("w4a8_mm", w4a8_bind);

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w4_fits(int n, int k, int group_size) -> bool", [](int64_t n, int64_t k, int64_t gs) {
        return w4_fits(n, k, gs);
    });
    m.def("w4a16_mm_small(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor");
    m.def("w4a8_mm(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w4a16_mm_small", &w4a16_mm_small);
    m.impl("w4a8_mm", &w4a8_mm);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("w4a16_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, bool, int64_t) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("w4a8_mm", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, int64_t) {
        return qcal::matmul_meta(x, w);
    });
}


#endif
