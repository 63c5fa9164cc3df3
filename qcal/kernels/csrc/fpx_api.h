/* The sub-byte float weight-only operator (wfx_mm_small): schema, argument checks, call and registrations, shared
   by the AVX-512 (fpx_small_m.cpp) and AVX2 (csrc_avx2/fpx_avx2.cpp) builds. Included after the kernel it calls:
   fpx_run(x, w, ws, lut_pad, y, M, N, K, G, row_bytes, bits, nthreads). */
#ifndef QCAL_FPX_API_H
#define QCAL_FPX_API_H

#include "ops.h"

/* x (M, K) bf16; w (N, K * bits / 8) uint8 bit planes; ws (N, G) fp32; lut (2^bits) bf16; K and K / G multiples
   of 32. */
static at::Tensor wfx_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws, const at::Tensor &lut,
                               int64_t bits) {
    const char *op = "qcal::wfx_mm_small";
    TORCH_CHECK_VALUE(bits == 4 || bits == 5 || bits == 6, op, ": bits must be 4, 5 or 6, got ", bits);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0 && (w.size(1) * 8) % bits == 0, op,
                      ": w must be (N, K * bits / 8), got ", w.sizes());
    const int64_t N = w.size(0), K = w.size(1) * 8 / bits;
    qcal::check_tensor(op, "w", w, at::kByte, w.sizes());
    TORCH_CHECK_VALUE(ws.dim() == 2 && ws.size(0) == N && ws.size(1) > 0, op, ": ws must be (N, groups), got ",
                      ws.sizes());
    qcal::check_tensor(op, "ws", ws, at::kFloat, ws.sizes());
    const int64_t G = ws.size(1);
    TORCH_CHECK_VALUE(K % 32 == 0 && K % G == 0 && (K / G) % 32 == 0, op, ": K = ", K, " in ", G,
                      " groups: K and the group size must be multiples of 32");
    qcal::check_tensor(op, "lut", lut, at::kBFloat16, {int64_t(1) << bits});
    at::Tensor xc = qcal::rows(op, x, K), y = qcal::matmul_out(xc, w);
    uint16_t lut_pad[64] = {0};
    memcpy(lut_pad, lut.const_data_ptr(), sizeof(uint16_t) << bits);
    fpx_run(qcal::in<uint16_t>(xc), qcal::in<uint8_t>(w), qcal::in<float>(ws), lut_pad, qcal::out<uint16_t>(y),
            xc.size(0), N, K, G, w.size(1), static_cast<int>(bits), qcal::threads());
    return y;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("wfx_mm_small(Tensor x, Tensor w, Tensor ws, Tensor lut, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("wfx_mm_small", &wfx_mm_small); }

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("wfx_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, const at::Tensor &,
                              int64_t) { return at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options()); });
}

#endif
