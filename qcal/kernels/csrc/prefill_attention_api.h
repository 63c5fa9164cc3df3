/* The prefill-attention operator (prefill_attention): argument checks and the call, shared by the AVX-512
   (qcal/runtime/csrc/prefill_attention.cpp) and AVX2 (csrc_avx2/attention_avx2.cpp) builds. Included after what it
   calls: attend_causal. */
#ifndef QCAL_PREFILL_ATTENTION_API_H
#define QCAL_PREFILL_ATTENTION_API_H

// q (n, hq, D) contiguous, query i at position start + i; k / v (hkv, >= start + n, D) with equal strides and a
// contiguous last dimension; returns (n, hq, D).
static at::Tensor prefill_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, int64_t start,
                                    double scale) {
    const char *op = "qcal::prefill_attention";
    TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                         v.scalar_type() == at::kBFloat16 && q.device().is_cpu() && k.device().is_cpu() &&
                         v.device().is_cpu(),
                     op, ": q, k and v must be bf16 CPU tensors");
    TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k.strides() == v.strides(), op,
                      ": q must be (n, heads, head_dim) and k, v equal (kv_heads, length, head_dim), got ", q.sizes(),
                      ", ", k.sizes(), ", ", v.sizes());
    const int64_t n = q.size(0), hq = q.size(1), D = q.size(2), hkv = k.size(0);
    TORCH_CHECK_VALUE(start >= 0 && k.size(1) >= start + n && k.size(2) == D && k.stride(2) == 1 && hkv > 0 &&
                          hq % hkv == 0 && D % 16 == 0 && D > 0 && D <= PA_MAX_D,
                      op, ": unsupported q ", q.sizes(), ", k ", k.sizes(), " (strides ", k.strides(), "), start ",
                      start);
    at::Tensor qc = q.contiguous();
    at::Tensor o = at::empty_like(qc);
    qcal::check_rc(op, attend_causal(qcal::in<uint16_t>(qc), hq * D, qcal::in<uint16_t>(k), qcal::in<uint16_t>(v),
                                     k.stride(0), k.stride(1), qcal::out<uint16_t>(o), hq * D, n, hq, hkv, start, D,
                                     static_cast<float>(scale), qcal::threads()));
    return o;
}

#endif
