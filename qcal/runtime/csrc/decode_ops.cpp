// The elementwise steps of a Llama decoder layer in bf16, one call each (AVX512), with Hugging Face's
// rounding: every PyTorch op of the reference rounds its result to bf16, and so does each step here.
//
// add_rmsnorm: x += delta (in place, rounded), out = w * bf16(x * rsqrt(mean(x^2) + eps)) (LlamaRMSNorm);
// rope_store:  rotary embedding (rotate-half form) of head rows, written to any strided destination
//                   (the query in place, the key into its cache slot), or a plain strided copy (the value);
// silu_mul:    g = bf16(bf16(silu(g)) * u) (LlamaMLP's act_fn(gate) * up).
// Row lengths need not be multiples of 16. Single-threaded: at decode sizes a thread team costs more than it saves.
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "ops.h"
#include "rope.h"
#include "vexp.h"

static int add_rmsnorm_rows(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out, int64_t m, int64_t n,
                     float eps) {
    if (m < 0 || n <= 0) return -1;
    for (int64_t r = 0; r < m; r++) {
        uint16_t *xr = x + r * n;
        __m512 ss = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = qcal_tail16(n - j);
            __m512 v = qcal_load_bf16_masked(xr + j, live);
            if (delta) {
                v = qcal_round_bf16(_mm512_add_ps(v, qcal_load_bf16_masked(delta + r * n + j, live)));
                qcal_store_bf16_masked(xr + j, v, live);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float inv = 1.0f / __builtin_sqrtf(_mm512_reduce_add_ps(ss) / (float)n + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 live = qcal_tail16(n - j);
            const __m512 h = qcal_round_bf16(_mm512_mul_ps(qcal_load_bf16_masked(xr + j, live), vinv));
            qcal_store_bf16_masked(out + r * n + j, _mm512_mul_ps(h, qcal_load_bf16_masked(w + j, live)), live);
        }
    }
    return 0;
}

static int silu_mul_rows(uint16_t *g, const uint16_t *u, int64_t n) {
    if (n < 0) return -1;
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = qcal_tail16(n - j);
        const __m512 x = qcal_load_bf16_masked(g + j, live);
        // silu(x) = x / (1 + e^-x); with e = e^-|x|: x / (1 + e) for x >= 0, x e / (1 + e) below
        const __m512 e = qcal_exp_nonpos(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
        const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 num = _mm512_mask_mul_ps(x, neg, x, e);
        const __m512 s = qcal_round_bf16(_mm512_div_ps(num, _mm512_add_ps(one, e)));
        qcal_store_bf16_masked(g + j, _mm512_mul_ps(s, qcal_load_bf16_masked(u + j, live)), live);
    }
    return 0;
}

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
