// One-query attention over a bf16 KV cache (a decode step), AVX512: out = softmax(scale q K^T + mask) V.
//
// Grouped-query attention without copying the cache: the G = hq / hkv query heads that share a KV head
// are processed together, so every key and value row is read once. Work items are (KV head, slice of
// positions); each keeps an online softmax (running max, sum, fp32 accumulator) over blocks of
// positions, and the slices are merged at the end. Masked positions (mask[j] == 0) contribute exactly
// nothing; a query that sees no position gets zeros. Accumulation is fp32, the output is rounded once
// to bf16.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "ops.h"
#include "vexp.h"

#define QCAL_ATTN_MAX_G 16
#define QCAL_ATTN_MAX_D 256
#define QCAL_ATTN_BLOCK 128


// One work item: KV head g's G query heads over positions [j0, j1). Leaves the running max m[r],
// sum l[r] and unnormalised accumulator acc[r * D ...] for each query head r.
static inline __attribute__((always_inline)) void attend_slice(
    const uint16_t *q, const uint16_t *kh, const uint16_t *vh, const uint8_t *mask, int64_t j0, int64_t j1,
    int64_t k_rs, int64_t v_rs, const int64_t G, const int64_t D, float scale, float *m, float *l, float *acc) {
    const int64_t T = D / 16;
    for (int64_t r = 0; r < G; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int64_t t = 0; t < T; t++) _mm512_storeu_ps(acc + r * D + 16 * t, _mm512_setzero_ps());
    }
    float s[QCAL_ATTN_MAX_G][QCAL_ATTN_BLOCK] __attribute__((aligned(64)));
    for (int64_t b0 = j0; b0 < j1; b0 += QCAL_ATTN_BLOCK) {
        const int64_t nb = (j1 - b0) < QCAL_ATTN_BLOCK ? (j1 - b0) : QCAL_ATTN_BLOCK;
        int any = 0;
        for (int64_t i = 0; i < nb && !any; i++) any = !mask || mask[b0 + i];
        if (!any) continue;
        for (int64_t r = 0; r < G; r++) {  // scores of head r: the block's keys stay in L1 across heads
            __m512 qr[QCAL_ATTN_MAX_D / 16];
            for (int64_t t = 0; t < T; t++) qr[t] = _mm512_mul_ps(qcal_load_bf16(q + r * D + 16 * t), _mm512_set1_ps(scale));
            float *sr = s[r];
            for (int64_t i = 0; i < nb; i++) {
                const int64_t j = b0 + i;
                if (mask && !mask[j]) {
                    sr[i] = -INFINITY;
                    continue;
                }
                const uint16_t *kr = kh + j * k_rs;
                __m512 d = _mm512_mul_ps(qr[0], qcal_load_bf16(kr));
                for (int64_t t = 1; t < T; t++) d = _mm512_fmadd_ps(qr[t], qcal_load_bf16(kr + 16 * t), d);
                sr[i] = _mm512_reduce_add_ps(d);
            }
            float bmax = -INFINITY;
            for (int64_t i = 0; i < nb; i++) bmax = sr[i] > bmax ? sr[i] : bmax;
            __m512 a[QCAL_ATTN_MAX_D / 16];
            for (int64_t t = 0; t < T; t++) a[t] = _mm512_loadu_ps(acc + r * D + 16 * t);
            if (bmax > m[r]) {  // rescale what was accumulated under the old max
                const float c = m[r] == -INFINITY ? 0.0f : expf(m[r] - bmax);
                l[r] *= c;
                for (int64_t t = 0; t < T; t++) a[t] = _mm512_mul_ps(a[t], _mm512_set1_ps(c));
                m[r] = bmax;
            }
            __m512 sum = _mm512_setzero_ps();
            const __m512 vm = _mm512_set1_ps(m[r]);
            for (int64_t i = 0; i < nb; i += 16) {
                const __mmask16 tail = (nb - i) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - i)) - 1);
                __m512 x = _mm512_maskz_loadu_ps(tail, sr + i);
                const __mmask16 live = _mm512_mask_cmp_ps_mask(tail, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                __m512 p = _mm512_maskz_mov_ps(live, qcal_exp_nonpos(_mm512_sub_ps(x, vm)));
                _mm512_mask_storeu_ps(sr + i, tail, p);
                sum = _mm512_add_ps(sum, p);
            }
            l[r] += _mm512_reduce_add_ps(sum);
            for (int64_t i = 0; i < nb; i++) {  // accumulate p V in registers
                if (sr[i] == 0.0f) continue;
                const __m512 p = _mm512_set1_ps(sr[i]);
                const uint16_t *vr = vh + (b0 + i) * v_rs;
                for (int64_t t = 0; t < T; t++) a[t] = _mm512_fmadd_ps(p, qcal_load_bf16(vr + 16 * t), a[t]);
            }
            for (int64_t t = 0; t < T; t++) _mm512_storeu_ps(acc + r * D + 16 * t, a[t]);
        }
    }
}

// q (hq, D) bf16 contiguous; head h of k / v starts at k + h * k_hs, position j at + j * k_rs (elements);
// mask: L bytes (0 = masked) or NULL; out (hq, D) bf16. Returns 0, or -1 on an unsupported shape, -2 on
// allocation failure.
static int attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                  int64_t hq, int64_t hkv, int64_t L, int64_t D, int64_t k_hs, int64_t k_rs, int64_t v_hs,
                  int64_t v_rs, float scale, int nthreads) {
    if (hkv <= 0 || hq % hkv || hq / hkv > QCAL_ATTN_MAX_G || D % 16 || D <= 0 || D > QCAL_ATTN_MAX_D || L < 0)
        return -1;
    const int64_t G = hq / hkv;
    if (nthreads < 1) nthreads = 1;
    int64_t slices = 1;  // split positions until the threads get equal shares (not below 64 positions a slice)
    while (slices < 64 && (hkv * slices) % nthreads && hkv * slices < 8 * nthreads && L / (slices + 1) >= 64)
        slices++;
    const int64_t items = hkv * slices;
    float *ml = (float *)malloc(sizeof(float) * items * G * (2 + D));
    if (!ml) return -2;
    float *accs = ml + items * G * 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / slices, c = it % slices;
        const int64_t j0 = L * c / slices, j1 = L * (c + 1) / slices;
        float *m = ml + it * G * 2, *l = m + G, *acc = accs + it * G * D;
        if (D == 64)
            attend_slice(q + g * G * D, k + g * k_hs, v + g * v_hs, mask, j0, j1, k_rs, v_rs, G, 64, scale, m, l,
                         acc);
        else
            attend_slice(q + g * G * D, k + g * k_hs, v + g * v_hs, mask, j0, j1, k_rs, v_rs, G, D, scale, m, l,
                         acc);
    }
    for (int64_t g = 0; g < hkv; g++) {
        for (int64_t r = 0; r < G; r++) {
            float mx = -INFINITY;
            for (int64_t c = 0; c < slices; c++) {
                const float mc = ml[(g * slices + c) * G * 2 + r];
                mx = mc > mx ? mc : mx;
            }
            float total = 0.0f;
            float w[64];
            const int64_t ns = slices < 64 ? slices : 64;
            for (int64_t c = 0; c < ns; c++) {
                const float *mc = ml + (g * slices + c) * G * 2;
                w[c] = mc[r] == -INFINITY ? 0.0f : expf(mc[r] - mx);
                total += w[c] * mc[G + r];
            }
            const float inv = total > 0.0f ? 1.0f / total : 0.0f;
            uint16_t *o = out + (g * G + r) * D;
            for (int64_t t = 0; t < D / 16; t++) {
                __m512 y = _mm512_setzero_ps();
                for (int64_t c = 0; c < ns; c++)
                    y = _mm512_fmadd_ps(_mm512_set1_ps(w[c]),
                                        _mm512_loadu_ps(accs + ((g * slices + c) * G + r) * D + 16 * t), y);
                y = _mm512_mul_ps(y, _mm512_set1_ps(inv));
                _mm256_storeu_si256((__m256i *)(o + 16 * t), (__m256i)_mm512_cvtneps_pbh(y));
            }
        }
    }
    free(ml);
    return 0;
}

// ------------------------------------------------------------------ operator

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
    qcal::check_rc(op, attend(qcal::in<uint16_t>(qc), qcal::in<uint16_t>(k), qcal::in<uint16_t>(v),
                              qcal::in_opt<uint8_t>(m), qcal::out<uint16_t>(o), hq, hkv, L, D, k.stride(1),
                              k.stride(2), v.stride(1), v.stride(2), static_cast<float>(scale), qcal::threads()));
    return o;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("decode_attention", &decode_attention); }

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("decode_attention", [](const at::Tensor &q, const at::Tensor &, const at::Tensor &,
                                  const std::optional<at::Tensor> &, double) {
        return at::empty_symint({1, 1, q.sym_size(1), q.sym_size(3)}, q.options());
    });
}
