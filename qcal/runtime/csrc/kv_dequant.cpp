// The quantized KV cache's two passes (qcal.runtime.kv_cache), each equal bit for bit to its PyTorch reference.
// kv_quantize: bf16 rows -> uint8 codes (int8, or two int4 codes a byte, low nibble first) and a float16 scale and
//   minimum per group: mn = f16(min), s = f16((max - mn) / qmax) clamped to [2^-14, 65504], code = round-half-even
//   ((x - mn) / s) clamped to [0, qmax]; a group holding NaN or Inf gets a NaN scale (and codes 0).
// kv_dequant: y = bf16(code * scale + minimum), the multiply and the add each rounded to fp32 as PyTorch's two ops are.
// Rows are spread over the thread team.
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "ops.h"


static void kv_dequant_row(const uint8_t *c, const uint16_t *s, const uint16_t *mn, uint16_t *y, int64_t d,
                           int64_t g, int bits) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int64_t grp = 0; grp < d / g; grp++) {
        const __m512 vs = qcal_half_broadcast(s[grp]);
        const __m512 vm = qcal_half_broadcast(mn[grp]);
        const int64_t end = (grp + 1) * g;
        for (int64_t j = grp * g; j < end; j += 16) {
            const int64_t left = end - j;
            const __mmask16 live = qcal_tail16(left);
            __m128i b;
            if (bits == 8) {
                b = _mm_maskz_loadu_epi8(live, c + j);
            } else {  // j and left are even: codes j..j+15 are bytes j/2..j/2+7
                const __m128i raw = _mm_maskz_loadu_epi8(qcal_tail16(left / 2), c + j / 2);
                b = _mm_unpacklo_epi8(_mm_and_si128(raw, nibble), _mm_and_si128(_mm_srli_epi16(raw, 4), nibble));
            }
            const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
            qcal_store_bf16_masked(y + j, _mm512_add_ps(_mm512_mul_ps(x, vs), vm), live);
        }
    }
}

// Each (b, h, t) row of a (B, H, n, .) space over the thread team: f(flat row index, b, h, t).
template <typename F> static void for_each_row(int64_t B, int64_t H, int64_t n, int64_t grain, const F &f) {
    at::parallel_for(0, B * H * n, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) f(r, r / (n * H), (r / n) % H, r % n);
    });
}

// Row (b, h, t) of a tensor strided on its first three dimensions.
template <typename T> static inline T *row_of(T *base, const at::Tensor &t, int64_t b, int64_t h, int64_t i) {
    return base + b * t.stride(0) + h * t.stride(1) + i * t.stride(2);
}

static inline uint16_t half_bits(float f) {  // fp32 -> float16, round to nearest even (AVX512F's conversion)
    return (uint16_t)_mm_extract_epi16(
        _mm256_castsi256_si128(_mm512_cvtps_ph(_mm512_set1_ps(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), 0);
}

static void kv_quantize_row(const uint16_t *x, uint8_t *c, uint16_t *s, uint16_t *mn, int64_t d, int64_t g,
                            int bits) {
    const float qmax = (float)((1 << bits) - 1);
    for (int64_t grp = 0; grp < d / g; grp++) {
        const int64_t start = grp * g, end = start + g;
        __m512 vmin = _mm512_set1_ps(INFINITY), vmax = _mm512_set1_ps(-INFINITY);
        __m512 vnan = _mm512_setzero_ps();  // any NaN seen (min/max would skip it)
        for (int64_t j = start; j < end; j += 16) {
            const __mmask16 live = qcal_tail16(end - j);
            const __m512 v = qcal_load_bf16_masked(x + j, live);
            vmin = _mm512_mask_min_ps(vmin, live, vmin, v);
            vmax = _mm512_mask_max_ps(vmax, live, vmax, v);
            vnan = _mm512_mask_add_ps(vnan, live, vnan, _mm512_sub_ps(v, v));  // NaN for NaN or Inf
        }
        const float lo = _mm512_reduce_min_ps(vmin), hi = _mm512_reduce_max_ps(vmax);
        const bool bad = _mm512_reduce_add_ps(vnan) != 0.0f || !(lo == lo);
        const float lo_c = lo < -65504.0f ? -65504.0f : (lo > 65504.0f ? 65504.0f : lo);
        const uint16_t mn16 = half_bits(lo_c);
        const float mnf = _mm512_cvtph_ps(_mm256_set1_epi16((short)mn16))[0];
        float sc = (hi - mnf) / qmax;
        sc = sc < 0x1p-14f ? 0x1p-14f : (sc > 65504.0f ? 65504.0f : sc);
        const uint16_t s16 = bad ? (uint16_t)0x7E00 : half_bits(sc);
        s[grp] = s16;
        mn[grp] = mn16;
        const __m512 vm = _mm512_set1_ps(mnf), vs = _mm512_cvtph_ps(_mm256_set1_epi16((short)s16));
        for (int64_t j = start; j < end; j += 16) {
            const int64_t left = end - j;
            const __mmask16 live = qcal_tail16(left);
            __m512 q = _mm512_div_ps(_mm512_sub_ps(qcal_load_bf16_masked(x + j, live), vm), vs);
            q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(qmax));  // NaN -> 0 (max first)
            const __m128i b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q));
            if (bits == 8) {
                _mm_mask_storeu_epi8(c + j, live, b);
            } else {  // pair neighbouring codes: byte i = code 2i | code 2i+1 << 4
                const __m128i even = _mm_and_si128(b, _mm_set1_epi16(0x00FF));
                const __m128i odd = _mm_srli_epi16(b, 8);
                const __m128i packed = _mm_packus_epi16(_mm_or_si128(even, _mm_slli_epi16(odd, 4)), _mm_setzero_si128());
                _mm_mask_storeu_epi8(c + j / 2, qcal_tail16(left / 2), packed);
            }
        }
    }
}

// x (B, H, n, d) bf16 -> codes (B, H, n, d or d / 2) uint8, scale, minimum (B, H, n, G) float16, written in place
// (any strides on the first three dimensions of each, the last contiguous).
static void kv_quantize(const at::Tensor &x, at::Tensor &codes, at::Tensor &scale, at::Tensor &minimum, int64_t bits) {
    const char *op = "qcal::kv_quantize";
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), op, ": x must be a bf16 CPU tensor, got ",
                     x.scalar_type(), " on ", x.device());
    TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte && codes.device().is_cpu(), op,
                     ": codes must be a uint8 CPU tensor, got ", codes.scalar_type());
    TORCH_CHECK_TYPE(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf && scale.device().is_cpu() &&
                         minimum.device().is_cpu(),
                     op, ": scale and minimum must be float16 CPU tensors");
    TORCH_CHECK_VALUE(x.dim() == 4 && codes.dim() == 4 && scale.dim() == 4 && scale.sizes() == minimum.sizes() &&
                          codes.sizes().slice(0, 3) == x.sizes().slice(0, 3) &&
                          scale.sizes().slice(0, 3) == x.sizes().slice(0, 3),
                      op, ": x must be (B, H, n, d), codes (B, H, n, bytes), scale and minimum (B, H, n, groups), got ",
                      x.sizes(), ", ", codes.sizes(), ", ", scale.sizes(), ", ", minimum.sizes());
    TORCH_CHECK_VALUE(x.stride(3) == 1 && codes.stride(3) == 1 && scale.stride(3) == 1 && minimum.stride(3) == 1, op,
                      ": the last dimension of x, codes, scale and minimum must be contiguous");
    const int64_t B = x.size(0), H = x.size(1), n = x.size(2), d = x.size(3), G = scale.size(3);
    TORCH_CHECK_VALUE(codes.size(3) == (bits == 8 ? d : d / 2) && G > 0 && d % G == 0 &&
                          (bits == 8 || (d / G) % 2 == 0),
                      op, ": codes of ", codes.size(3), " bytes and ", G, " groups do not fit rows of ", d, " at ", bits,
                      " bits");
    const uint16_t *xp = qcal::in<uint16_t>(x);
    uint8_t *cp = qcal::out<uint8_t>(codes);
    uint16_t *sp = qcal::out<uint16_t>(scale), *mp = qcal::out<uint16_t>(minimum);
    const int64_t g = d / G;
    for_each_row(B, H, n, 256, [&](int64_t, int64_t b, int64_t h, int64_t t) {
        kv_quantize_row(row_of(xp, x, b, h, t), row_of(cp, codes, b, h, t), row_of(sp, scale, b, h, t),
                        row_of(mp, minimum, b, h, t), d, g, static_cast<int>(bits));
    });
}

// codes (B, H, n, d or d / 2) uint8; scale, minimum (B, H, n, G) float16; any strides on the first three dimensions,
// the last contiguous; bits 8 or 4. Returns (B, H, n, d) bf16, contiguous.
static at::Tensor kv_dequant(const at::Tensor &codes, const at::Tensor &scale, const at::Tensor &minimum,
                             int64_t bits) {
    const char *op = "qcal::kv_dequant";
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, op, ": bits must be 8 or 4, got ", bits);
    TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte && codes.device().is_cpu(), op,
                     ": codes must be a uint8 CPU tensor, got ", codes.scalar_type(), " on ", codes.device());
    TORCH_CHECK_TYPE(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf && scale.device().is_cpu() &&
                         minimum.device().is_cpu(),
                     op, ": scale and minimum must be float16 CPU tensors, got ", scale.scalar_type(), " and ",
                     minimum.scalar_type());
    TORCH_CHECK_VALUE(codes.dim() == 4 && scale.dim() == 4 && scale.sizes() == minimum.sizes() &&
                          codes.sizes().slice(0, 3) == scale.sizes().slice(0, 3),
                      op, ": codes must be (B, H, n, bytes) and scale, minimum (B, H, n, groups), got ", codes.sizes(),
                      ", ", scale.sizes(), ", ", minimum.sizes());
    TORCH_CHECK_VALUE(codes.stride(3) == 1 && scale.stride(3) == 1 && minimum.stride(3) == 1, op,
                      ": the last dimension of codes, scale and minimum must be contiguous");
    const int64_t B = codes.size(0), H = codes.size(1), n = codes.size(2), G = scale.size(3);
    const int64_t d = bits == 8 ? codes.size(3) : 2 * codes.size(3);
    TORCH_CHECK_VALUE(G > 0 && d > 0 && d % G == 0 && (bits == 8 || (d / G) % 2 == 0), op, ": ", G,
                      " groups do not split a row of ", d, " codes", bits == 4 ? " into even groups" : "");
    at::Tensor y = at::empty({B, H, n, d}, codes.options().dtype(at::kBFloat16));
    const uint8_t *c = qcal::in<uint8_t>(codes);
    const uint16_t *s = qcal::in<uint16_t>(scale), *mn = qcal::in<uint16_t>(minimum);
    uint16_t *o = qcal::out<uint16_t>(y);
    const int64_t g = d / G;
    for_each_row(B, H, n, 512, [&](int64_t r, int64_t b, int64_t h, int64_t t) {
        kv_dequant_row(row_of(c, codes, b, h, t), row_of(s, scale, b, h, t), row_of(mn, minimum, b, h, t), o + r * d,
                       d, g, static_cast<int>(bits));
    });
    return y;
}

TORCH_LIBRARY_FRAGMENT(qcal, m) {
    m.def("kv_dequant(Tensor codes, Tensor scale, Tensor minimum, int bits) -> Tensor");
    m.def("kv_quantize(Tensor x, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!) minimum, int bits) -> ()");
}

TORCH_LIBRARY_IMPL(qcal, CPU, m) {
    m.impl("kv_dequant", &kv_dequant);
    m.impl("kv_quantize", &kv_quantize);
}

TORCH_LIBRARY_IMPL(qcal, Meta, m) {
    m.impl("kv_dequant", [](const at::Tensor &codes, const at::Tensor &, const at::Tensor &, int64_t bits) {
        return at::empty_symint({codes.sym_size(0), codes.sym_size(1), codes.sym_size(2),
                                 bits == 4 ? codes.sym_size(3) * 2 : codes.sym_size(3)},
                                codes.options().dtype(at::kBFloat16));
    });
}
