/* The int8-weight operators (w8a8_mm_small, w8a16_mm_vnni, w8a16_mm_small): argument checks, calls and
   registrations, shared by the
   AVX-512 (int8_small_m.cpp) and AVX2 (csrc_avx2/mm_avx2.cpp) builds. Included after the kernels they call:
   w8a8_small, w8a16_digits, w8a16_small. */
#ifndef QCAL_INT8_API_H
#define QCAL_INT8_API_H

/* x (M, K) bf16; w (N, K) int8, contiguous; ws (N) fp32 [; wsum (N) int32]. */
static at::Tensor w8_checked(const char *op, const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) > 0, op, ": w must be (N, K), got ", w.sizes());
    qcal::check_tensor(op, "w", w, at::kChar, w.sizes());
    qcal::check_tensor(op, "ws", ws, at::kFloat, {w.size(0)});
    return qcal::rows(op, x, w.size(1));
}

/* The operators over an int8 weight with its row sums (A8W8, and A16W8 through the activation digits): the same
   arguments, checked once, for `kernel`. */
typedef int (*w8_sums_kernel)(const uint16_t *, const int8_t *, const int32_t *, const float *, uint16_t *, int64_t,
                              int64_t, int64_t, int);

static at::Tensor w8_sums_op(const char *op, w8_sums_kernel kernel, const at::Tensor &x, const at::Tensor &w,
                             const at::Tensor &wsum, const at::Tensor &ws) {
    at::Tensor xc = w8_checked(op, x, w, ws), y = qcal::matmul_out(xc, w);
    qcal::check_tensor(op, "wsum", wsum, at::kInt, {w.size(0)});
    qcal::check_rc(op, kernel(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<int32_t>(wsum),
                              qcal::in<float>(ws), qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1),
                              qcal::threads()));
    return y;
}

static at::Tensor w8a8_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum,
                                const at::Tensor &ws) {
    return w8_sums_op("qcal::w8a8_mm_small", w8a8_small, x, w, wsum, ws);
}

static at::Tensor w8a16_mm_vnni(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum,
                                const at::Tensor &ws) {
    return w8_sums_op("qcal::w8a16_mm_vnni", w8a16_digits, x, w, wsum, ws);
}

static at::Tensor w8a16_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    const char *op = "qcal::w8a16_mm_small";
    at::Tensor xc = w8_checked(op, x, w, ws), y = qcal::matmul_out(xc, w);
    qcal::check_rc(op, w8a16_small(qcal::in<uint16_t>(xc), qcal::in<int8_t>(w), qcal::in<float>(ws),
                                   qcal::out<uint16_t>(y), xc.size(0), w.size(0), w.size(1), qcal::threads()));
    return y;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("w8a8_mm_small(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("w8a16_mm_small(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("w8a16_mm_vnni(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("w8a8_mm_small", &w8a8_mm_small);
    m.impl("w8a16_mm_small", &w8a16_mm_small);
    m.impl("w8a16_mm_vnni", &w8a16_mm_vnni);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("w8a8_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("w8a16_mm_small", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
    m.impl("w8a16_mm_vnni", [](const at::Tensor &x, const at::Tensor &w, const at::Tensor &, const at::Tensor &) {
        return qcal::matmul_meta(x, w);
    });
}

#endif
