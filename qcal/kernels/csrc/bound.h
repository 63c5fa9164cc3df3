/* Projections bound to their weights once, for the decode step (decode_step_api.h): a kernel whose operator takes
   the input rows first and returns one (M, N) bf16 tensor can register a binder beside its operator. The binder
   checks the operator's other arguments as the operator does and returns the kernel as a call on raw bf16 rows,
   y (1, N) from x (1, K), so that a step runs its ~200 projections without a tensor, an allocation or a dispatch
   each. Operators without a binder are called through the dispatcher. */
#ifndef QCAL_BOUND_H
#define QCAL_BOUND_H

#include <ATen/core/ivalue.h>

#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "ops.h"

namespace qcal {

struct Bound {
    int64_t K = 0, N = 0;
    std::vector<at::Tensor> keep; /* what the call reads, held for as long as the call is */
    std::function<int(const uint16_t *x, uint16_t *y)> run; /* the kernel's return code (check_rc) */
};

/* args: the operator's arguments after x, in schema order (tensors, ints, bools). Throws as the operator would. */
typedef Bound (*Binder)(const char *op, const std::vector<c10::IValue> &args);

/* The binders by operator name (without "qcal::"), filled as the library loads. */
inline std::unordered_map<std::string, Binder> &binders() {
    static std::unordered_map<std::string, Binder> table;
    return table;
}

struct BindAs {
    BindAs(const char *name, Binder binder) { binders()[name] = binder; }
};

}  // namespace qcal

#endif
