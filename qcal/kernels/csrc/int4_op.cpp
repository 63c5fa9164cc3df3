// qcal::int4_mm_small as a C++ operator, so compiled graphs call the kernel through the dispatcher
// (about 3 us a call) rather than a Python-registered op (about 10 us). Built with int4_small_m.c.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

extern "C" int qcal_int4_mm_small(const uint16_t *, const uint8_t *, const uint16_t *, int, uint16_t *, int64_t,
                                  int64_t, int64_t, int64_t, int);

static at::Tensor int4_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                int64_t group_size) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
                "qcal::int4_mm_small: x must be a 2-D bf16 CPU tensor");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) * 2 == x.size(1) && w.is_contiguous(),
                "qcal::int4_mm_small: w must be the packed (N, K/2) uint8 weight");
    TORCH_CHECK(sz.scalar_type() == at::kShort && sz.is_contiguous(), "qcal::int4_mm_small: bad scales");
    at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
    int rc = qcal_int4_mm_small(reinterpret_cast<const uint16_t *>(xc.const_data_ptr()),
                                reinterpret_cast<const uint8_t *>(w.const_data_ptr()),
                                reinterpret_cast<const uint16_t *>(sz.const_data_ptr()), has_zero ? 1 : 0,
                                reinterpret_cast<uint16_t *>(y.mutable_data_ptr()), x.size(0), w.size(0), x.size(1),
                                group_size, at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::int4_mm_small: unsupported shape");
    return y;
}

TORCH_LIBRARY(qcal, m) {
    m.def("int4_mm_small(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("int4_mm_small", &int4_mm_small); }
