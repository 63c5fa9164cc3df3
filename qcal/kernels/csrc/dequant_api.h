/* The dequantization operators (dequant_w4, dequant_w8): schemas, argument checks and registrations, shared by the
   AVX-512 (dequant_int4.cpp) and AVX2 (csrc_avx2/dequant_avx2.cpp) builds. Included after the kernels it calls:
   dequant (int4) and dequant8. */
#ifndef QCAL_DEQUANT_API_H
#define QCAL_DEQUANT_API_H

/* ------------------------------------------------------------------ operator */

/* qweight (N, K/2) uint8 canonical codes; scale, zero_point (N, G) fp32 with K / G a multiple of 32. */
static at::Tensor dequant_w4(const at::Tensor &qweight, const at::Tensor &scale,
                             const std::optional<at::Tensor> &zero_point) {
    const char *op = "qcal::dequant_w4";
    TORCH_CHECK_VALUE(qweight.dim() == 2 && scale.dim() == 2 && scale.size(1) > 0, op,
                      ": qweight must be (N, K/2) and scale (N, groups), got ", qweight.sizes(), ", ", scale.sizes());
    const int64_t N = qweight.size(0), K = 2 * qweight.size(1), G = scale.size(1);
    TORCH_CHECK_VALUE(K % G == 0 && (K / G) % 32 == 0, op, ": groups of K=", K, " / ", G,
                      " columns must be a multiple of 32");
    qcal::check_tensor(op, "qweight", qweight, at::kByte, {N, K / 2});
    qcal::check_tensor(op, "scale", scale, at::kFloat, {N, G});
    at::Tensor zp = zero_point.has_value() ? *zero_point : at::Tensor();
    if (zp.defined()) qcal::check_tensor(op, "zero_point", zp, at::kFloat, {N, G});
    at::Tensor w = at::empty({N, K}, qweight.options().dtype(at::kBFloat16));
    qcal::check_rc(op, dequant(qcal::in<uint8_t>(qweight), qcal::in<float>(scale), qcal::in_opt<float>(zp),
                               qcal::out<uint16_t>(w), N, K, K / G, qcal::threads()));
    return w;
}

/* qweight (N, K) int8 codes; scale (N,) fp32: per output channel. */
static at::Tensor dequant_w8(const at::Tensor &qweight, const at::Tensor &scale) {
    const char *op = "qcal::dequant_w8";
    TORCH_CHECK_VALUE(qweight.dim() == 2, op, ": qweight must be (N, K), got ", qweight.sizes());
    const int64_t N = qweight.size(0), K = qweight.size(1);
    qcal::check_tensor(op, "qweight", qweight, at::kChar, {N, K});
    qcal::check_tensor(op, "scale", scale, at::kFloat, {N});
    at::Tensor w = at::empty({N, K}, qweight.options().dtype(at::kBFloat16));
    dequant8(qcal::in<int8_t>(qweight), qcal::in<float>(scale), qcal::out<uint16_t>(w), N, K, qcal::threads());
    return w;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("dequant_w4(Tensor qweight, Tensor scale, Tensor? zero_point) -> Tensor");
    m.def("dequant_w8(Tensor qweight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("dequant_w4", &dequant_w4);
    m.impl("dequant_w8", &dequant_w8);
}

#endif
