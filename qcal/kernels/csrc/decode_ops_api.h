/* The operators of the elementwise decode steps (add_rmsnorm, rope_store, silu_mul) and of greedy sampling
   (argmax_rows): schemas, argument checks and registrations, shared by the AVX-512
   (qcal/runtime/csrc/decode_ops.cpp) and AVX2 (csrc_avx2/decode_ops_avx2.cpp) builds. Included after the kernels
   it calls: add_rmsnorm_rows, rope_rows, silu_mul_rows. */
#ifndef QCAL_DECODE_OPS_API_H
#define QCAL_DECODE_OPS_API_H

#include <atomic>

#include "parallel.h"

// ------------------------------------------------------------------ prefill-sized calls on all threads

// Calls of at least this many elements (a prefill's rows) are split among the threads in ranges of rows; smaller
// ones (a decode step's) stay on the calling thread, where starting the threads would cost more than it saves.
// Every row (silu_mul: every element) is computed as on one thread: the results do not depend on the split.
#define QCAL_SPLIT_ELEMENTS (1 << 14)

typedef int (*qcal_rows_fn)(const void *ctx, int64_t r0, int64_t r1); /* 0, or an error code */

typedef struct {
    const void *ctx;
    qcal_rows_fn fn;
    int64_t rows, per_unit;
    mutable std::atomic<int> rc;
} qcal_rows_job;

static void qcal_rows_unit(const void *c, int64_t, int, int64_t p) {
    const qcal_rows_job *j = (const qcal_rows_job *)c;
    const int64_t r0 = p * j->per_unit, r1 = r0 + j->per_unit < j->rows ? r0 + j->per_unit : j->rows;
    const int rc = j->fn(j->ctx, r0, r1);
    if (rc) j->rc.store(rc, std::memory_order_relaxed);
}

// fn(ctx, r0, r1) over rows [0, rows) of `width` elements each: on this thread, or in ranges on all threads. Returns
// 0 or an error code one of the ranges returned.
static int qcal_for_rows(int64_t rows, int64_t width, const void *ctx, qcal_rows_fn fn) {
    const int nthreads = qcal::threads();
    if (nthreads < 2 || rows < 2 || rows * width < QCAL_SPLIT_ELEMENTS) return fn(ctx, 0, rows);
    const int64_t units = rows < 8 * (int64_t)nthreads ? rows : 8 * (int64_t)nthreads;
    const qcal_rows_job job = {ctx, fn, rows, (rows + units - 1) / units, {0}};
    qcal_run_units(1, (rows + job.per_unit - 1) / job.per_unit, nthreads, &job, qcal_rows_unit);
    return job.rc.load(std::memory_order_relaxed);
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
    struct Args {
        uint16_t *x, *out;
        const uint16_t *d, *w;
        int64_t n;
        float eps;
    } a{qcal::out<uint16_t>(x), qcal::out<uint16_t>(out), qcal::in_opt<uint16_t>(d), qcal::in<uint16_t>(weight),
        x.size(1), static_cast<float>(eps)};
    qcal::check_rc(op, qcal_for_rows(x.size(0), x.size(1), &a, [](const void *c, int64_t r0, int64_t r1) {
        const Args *a = (const Args *)c;
        return add_rmsnorm_rows(a->x + r0 * a->n, a->d ? a->d + r0 * a->n : nullptr, a->w, a->out + r0 * a->n,
                                r1 - r0, a->n, a->eps);
    }));
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
    struct Args {
        const uint16_t *src, *cos, *sin;
        uint16_t *dst;
        int64_t src_stride, dst_stride, head_stride, h, d;
    } a{qcal::in<uint16_t>(src), qcal::in_opt<uint16_t>(c), qcal::in_opt<uint16_t>(s), qcal::out<uint16_t>(dst),
        src.stride(0), dst.stride(0), dst.stride(1), h, d};
    qcal::check_rc(op, qcal_for_rows(m, h * d, &a, [](const void *c, int64_t r0, int64_t r1) {
        const Args *a = (const Args *)c;
        return rope_rows(a->src + r0 * a->src_stride, a->src_stride, a->dst + r0 * a->dst_stride, a->dst_stride,
                         a->head_stride, r1 - r0, a->h, a->d, a->cos ? a->cos + r0 * a->d : nullptr,
                         a->sin ? a->sin + r0 * a->d : nullptr);
    }));
}

// gate = silu(gate) * up in place, both contiguous of one shape.
static void silu_mul(at::Tensor &gate, const at::Tensor &up) {
    const char *op = "qcal::silu_mul";
    bf16_cpu(op, "gate", gate);
    TORCH_CHECK_VALUE(gate.is_contiguous(), op, ": gate must be contiguous");
    qcal::check_tensor(op, "up", up, at::kBFloat16, gate.sizes());
    struct Args {
        uint16_t *g;
        const uint16_t *u;
        int64_t n;
    } a{qcal::out<uint16_t>(gate), qcal::in<uint16_t>(up), gate.numel()};
    const int64_t chunk = 4096; /* elements a "row" of the split */
    qcal::check_rc(op, qcal_for_rows((a.n + chunk - 1) / chunk, chunk, &a, [](const void *c, int64_t r0, int64_t r1) {
        const Args *a = (const Args *)c;
        const int64_t e0 = r0 * chunk, e1 = r1 * chunk < a->n ? r1 * chunk : a->n;
        return silu_mul_rows(a->g + e0, a->u + e0, e1 - e0);
    }));
}

// The first i < n with hit(x[i]) (n where none): 64 values a step tested as one vectorizable reduction, then the
// step that holds it one by one.
template <class Hit> static inline int64_t first_hit(const uint16_t *x, int64_t n, Hit hit) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint16_t any = 0;
        for (int j = 0; j < 64; j++) any |= static_cast<uint16_t>(hit(x[i + j]));
        if (any) break;
    }
    for (; i < n; i++)
        if (hit(x[i])) return i;
    return n;
}

// The index of the first largest of n >= 1 bf16 values, as torch.argmax picks it: the first NaN where there is one,
// else the first value equal to the largest (as floats: -0 == +0). The largest is found on a key that orders the bf16
// bit patterns as their values (negative ones: the magnitude bits flipped), a reduction the compiler vectorizes.
static int64_t argmax_bf16(const uint16_t *x, int64_t n) {
    uint16_t mag = 0; // the largest magnitude's bits: above 0x7f80 where a NaN is
    int16_t top = INT16_MIN;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t b = x[i], m = b & 0x7fff;
        const int16_t key = static_cast<int16_t>(b ^ (static_cast<uint16_t>(static_cast<int16_t>(b) >> 15) & 0x7fff));
        mag = m > mag ? m : mag;
        top = key > top ? key : top;
    }
    if (mag > 0x7f80) return first_hit(x, n, [](uint16_t b) { return (b & 0x7fff) > 0x7f80; });
    const uint16_t t = static_cast<uint16_t>(top) ^ (top < 0 ? 0x7fff : 0); // the key's bit pattern
    if ((t & 0x7fff) == 0) return first_hit(x, n, [](uint16_t b) { return (b & 0x7fff) == 0; }); // +-0: either
    return first_hit(x, n, [t](uint16_t b) { return b == t; });
}

// x (M, V) bf16, contiguous, V >= 1: each row's argmax_bf16, (M, 1) int64 (torch.argmax(x, -1, keepdim=True)).
static at::Tensor argmax_rows(const at::Tensor &x) {
    const char *op = "qcal::argmax_rows";
    bf16_cpu(op, "x", x);
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0 && x.is_contiguous(), op,
                      ": x must be a contiguous (M, V) with V >= 1, got ", x.sizes());
    at::Tensor out = at::empty({x.size(0), 1}, x.options().dtype(at::kLong));
    const uint16_t *xp = qcal::in<uint16_t>(x);
    int64_t *o = out.data_ptr<int64_t>();
    for (int64_t m = 0; m < x.size(0); m++) o[m] = argmax_bf16(xp + m * x.size(1), x.size(1));
    return out;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("argmax_rows(Tensor x) -> Tensor");
    m.def("add_rmsnorm(Tensor(a!) x, Tensor? delta, Tensor weight, Tensor(b!) out, float eps) -> ()");
    m.def("rope_store(Tensor src, Tensor(a!) dst, Tensor? cos, Tensor? sin) -> ()");
    m.def("silu_mul(Tensor(a!) gate, Tensor up) -> ()");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("argmax_rows", &argmax_rows);
    m.impl("add_rmsnorm", &add_rmsnorm);
    m.impl("rope_store", &rope_store);
    m.impl("silu_mul", &silu_mul);
}

#include "decode_step_api.h"  // the decode step of a decoder stack, calling add_rmsnorm and silu_mul

#endif
