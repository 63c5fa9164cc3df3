/* The decode-attention operators over a bf16 cache (decode_attention, decode_step_attention): argument checks and the
   call, shared by the AVX-512 (qcal/runtime/csrc/decode_attention.cpp) and AVX2 (csrc_avx2/attention_avx2.cpp)
   builds. Included after what they call: attend_bf16, rope_rows and the QCAL_ATTN_* limits. */
#ifndef QCAL_DECODE_ATTENTION_API_H
#define QCAL_DECODE_ATTENTION_API_H

// q (1, hq, 1, D), k / v (1, hkv, L, D) (any head and position strides, last dimension contiguous), mask None or
// L bools (True = attend); returns (1, 1, hq, D), Hugging Face's attention-output layout.
static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const std::optional<at::Tensor> &mask, double scale) {
    const char *op = "qcal::decode_attention";
    TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                         v.scalar_type() == at::kBFloat16 && q.device().is_cpu() && k.device().is_cpu() &&
                         v.device().is_cpu(),
                     op, ": q, k and v must be bf16 CPU tensors");
    TORCH_CHECK_VALUE(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, op,
                      ": q must be (1, heads, 1, head_dim), got ", q.sizes());
    TORCH_CHECK_VALUE(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == 1 && k.size(3) == q.size(3) &&
                          k.stride(3) == 1 && v.stride(3) == 1,
                      op, ": k and v must be (1, kv_heads, length, head_dim) with a contiguous last dimension, got ",
                      k.sizes(), " and ", v.sizes());
    const int64_t hq = q.size(1), hkv = k.size(1), L = k.size(2), D = q.size(3);
    TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0 && hq / hkv <= QCAL_ATTN_MAX_G && D > 0 && D % 16 == 0 &&
                          D <= QCAL_ATTN_MAX_D,
                      op, ": unsupported heads ", hq, " over ", hkv, " KV heads, head_dim ", D, " (groups of up to ",
                      QCAL_ATTN_MAX_G, ", head_dim a multiple of 16 up to ", QCAL_ATTN_MAX_D, ")");
    at::Tensor m;
    if (mask.has_value()) {
        TORCH_CHECK_VALUE(mask->scalar_type() == at::kBool && mask->numel() == L && mask->device().is_cpu(), op,
                          ": mask must be a bool CPU tensor with one entry per position (", L, "), got ",
                          mask->scalar_type(), " ", mask->sizes());
        m = mask->reshape({L}).contiguous();
    }
    at::Tensor qc = q.contiguous();
    at::Tensor o = at::empty({1, 1, hq, D}, q.options());
    qcal::check_rc(op, attend_bf16(qcal::in<uint16_t>(qc), qcal::in<uint16_t>(k), k.stride(1), k.stride(2),
                                   qcal::in<uint16_t>(v), v.stride(1), v.stride(2), qcal::in_opt<uint8_t>(m),
                                   qcal::out<uint16_t>(o), hq, hkv, L, D, static_cast<float>(scale), qcal::threads()));
    return o;
}

// One decode step's attention of a Llama layer over its static bf16 cache, in one call: the query rotated in place and
// the key rotated into position `pos` of k_cache, the value copied to v_cache, then the query attends to positions
// 0..pos -- rope_store three times and decode_attention, bit for bit, without their Python calls and views. q
// (1, hq * D), k and v (1, hkv * D) contiguous (the projections' outputs); k_cache and v_cache (hkv, Lmax, D)
// contiguous; cos and sin the rotary tables (>= pos + 1, D). Returns (1, hq * D).
static at::Tensor decode_step_attention(at::Tensor &q, const at::Tensor &k, const at::Tensor &v, at::Tensor &kc,
                                        at::Tensor &vc, int64_t pos, const at::Tensor &cos, const at::Tensor &sin,
                                        double scale) {
    const char *op = "qcal::decode_step_attention";
    for (const at::Tensor *t : std::initializer_list<const at::Tensor *>{&q, &k, &v, &kc, &vc, &cos, &sin})
        TORCH_CHECK_TYPE(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), op,
                         ": q, k, v, the caches and the rotary tables must be bf16 CPU tensors, got ", t->scalar_type(),
                         " on ", t->device());
    TORCH_CHECK_VALUE(kc.dim() == 3 && kc.is_contiguous() && vc.sizes() == kc.sizes() && vc.is_contiguous(), op,
                      ": k_cache and v_cache must be contiguous (kv_heads, length, head_dim), got ", kc.sizes(), " and ",
                      vc.sizes());
    const int64_t hkv = kc.size(0), Lmax = kc.size(1), D = kc.size(2);
    TORCH_CHECK_VALUE(D > 0 && D % 16 == 0 && D <= QCAL_ATTN_MAX_D && hkv > 0, op, ": head_dim ", D,
                      " must be a multiple of 16 up to ", QCAL_ATTN_MAX_D);
    TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) == 1 && q.is_contiguous() && q.size(1) % (hkv * D) == 0 &&
                          q.size(1) / (hkv * D) <= QCAL_ATTN_MAX_G && q.size(1) > 0,
                      op, ": q must be a contiguous (1, heads * ", D, ") with heads a multiple of ", hkv,
                      " up to ", QCAL_ATTN_MAX_G, " per KV head, got ", q.sizes());
    qcal::check_tensor(op, "k", k, at::kBFloat16, {1, hkv * D});
    qcal::check_tensor(op, "v", v, at::kBFloat16, {1, hkv * D});
    TORCH_CHECK_VALUE(pos >= 0 && pos < Lmax, op, ": pos ", pos, " is outside the cache's ", Lmax, " positions");
    TORCH_CHECK_VALUE(cos.dim() == 2 && cos.is_contiguous() && cos.size(0) > pos && cos.size(1) == D &&
                          sin.sizes() == cos.sizes() && sin.is_contiguous(),
                      op, ": cos and sin must be contiguous (positions > ", pos, ", ", D, ") tables, got ", cos.sizes(),
                      " and ", sin.sizes());
    const int64_t hq = q.size(1) / D;
    uint16_t *qp = qcal::out<uint16_t>(q), *kp = qcal::out<uint16_t>(kc), *vp = qcal::out<uint16_t>(vc);
    const uint16_t *c = qcal::in<uint16_t>(cos) + pos * D, *sn = qcal::in<uint16_t>(sin) + pos * D;
    qcal::check_rc(op, rope_rows(qp, hq * D, qp, hq * D, D, 1, hq, D, c, sn));
    qcal::check_rc(op, rope_rows(qcal::in<uint16_t>(k), hkv * D, kp + pos * D, D, Lmax * D, 1, hkv, D, c, sn));
    qcal::check_rc(op, rope_rows(qcal::in<uint16_t>(v), hkv * D, vp + pos * D, D, Lmax * D, 1, hkv, D, nullptr,
                                 nullptr));
    at::Tensor o = at::empty({1, hq * D}, q.options());
    qcal::check_rc(op, attend_bf16(qp, kp, Lmax * D, D, vp, Lmax * D, D, nullptr, qcal::out<uint16_t>(o), hq, hkv,
                                   pos + 1, D, static_cast<float>(scale), qcal::threads()));
    return o;
}

#endif
