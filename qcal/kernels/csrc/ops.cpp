// qcal's C kernels as C++ operators (int4_mm_small, int4_mm_q8, int8_mm_q8, int8wo_mm, decode_attention), so
// compiled graphs call them through the dispatcher (about 3 us a call) rather than a Python-registered op
// (about 10 us). Built with the C sources beside it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>

template <typename T> static const T *in(const at::Tensor &t) { return reinterpret_cast<const T *>(t.const_data_ptr()); }
static uint16_t *out_bf16(at::Tensor &t) { return reinterpret_cast<uint16_t *>(t.mutable_data_ptr()); }

// The matmul operators' common checks: x (M, K) bf16 on the CPU, w a contiguous (N, K / per_elem) tensor of
// `wtype`. Returns the contiguous x and the (M, N) bf16 output to fill.
static std::pair<at::Tensor, at::Tensor> matmul_io(const char *op, const at::Tensor &x, const at::Tensor &w,
                                                   at::ScalarType wtype, int64_t per_elem) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), op,
                ": x must be a 2-D bf16 CPU tensor");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == wtype && w.size(1) * per_elem == x.size(1) && w.is_contiguous(),
                op, ": w must be the contiguous (N, K", per_elem == 2 ? "/2" : "", ") ", at::toString(wtype),
                " weight");
    return {x.contiguous(), at::empty({x.size(0), w.size(0)}, x.options())};
}

extern "C" int qcal_int4_mm_small(const uint16_t *, const uint8_t *, const uint16_t *, int, uint16_t *, int64_t,
                                  int64_t, int64_t, int64_t, int);

static at::Tensor int4_mm_small(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, bool has_zero,
                                int64_t group_size) {
    auto [xc, y] = matmul_io("qcal::int4_mm_small", x, w, at::kByte, 2);
    TORCH_CHECK(sz.scalar_type() == at::kShort && sz.is_contiguous(), "qcal::int4_mm_small: bad scales");
    int rc = qcal_int4_mm_small(in<uint16_t>(xc), in<uint8_t>(w), in<uint16_t>(sz), has_zero ? 1 : 0, out_bf16(y),
                                x.size(0), w.size(0), x.size(1), group_size, at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::int4_mm_small: unsupported shape or out of memory");
    return y;
}

extern "C" int qcal_decode_attention(const uint16_t *, const uint16_t *, const uint16_t *, const uint8_t *, uint16_t *,
                                     int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                                     int);

static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const std::optional<at::Tensor> &mask, double scale) {
    TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1 && q.scalar_type() == at::kBFloat16 &&
                    q.device().is_cpu(),
                "qcal::decode_attention: q must be a (1, heads, 1, head_dim) bf16 CPU tensor");
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == 1 &&
                    k.size(3) == q.size(3) && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
                    k.stride(3) == 1 && v.stride(3) == 1,
                "qcal::decode_attention: k and v must be (1, kv_heads, length, head_dim) bf16 with unit last stride");
    const int64_t L = k.size(2);
    at::Tensor m;
    if (mask.has_value()) {
        TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == L,
                    "qcal::decode_attention: mask must be a bool tensor with one entry per position");
        m = mask->reshape({L}).contiguous();
    }
    at::Tensor qc = q.contiguous();
    at::Tensor out = at::empty({1, 1, q.size(1), q.size(3)}, q.options());
    int rc = qcal_decode_attention(in<uint16_t>(qc), in<uint16_t>(k), in<uint16_t>(v),
                                   m.defined() ? in<uint8_t>(m) : nullptr, out_bf16(out), q.size(1), k.size(1), L,
                                   q.size(3), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                                   static_cast<float>(scale), at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::decode_attention: unsupported shape (heads, head_dim) or out of memory");
    return out;
}

extern "C" int qcal_int8_mm_small_q8(const uint16_t *, const int8_t *, const int32_t *, const float *, uint16_t *,
                                     int64_t, int64_t, int64_t, int);

static at::Tensor int8_mm_q8(const at::Tensor &x, const at::Tensor &w, const at::Tensor &wsum, const at::Tensor &ws) {
    auto [xc, y] = matmul_io("qcal::int8_mm_q8", x, w, at::kChar, 1);
    TORCH_CHECK(wsum.scalar_type() == at::kInt && ws.scalar_type() == at::kFloat && wsum.numel() == w.size(0) &&
                    ws.numel() == w.size(0) && wsum.is_contiguous() && ws.is_contiguous(),
                "qcal::int8_mm_q8: bad weight sums or scales");
    int rc = qcal_int8_mm_small_q8(in<uint16_t>(xc), in<int8_t>(w), in<int32_t>(wsum), in<float>(ws), out_bf16(y),
                                   x.size(0), w.size(0), x.size(1), at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::int8_mm_q8: unsupported shape or out of memory");
    return y;
}

extern "C" int qcal_int4_mm_q8_vnni(const uint16_t *, const uint8_t *, const uint16_t *, uint16_t *, int64_t, int64_t,
                                    int64_t, int64_t, int);

static at::Tensor int4_mm_q8(const at::Tensor &x, const at::Tensor &w, const at::Tensor &sz, int64_t group_size) {
    auto [xc, y] = matmul_io("qcal::int4_mm_q8", x, w, at::kByte, 2);
    TORCH_CHECK(sz.scalar_type() == at::kShort && sz.is_contiguous(), "qcal::int4_mm_q8: bad scales");
    int rc = qcal_int4_mm_q8_vnni(in<uint16_t>(xc), in<uint8_t>(w), in<uint16_t>(sz), out_bf16(y), x.size(0),
                                  w.size(0), x.size(1), group_size, at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::int4_mm_q8: unsupported shape or out of memory");
    return y;
}

extern "C" int qcal_int8wo_mm_small(const uint16_t *, const int8_t *, const float *, uint16_t *, int64_t, int64_t,
                                    int64_t, int);

static at::Tensor int8wo_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &ws) {
    auto [xc, y] = matmul_io("qcal::int8wo_mm", x, w, at::kChar, 1);
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.numel() == w.size(0) && ws.is_contiguous(),
                "qcal::int8wo_mm: bad weight scales");
    int rc = qcal_int8wo_mm_small(in<uint16_t>(xc), in<int8_t>(w), in<float>(ws), out_bf16(y), x.size(0), w.size(0),
                                  x.size(1), at::get_num_threads());
    TORCH_CHECK(rc == 0, "qcal::int8wo_mm: unsupported shape");
    return y;
}

TORCH_LIBRARY(qcal, m) {
    m.def("int4_mm_small(Tensor x, Tensor w, Tensor sz, bool has_zero, int group_size) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
    m.def("int8_mm_q8(Tensor x, Tensor w, Tensor wsum, Tensor ws) -> Tensor");
    m.def("int8wo_mm(Tensor x, Tensor w, Tensor ws) -> Tensor");
    m.def("int4_mm_q8(Tensor x, Tensor w, Tensor sz, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("int4_mm_small", &int4_mm_small);
    m.impl("decode_attention", &decode_attention);
    m.impl("int8_mm_q8", &int8_mm_q8);
    m.impl("int8wo_mm", &int8wo_mm);
    m.impl("int4_mm_q8", &int4_mm_q8);
}
