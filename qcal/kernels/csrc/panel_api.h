/* The weight-only panel (large-M) operators: shape rule, argument checks, calls and registrations, shared by the
   AVX-512 (panel_mm.cpp) and AVX2 (csrc_avx2/panel_avx2.cpp) builds. Each build defines the kernels declared
   here, returning 0, -1 (arguments) or -2 (memory). */
#ifndef QCAL_PANEL_API_H
#define QCAL_PANEL_API_H

#include "ops.h"

/* The shapes the panel kernels take: N % 16 == 0, K % 4 == 0 (int4: group_size > 0, a multiple of 8 dividing K;
   group_size 0: an int8 or bf16 weight). */
static bool panel_fits(int64_t N, int64_t K, int64_t gs) {
    return N > 0 && N % 16 == 0 && K > 0 && K % 4 == 0 && K <= (1 << 26) &&
           (gs == 0 || (gs > 0 && gs % 8 == 0 && K % gs == 0));
}

/* x (M, K) bf16; w (N, K) int8; ws (N) fp32; y (M, N) bf16: y = ws[n] * sum_k x[m, k] w[n, k]. */
static int w8a16_panel(const uint16_t *x, const int8_t *w, const float *ws, uint16_t *y, int64_t M, int64_t N,
                       int64_t K, int nthreads);
/* x (M, K) bf16; u (N, K / 2) canonical int4 codes (low nibble = even column); s, zp (N, K / gs) fp32 (zp may be
   NULL); y (M, N) bf16: y = sum_k x[m, k] bf16((u[n, k] - 8 - zp[n, g]) * s[n, g]). */
static int w4a16_panel(const uint16_t *x, const uint8_t *u, const float *s, const float *zp, uint16_t *y, int64_t M,
                       int64_t N, int64_t K, int64_t gs, int nthreads);

/* x (M, K) bf16 and a weight of N rows that panel_fits; returns x contiguous. */
static at::Tensor panel_checked(const char *op, const at::Tensor &x, const at::Tensor &w, at::ScalarType dtype,
                                int64_t K, int64_t gs) {
    TORCH_CHECK_VALUE(panel_fits(w.size(0), K, gs), op, ": unsupported shape N=", w.size(0), " K=", K,
                      " group_size=", gs, " (N % 16 == 0, K % 4 == 0; int4: groups of a multiple of 8 dividing K)");
    qcal::check_tensor(op, "w", w, dtype, w.sizes());
    return qcal::rows(op, x, K);
}

static at::Tensor w8a16_mm_panel(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    const char *op = "qcal::w8a16_mm_panel";
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be (N, K), got ", w.sizes());
    at::Tensor xc = panel_checked(op, x, w, at::kChar, w.size(1), 0), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
    qcal::check_rc(op, w8a16_panel(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<float>(ws),
                                   qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), qcal::threads()));
    return y;
}

static at::Tensor w4a16_mm_panel(const at::Tensor &x, const at::Tensor &qweight, const at::Tensor &scale,
                                 const std::optional<at::Tensor> &zero_point, int64_t group_size) {
    const char *op = "qcal::w4a16_mm_panel";
    TORCH_CHECK_VALUE(qweight.dim() == 2 && group_size > 0, op, ": qweight must be (N, K/2) and group_size > 0, got ",
                      qweight.sizes(), ", ", group_size);
    const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
    at::Tensor xc = panel_checked(op, x, qweight, at::kByte, K, group_size), y = qcal::matmul_out(xc, qweight);
    qcal::check_tensor(op, "scale", scale, at::kFloat, {N, K / group_size});
    at::Tensor zp = zero_point.has_value() ? *zero_point : at::Tensor();
    if (zp.defined()) qcal::check_tensor(op, "zero_point", zp, at::kFloat, {N, K / group_size});
    qcal::check_rc(op, w4a16_panel(qcal::in<uint16_t>(xc), qcal::in<uint8_t>(qweight), qcal::in<float>(scale),
                                   qcal::in_opt<float>(zp), qcal::out<uint16_t>(y), xc.size(0), N, K, group_size,
                                   qcal::threads()));
    return y;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("panel_fits(int n, int k, int group_size) -> bool", [](int64_t n, int64_t k, int64_t gs) {
        return panel_fits(n, k, gs);
    });
    m.def("w8a16_mm_panel(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("w4a16_mm_panel(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w8a16_mm_panel", &w8a16_mm_panel);
    m.impl("w4a16_mm_panel", &w4a16_mm_panel);
}

#endif
