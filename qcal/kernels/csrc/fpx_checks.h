/* The sub-byte float weight operators' argument checks (wfx_mm_small in both libraries, wfx_mm_panel in the AVX2
   one): w (N, K * bits / 8) uint8 bit planes, ws (N, G) fp32, lut (2^bits) bf16, K and K / G multiples of 32. */
#ifndef QCAL_FPX_CHECKS_H
#define QCAL_FPX_CHECKS_H

#include <cstring>

#include "ops.h"

/* Returns K and G; the table padded to 64 entries into lut_pad. */
static void fpx_checked(const char *op, const at::Tensor &w, const at::Tensor &ws, const at::Tensor &lut, int64_t bits,
                        int64_t *K, int64_t *G, uint16_t lut_pad[64]) {
    TORCH_CHECK_VALUE(bits == 4 || bits == 5 || bits == 6, op, ": bits must be 4, 5 or 6, got ", bits);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0 && (w.size(1) * 8) % bits == 0, op,
                      ": w must be (N, K * bits / 8), got ", w.sizes());
    const int64_t N = w.size(0);
    *K = w.size(1) * 8 / bits;
    qcal::check_tensor(op, "w", w, at::kByte, w.sizes());
    TORCH_CHECK_VALUE(ws.dim() == 2 && ws.size(0) == N && ws.size(1) > 0, op, ": ws must be (N, groups), got ",
                      ws.sizes());
    qcal::check_tensor(op, "ws", ws, at::kFloat, ws.sizes());
    *G = ws.size(1);
    TORCH_CHECK_VALUE(*K % 32 == 0 && *K % *G == 0 && (*K / *G) % 32 == 0, op, ": K = ", *K, " in ", *G,
                      " groups: K and the group size must be multiples of 32");
    qcal::check_tensor(op, "lut", lut, at::kBFloat16, {int64_t(1) << bits});
    std::memset(lut_pad, 0, 64 * sizeof(uint16_t));
    std::memcpy(lut_pad, lut.const_data_ptr(), sizeof(uint16_t) << bits);
}

#endif
