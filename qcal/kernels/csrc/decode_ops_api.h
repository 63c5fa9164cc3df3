/* The operators of the elementwise decode steps (add_rmsnorm, rope_store, silu_mul): schemas, argument checks and
   registrations, shared by the AVX-512 (qcal/runtime/csrc/decode_ops.cpp) and AVX2 (csrc_avx2/decode_ops_avx2.cpp)
   builds. Included after the kernels it calls: add_rmsnorm_rows, rope_rows, silu_mul_rows. */
#ifndef QCAL_DECODE_OPS_API_H
#define QCAL_DECODE_OPS_API_H

// ------------------------------------------------------------------ operators

static void bf16_cpu(const char *op, const char *name, const at::Tensor &t) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), op, ": ", name,
                     " must be a bf16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// x (M, N) += delta (when given), then out = RMSNorm(x) * weight; x, delta, out contiguous (M, N), weight (N,).
static void add_rmsnorm(at::Tensor &x, const std::optional<at::Tensor> &delta, const at::Tensor &weight,
                        at::Tensor &out, double eps) {
    const char *op = "qcal::add_rmsnorm";
    bf16_cpu(op, "x", x);
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(), op, ": x must be a contiguous (M, N), got ",
                      x.sizes());
    qcal::check_tensor(op, "weight", weight, at::kBFloat16, {x.size(1)});
    qcal::check_tensor(op, "out", out, at::kBFloat16, x.sizes());
    at::Tensor d = delta.has_value() ? *delta : at::Tensor();
    if (d.defined()) qcal::check_tensor(op, "delta", d, at::kBFloat16, x.sizes());
    qcal::check_rc(op, add_rmsnorm_rows(qcal::out<uint16_t>(x), qcal::in_opt<uint16_t>(d), qcal::in<uint16_t>(weight),
                                        qcal::out<uint16_t>(out), x.size(0), x.size(1), static_cast<float>(eps)));
}

// Rotary embedding of src (M, H, D) (heads contiguous within a token) into dst (M, H, D) of any token and head
// strides, last dimension contiguous (dst may be src); cos / sin (M, D) contiguous, or None for a plain copy.
static void rope_store(const at::Tensor &src, at::Tensor &dst, const std::optional<at::Tensor> &cos,
                       const std::optional<at::Tensor> &sin) {
    const char *op = "qcal::rope_store";
    bf16_cpu(op, "src", src);
    bf16_cpu(op, "dst", dst);
    TORCH_CHECK_VALUE(src.dim() == 3 && src.stride(2) == 1 && src.stride(1) == src.size(2) && dst.sizes() == src.sizes()
                          && dst.stride(2) == 1,
                      op, ": src must be (M, H, D) with contiguous heads and dst the same shape with a contiguous "
                      "last dimension, got ", src.sizes(), " (strides ", src.strides(), ") and ", dst.sizes(),
                      " (strides ", dst.strides(), ")");
    const int64_t m = src.size(0), h = src.size(1), d = src.size(2);
    TORCH_CHECK_VALUE(cos.has_value() == sin.has_value(), op, ": give both cos and sin, or neither");
    at::Tensor c = cos.has_value() ? *cos : at::Tensor(), s = sin.has_value() ? *sin : at::Tensor();
    if (c.defined()) {
        qcal::check_tensor(op, "cos", c, at::kBFloat16, {m, d});
        qcal::check_tensor(op, "sin", s, at::kBFloat16, {m, d});
    }
    qcal::check_rc(op, rope_rows(qcal::in<uint16_t>(src), src.stride(0), qcal::out<uint16_t>(dst), dst.stride(0),
                                 dst.stride(1), m, h, d, qcal::in_opt<uint16_t>(c), qcal::in_opt<uint16_t>(s)));
}

// gate = silu(gate) * up in place, both contiguous of one shape.
static void silu_mul(at::Tensor &gate, const at::Tensor &up) {
    const char *op = "qcal::silu_mul";
    bf16_cpu(op, "gate", gate);
    TORCH_CHECK_VALUE(gate.is_contiguous(), op, ": gate must be contiguous");
    qcal::check_tensor(op, "up", up, at::kBFloat16, gate.sizes());
    qcal::check_rc(op, silu_mul_rows(qcal::out<uint16_t>(gate), qcal::in<uint16_t>(up), gate.numel()));
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("add_rmsnorm(Tensor(a!) x, Tensor? delta, Tensor weight, Tensor(b!) out, float eps) -> ()");
    m.def("rope_store(Tensor src, Tensor(a!) dst, Tensor? cos, Tensor? sin) -> ()");
    m.def("silu_mul(Tensor(a!) gate, Tensor up) -> ()");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("add_rmsnorm", &add_rmsnorm);
    m.impl("rope_store", &rope_store);
    m.impl("silu_mul", &silu_mul);
}

#include "decode_step_api.h"  // the decode step of a decoder stack, calling add_rmsnorm and silu_mul

#endif
