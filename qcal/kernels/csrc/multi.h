/* The operators for several weights on one input (the AVX2 library's *_multi: q / k / v, gate / up): their list
   checks. */
#ifndef QCAL_MULTI_H
#define QCAL_MULTI_H

#include <string>

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

}  // namespace qcal

#endif
