/* qcal's operator boundary. Every native kernel is a PyTorch operator defined beside its kernel: one schema
   (m.def), one CPU implementation that checks every argument before the kernel sees a pointer, and, for the
   operators compiled graphs call, one Meta implementation (shapes only). Python calls torch.ops.qcal.*; nothing
   else restates a signature. */
#ifndef QCAL_OPS_H
#define QCAL_OPS_H

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace qcal {

template <typename T> inline const T *in(const at::Tensor &t) { return static_cast<const T *>(t.const_data_ptr()); }
template <typename T> inline T *out(at::Tensor &t) { return static_cast<T *>(t.mutable_data_ptr()); }
template <typename T> inline const T *in_opt(const at::Tensor &t) { return t.defined() ? in<T>(t) : nullptr; }

inline int threads() { return at::get_num_threads(); }

/* 2^e as a double for -1022 <= e <= 1023, built from its bits: x * pow2(e) is ldexp(x, e) whenever the product is
   a normal double, without a library call per value. */
inline double pow2(int e) {
    const uint64_t bits = (uint64_t)(1023 + e) << 52;
    double d;
    std::memcpy(&d, &bits, sizeof d);
    return d;
}

/* A C kernel's return code: 0 done, -2 out of memory, anything else arguments it refused. */
inline void check_rc(const char *op, int rc) {
    TORCH_CHECK_WITH(OutOfMemoryError, rc != -2, op, ": out of memory");
    TORCH_CHECK_VALUE(rc == 0, op, ": the kernel refused its arguments (code ", rc, ")");
}

/* Activations: a 2-D bf16 CPU tensor of k columns; returned contiguous. */
inline at::Tensor rows(const char *op, const at::Tensor &x, int64_t k) {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), op,
                     ": x must be a bf16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == k, op, ": x must be (M, ", k, "), got ", x.sizes());
    return x.contiguous();
}

/* A weight or side tensor: contiguous, on the CPU, of `dtype`, with the given sizes. */
inline void check_tensor(const char *op, const char *name, const at::Tensor &t, at::ScalarType dtype,
                         at::IntArrayRef sizes) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype && t.device().is_cpu(), op, ": ", name, " must be a ",
                     c10::toString(dtype), " CPU tensor, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK_VALUE(t.sizes() == sizes && t.is_contiguous(), op, ": ", name, " must be a contiguous ", sizes,
                      " tensor, got ", t.sizes(), " (contiguous: ", t.is_contiguous(), ")");
}

/* A weight of n rows (1 or 2 codes a byte): the (M, N) bf16 output of a matmul. */
inline at::Tensor matmul_out(const at::Tensor &x, const at::Tensor &w) {
    return at::empty({x.size(0), w.size(0)}, x.options());
}

inline at::Tensor matmul_meta(const at::Tensor &x, const at::Tensor &w) {
    return at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options());
}

}  // namespace qcal

#endif
