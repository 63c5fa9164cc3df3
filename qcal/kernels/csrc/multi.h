/* The operators for several weights on one input (the AVX2 library's *_multi: q / k / v, gate / up): their list
   checks. */
#ifndef QCAL_MULTI_H
#define QCAL_MULTI_H

#include <string>
#include <vector>

#include "ops.h"

namespace qcal {

#define QCAL_MAX_WEIGHTS 64

/* n weights (1 .. QCAL_MAX_WEIGHTS) and m tensors of the list `name` beside them. */
inline void multi_checked(const char *op, size_t n, size_t m, const char *name) {
    TORCH_CHECK_VALUE(n >= 1 && n <= QCAL_MAX_WEIGHTS, op, ": between 1 and ", QCAL_MAX_WEIGHTS, " weights, got ", n);
    TORCH_CHECK_VALUE(m == n, op, ": ", name, " must hold one tensor per weight (", n, "), got ", m);
}

/* "<op> (weight i)": the name the one-weight operator's checks report weight i's errors under. */
inline std::string weight_op(const char *op, size_t i) {
    return std::string(op) + " (weight " + std::to_string(i) + ")";
}

/* The (M, N_i) bf16 outputs of the rows xc (M, K) by each weight w[i] (N_i rows); y[i]: their data. */
inline std::vector<at::Tensor> multi_outputs(const at::Tensor &xc, at::TensorList w, uint16_t **y) {
    std::vector<at::Tensor> ys;
    ys.reserve(w.size());
    for (size_t i = 0; i < w.size(); i++) {
        ys.push_back(matmul_out(xc, w[i]));
        y[i] = out<uint16_t>(ys.back());
    }
    return ys;
}

}  // namespace qcal

#endif
