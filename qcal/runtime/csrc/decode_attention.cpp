// One-query attention over a bf16 KV cache (a decode step), AVX512: out = softmax(scale q K^T + mask) V.
//
// Grouped-query attention without copying the cache: the G = hq / hkv query heads that share a KV head
// are processed together, so every key and value row is read once. Work items are (KV head, slice of
// positions); each keeps an online softmax (running max, sum, fp32 accumulator) over blocks of
// positions, and the slices are merged at the end. Masked positions (mask[j] == 0) contribute exactly
// nothing; a query that sees no position gets zeros. Accumulation is fp32, the output is rounded once
// to bf16.
//
// The cache may also be quantized (qcal.runtime.kv_cache's layout: uint8 codes, int8 or two int4 a byte, and a
// float16 scale and minimum per group of 16k values of each row): rows are dequantized in registers as they are read,
// to the bf16 values kv_dequant writes (code * scale, then + minimum, each rounded to fp32, then to bf16), so the
// result is bit for bit that of this kernel over the dequantized cache, without writing it out.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <type_traits>

#include "bf16.h"
#include "ops.h"
#include "parallel.h"
#include "rope.h"
#include "vexp.h"

#define QCAL_ATTN_MAX_G 16
#define QCAL_ATTN_MAX_D 256
#define QCAL_ATTN_BLOCK 128


// The lane sums of 16 vectors, as one vector (element p: the sum of v[p]), by a transposing tree of adds: 15 adds
// and 30 shuffles instead of 16 horizontal reductions.
static inline __m512 sum16(const __m512 *v) {
    __m512 x[8], y[4];
    for (int k = 0; k < 8; k++)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        x[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) {  // per 128-bit lane: the lane's total of v[4k], v[4k+1], v[4k+2], v[4k+3]
        const __m512d a = _mm512_castps_pd(x[2 * k]), b = _mm512_castps_pd(x[2 * k + 1]);
        y[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
    const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// Row readers: at(h) is head h's reader; block(b0, nb, D, scratch) a BlockRows over positions [b0, b0 + nb): the
// cache itself for bf16, the rows dequantized once into `scratch` (nb x D fp32 holding the bf16 values kv_dequant
// writes) for a quantized cache, so that the G query heads sharing the KV head read them from L1 without
// dequantizing or widening them G times.
template <typename E> struct BlockRows {
    const E *p;
    int64_t rs, base;
    __m512 load(int64_t j, int64_t t) const {
        if constexpr (sizeof(E) == 2) return qcal_load_bf16(p + (j - base) * rs + 16 * t);
        else return _mm512_loadu_ps(p + (j - base) * rs + 16 * t);
    }
};

struct Bf16Rows {
    using Elem = uint16_t;
    static constexpr int64_t BLK = QCAL_ATTN_BLOCK;
    const uint16_t *p;
    int64_t hs, rs;
    Bf16Rows at(int64_t h) const { return {p + h * hs, hs, rs}; }
    BlockRows<uint16_t> block(int64_t, int64_t, int64_t, uint16_t *) const { return {p, rs, 0}; }
};

// F32: the block's rows as fp32 holding bf16 values, so that the G > 1 heads' loads need no widening (blocks of 32
// positions: K and V stay in L1); else as bf16 (one head reads each row once).
template <int BITS, bool F32> struct QuantRows {  // codes (hs, rs bytes), scale / minimum float16 (ghs, grs), groups
    using Elem = std::conditional_t<F32, float, uint16_t>;
    static constexpr int64_t BLK = F32 ? QCAL_ATTN_BLOCK / 4 : QCAL_ATTN_BLOCK;
    const uint8_t *c;
    const uint16_t *s, *mn;
    int64_t hs, rs, ghs, grs, g;
    QuantRows at(int64_t h) const { return {c + h * hs, s + h * ghs, mn + h * ghs, hs, rs, ghs, grs, g}; }
    BlockRows<Elem> block(int64_t b0, int64_t nb, int64_t D, Elem *scratch) const {
        const __m128i nib = _mm_set1_epi8(0x0F);
        for (int64_t i = 0; i < nb; i++) {
            const int64_t j = b0 + i;
            const uint8_t *cr = c + j * rs;
            Elem *out = scratch + i * D;
            for (int64_t grp = 0; grp < D / g; grp++) {  // one broadcast of the scale and minimum a group
                const __m512 sv = qcal_half_broadcast(s[j * grs + grp]);
                const __m512 mv = qcal_half_broadcast(mn[j * grs + grp]);
                for (int64_t t = grp * g / 16; t < (grp + 1) * g / 16; t++) {
                    __m128i b;
                    if (BITS == 8) {
                        b = _mm_loadu_si128((const __m128i *)(cr + 16 * t));
                    } else {
                        const __m128i raw = _mm_loadl_epi64((const __m128i *)(cr + 8 * t));
                        b = _mm_unpacklo_epi8(_mm_and_si128(raw, nib), _mm_and_si128(_mm_srli_epi16(raw, 4), nib));
                    }
                    const __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), sv), mv);
                    if constexpr (F32)
                        _mm512_storeu_ps(out + 16 * t, qcal_round_bf16(y));
                    else
                        _mm256_storeu_si256((__m256i *)(out + 16 * t), (__m256i)_mm512_cvtneps_pbh(y));
                }
            }
        }
        return {scratch, D, b0};
    }
};

// One work item: KV head g's G query heads over positions [j0, j1). Leaves the running max m[r],
// sum l[r] and unnormalised accumulator acc[r * D ...] for each query head r.
template <class KR, class VR>
static inline __attribute__((always_inline)) void attend_slice(
    const uint16_t *q, const KR &k_rows, const VR &v_rows, const uint8_t *mask, int64_t j0, int64_t j1,
    const int64_t G, const int64_t D, float scale, float *m, float *l, float *acc) {
    const int64_t T = D / 16;
    for (int64_t r = 0; r < G; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int64_t t = 0; t < T; t++) _mm512_storeu_ps(acc + r * D + 16 * t, _mm512_setzero_ps());
    }
    float s[QCAL_ATTN_MAX_G][QCAL_ATTN_BLOCK] __attribute__((aligned(64)));
    constexpr int64_t BLK = KR::BLK;
    for (int64_t b0 = j0; b0 < j1; b0 += BLK) {
        const int64_t nb = (j1 - b0) < BLK ? (j1 - b0) : BLK;
        int any = 0;
        for (int64_t i = 0; i < nb && !any; i++) any = !mask || mask[b0 + i];
        if (!any) continue;
        typename KR::Elem kbuf[KR::BLK * QCAL_ATTN_MAX_D] __attribute__((aligned(64)));
        typename VR::Elem vbuf[VR::BLK * QCAL_ATTN_MAX_D] __attribute__((aligned(64)));
        const auto kh = k_rows.block(b0, nb, D, kbuf), vh = v_rows.block(b0, nb, D, vbuf);
        for (int64_t r = 0; r < G; r++) {  // scores of head r: the block's keys stay in L1 across heads
            __m512 qr[QCAL_ATTN_MAX_D / 16];
            for (int64_t t = 0; t < T; t++) qr[t] = _mm512_mul_ps(qcal_load_bf16(q + r * D + 16 * t), _mm512_set1_ps(scale));
            float *sr = s[r];
            int64_t i = 0;
            for (; i + 16 <= nb; i += 16) {  // 16 positions' products, summed across lanes together
                __m512 d[16];
                for (int p = 0; p < 16; p++) {
                    d[p] = _mm512_mul_ps(qr[0], kh.load(b0 + i + p, 0));
                    for (int64_t t = 1; t < T; t++) d[p] = _mm512_fmadd_ps(qr[t], kh.load(b0 + i + p, t), d[p]);
                }
                _mm512_storeu_ps(sr + i, sum16(d));
            }
            for (; i < nb; i++) {
                __m512 d = _mm512_mul_ps(qr[0], kh.load(b0 + i, 0));
                for (int64_t t = 1; t < T; t++) d = _mm512_fmadd_ps(qr[t], kh.load(b0 + i, t), d);
                sr[i] = _mm512_reduce_add_ps(d);
            }
            if (mask)
                for (int64_t i = 0; i < nb; i++)
                    if (!mask[b0 + i]) sr[i] = -INFINITY;
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
                for (int64_t t = 0; t < T; t++) a[t] = _mm512_fmadd_ps(p, vh.load(b0 + i, t), a[t]);
            }
            for (int64_t t = 0; t < T; t++) _mm512_storeu_ps(acc + r * D + 16 * t, a[t]);
        }
    }
}

// A call's work items (KV heads x position slices) for the threads.
template <class KR, class VR> struct attend_job {
    const uint16_t *q;
    const KR *k;
    const VR *v;
    const uint8_t *mask;
    int64_t L, D, G, slices, items;
    float scale;
    float *ml, *accs;
};

// Thread t's items of T (qcal_slice_items).
template <class KR, class VR> static void attend_share(const void *arg, int t, int T) {
    const attend_job<KR, VR> *a = (const attend_job<KR, VR> *)arg;
    const int64_t G = a->G, D = a->D;
    qcal_slice_items(a->items, a->slices, a->L, t, T, [&](int64_t it, int64_t g, int64_t j0, int64_t j1) {
        float *m = a->ml + it * G * 2, *l = m + G, *acc = a->accs + it * G * D;
        if (D == 64)
            attend_slice(a->q + g * G * D, a->k->at(g), a->v->at(g), a->mask, j0, j1, G, 64, a->scale, m, l, acc);
        else
            attend_slice(a->q + g * G * D, a->k->at(g), a->v->at(g), a->mask, j0, j1, G, D, a->scale, m, l, acc);
    });
}

// q (hq, D) bf16 contiguous; k / v: row readers of the hkv heads; mask: L bytes (0 = masked) or NULL;
// out (hq, D) bf16. Returns 0, or -1 on an unsupported shape, -2 on allocation failure. The items run on the
// calling thread's team where it leads one (the decode step), else in an OpenMP region.
template <class KR, class VR>
static int attend(const uint16_t *q, const KR &k, const VR &v, const uint8_t *mask, uint16_t *out,
                  int64_t hq, int64_t hkv, int64_t L, int64_t D, float scale, int nthreads) {
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
    const attend_job<KR, VR> job = {q, &k, &v, mask, L, D, G, slices, items, scale, ml, accs};
    if (nthreads > 1 && items > 1) qcal_parallel(nthreads, attend_share<KR, VR>, &job);
    else attend_share<KR, VR>(&job, 0, 1);
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

// Attention over a bf16 cache given by pointers and (head, position) strides: the form the operators share with the
// AVX2 build.
static int attend_bf16(const uint16_t *q, const uint16_t *k, int64_t k_hs, int64_t k_ps, const uint16_t *v,
                       int64_t v_hs, int64_t v_ps, const uint8_t *mask, uint16_t *out, int64_t hq, int64_t hkv,
                       int64_t L, int64_t D, float scale, int nthreads) {
    const Bf16Rows kr{k, k_hs, k_ps}, vr{v, v_hs, v_ps};
    return attend(q, kr, vr, mask, out, hq, hkv, L, D, scale, nthreads);
}

// ------------------------------------------------------------------ operator

#include "decode_attention_api.h"  // the operators (ISA-neutral): shared with the other instruction set's build

// One of the quantized cache's tensors: (1, hkv, L, cols) of `dtype`, last dimension contiguous.
static void check_kv(const char *op, const char *name, const at::Tensor &t, at::ScalarType dtype, int64_t hkv,
                     int64_t L, int64_t cols) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype && t.device().is_cpu(), op, ": ", name, " must be a ",
                     c10::toString(dtype), " CPU tensor, got ", t.scalar_type(), " on ", t.device());
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == 1 && t.size(1) == hkv && t.size(2) == L && t.size(3) == cols &&
                          t.stride(3) == 1,
                      op, ": ", name, " must be (1, ", hkv, ", ", L, ", ", cols,
                      ") with a contiguous last dimension, got ", t.sizes(), " strides ", t.strides());
}

// q (1, hq, 1, D) bf16; k / v codes (1, hkv, L, D or D / 2) uint8, their scales and minima (1, hkv, L, D / g)
// float16 with g a multiple of 16; bits 8 or 4. Returns (1, 1, hq, D) bf16.
static at::Tensor decode_attention_kv(const at::Tensor &q, const at::Tensor &kc, const at::Tensor &ks,
                                      const at::Tensor &km, const at::Tensor &vc, const at::Tensor &vs,
                                      const at::Tensor &vm, int64_t bits, double scale) {
    const char *op = "qcal::decode_attention_kv";
    TORCH_CHECK_TYPE(q.scalar_type() == at::kBFloat16 && q.device().is_cpu(), op, ": q must be a bf16 CPU tensor");
    TORCH_CHECK_VALUE(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, op,
                      ": q must be (1, heads, 1, head_dim), got ", q.sizes());
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
    TORCH_CHECK_VALUE(kc.dim() == 4 && ks.dim() == 4, op, ": the codes and scales must be 4-D, got ", kc.sizes(),
                      " and ", ks.sizes());
    const int64_t hq = q.size(1), hkv = kc.size(1), L = kc.size(2), D = q.size(3), groups = ks.size(3);
    TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0 && hq / hkv <= QCAL_ATTN_MAX_G && D > 0 && D % 16 == 0 &&
                          D <= QCAL_ATTN_MAX_D,
                      op, ": unsupported heads ", hq, " over ", hkv, " KV heads, head_dim ", D);
    TORCH_CHECK_VALUE(groups > 0 && D % groups == 0 && (D / groups) % 16 == 0, op, ": ", groups,
                      " groups a row of ", D, " must hold a multiple of 16 values each");
    const int64_t cols = bits == 8 ? D : D / 2;
    check_kv(op, "k codes", kc, at::kByte, hkv, L, cols);
    check_kv(op, "v codes", vc, at::kByte, hkv, L, cols);
    check_kv(op, "k scale", ks, at::kHalf, hkv, L, groups);
    check_kv(op, "k minimum", km, at::kHalf, hkv, L, groups);
    check_kv(op, "v scale", vs, at::kHalf, hkv, L, groups);
    check_kv(op, "v minimum", vm, at::kHalf, hkv, L, groups);
    TORCH_CHECK_VALUE(ks.strides() == km.strides() && vs.strides() == vm.strides(), op,
                      ": each scale and its minimum must share strides");
    at::Tensor qc = q.contiguous();
    at::Tensor o = at::empty({1, 1, hq, D}, q.options());
    const int64_t g = D / groups;
    auto run = [&](auto kr, auto vr) {
        qcal::check_rc(op, attend(qcal::in<uint16_t>(qc), kr, vr, nullptr, qcal::out<uint16_t>(o), hq, hkv, L, D,
                                  static_cast<float>(scale), qcal::threads()));
    };
    auto rows = [&](auto tag, const at::Tensor &c, const at::Tensor &s, const at::Tensor &mn) {
        return decltype(tag){qcal::in<uint8_t>(c), qcal::in<uint16_t>(s), qcal::in<uint16_t>(mn), c.stride(1),
                             c.stride(2), s.stride(1), s.stride(2), g};
    };
    const bool shared = hq > hkv;  // grouped heads read each dequantized row several times
    if (bits == 8 && shared)
        run(rows(QuantRows<8, true>{}, kc, ks, km), rows(QuantRows<8, true>{}, vc, vs, vm));
    else if (bits == 8)
        run(rows(QuantRows<8, false>{}, kc, ks, km), rows(QuantRows<8, false>{}, vc, vs, vm));
    else if (shared)
        run(rows(QuantRows<4, true>{}, kc, ks, km), rows(QuantRows<4, true>{}, vc, vs, vm));
    else
        run(rows(QuantRows<4, false>{}, kc, ks, km), rows(QuantRows<4, false>{}, vc, vs, vm));
    return o;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
    m.def("decode_step_attention(Tensor(a!) q, Tensor k, Tensor v, Tensor(b!) k_cache, Tensor(c!) v_cache, int pos, "
          "Tensor cos, Tensor sin, float scale) -> Tensor");
    m.def("decode_attention_kv(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_min, Tensor v_codes, "
          "Tensor v_scale, Tensor v_min, int bits, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("decode_attention", &decode_attention);
    m.impl("decode_step_attention", &decode_step_attention);
    m.impl("decode_attention_kv", &decode_attention_kv);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("decode_attention", [](const at::Tensor &q, const at::Tensor &, const at::Tensor &,
                                  const std::optional<at::Tensor> &, double) {
        return at::empty_symint({1, 1, q.sym_size(1), q.sym_size(3)}, q.options());
    });
}
