/* The sub-byte float weight-only operator (wfx_mm_small): schema, argument checks, call and registrations, shared
   by the AVX-512 (fpx_small_m.cpp) and AVX2 (csrc_avx2/fpx_avx2.cpp) builds. Included after the kernel it calls:
   fpx_run(x, w, ws, lut_pad, y, M, N, K, G, row_bytes, bits, nthreads). */
#ifndef QCAL_FPX_API_H
#define QCAL_FPX_API_H

#include "fpx_checks.h"
#include "ops.h"

/* x (M, K) bf16; w (N, K * bits / 8) uint8 bit planes; ws (N, G) fp32; lut (2^bits) bf16; K and K / G multiples
   of 32. */
static at::Tensor wfx_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws, const at::Tensor &lut,
                               int64_t bits) {
    const char *op = "qcal::wfx_mm_small";
    int64_t K, G;
    uint16_t lut_pad[64];
    fpx_checked(op, w, ws, lut, bits, &K, &G, lut_pad);
    at::Tensor xc = qcal::rows(op, x, K), y = qcal::matmul_out(xc, w);
    fpx_run(qcal::in<uint16_t>(xc), qcal::in<uint8_t>(w), qcal::in<float>(ws), lut_pad, qcal::out<uint16_t>(y),
            xc.size(0), w.size(0), K, G, w.size(1), static_cast<int>(bits), qcal::threads());
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
