/* The online Hadamard transform of activation rows: y = x Hᵀ with H = (A ⊗ S_p) / sqrt(n), n = m p.

   S_p is the Sylvester matrix of order p (a power of two), applied to each of a row's m chunks of p values by the
   in-place fast Walsh–Hadamard butterflies (log2 p passes); A is the m x m ±1 factor (Paley-built, m small) that
   then mixes the chunks: y_i = sum_j A[i, j] z_j, chunk by chunk (m n multiply-adds a row). Everything runs in
   float32 on a row held in a thread's buffer; bf16 rows are rounded once, when stored. Rows are split over
   the threads (one row a task). */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "ops.h"

/* The first four butterfly passes (h = 1, 2, 4, 8) within one vector of 16: each pass adds a lane to its partner
   (lane ^ h, brought by a permute) on the low side and subtracts on the high side. */
static inline __m512 fwht16(__m512 v) {
    __m512 t = _mm512_permute_ps(v, 0xB1);  // lanes 2k <-> 2k+1
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, t), 0xAAAA, t, v);
    t = _mm512_permute_ps(v, 0x4E);  // pairs of lanes swapped within 128 bits
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, t), 0xCCCC, t, v);
    t = _mm512_shuffle_f32x4(v, v, 0xB1);  // 128-bit quarters swapped pairwise
    v = _mm512_mask_sub_ps(_mm512_add_ps(v, t), 0xF0F0, t, v);
    t = _mm512_shuffle_f32x4(v, v, 0x4E);  // 256-bit halves swapped
    return _mm512_mask_sub_ps(_mm512_add_ps(v, t), 0xFF00, t, v);
}

/* In place: x (p floats) <- S_p x, natural (Sylvester) order. */
static void fwht_inplace(float *x, int64_t p) {
    int64_t h0 = 1;
    if (p >= 16) {
        for (int64_t j = 0; j < p; j += 16) _mm512_storeu_ps(x + j, fwht16(_mm512_loadu_ps(x + j)));
        h0 = 16;
    }
    for (int64_t h = h0; h < p; h *= 2) {
        for (int64_t i = 0; i < p; i += 2 * h) {
            if (h >= 16) {
                for (int64_t j = i; j < i + h; j += 16) {
                    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + h);
                    _mm512_storeu_ps(x + j, _mm512_add_ps(a, b));
                    _mm512_storeu_ps(x + j + h, _mm512_sub_ps(a, b));
                }
            } else {
                for (int64_t j = i; j < i + h; j++) {
                    const float a = x[j], b = x[j + h];
                    x[j] = a + b;
                    x[j + h] = a - b;
                }
            }
        }
    }
}

/* rows (M, n) of bf16 (is_bf16) or float32 -> out, the same layout; a (m, m) float32 of ±1; returns 0, -1 for
   arguments it refuses, -2 when a buffer cannot be allocated. */
static int hadamard_rows(const void *x, void *out, int is_bf16, int64_t M, int64_t n, const float *a, int64_t m,
                         int nthreads) {
    if (M < 0 || n <= 0 || m <= 0 || n % m) return -1;
    const int64_t p = n / m;
    if (p & (p - 1)) return -1;
    const float scale = (float)(1.0 / sqrt((double)n));  // 1/sqrt(n) rounded once
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (M < nthreads) nthreads = M > 0 ? (int)M : 1;
#pragma omp parallel num_threads(nthreads)
    {
        float *z = (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        float *y = m > 1 ? (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64) : z;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++) {
            if (!z || !y) {  // every thread still takes its share of the loop (no barrier left waiting)
#pragma omp atomic write
                failed = 1;
                continue;
            }
            {
                if (is_bf16) {
                    const uint16_t *xr = (const uint16_t *)x + r * n;
                    for (int64_t j = 0; j < n; j += 16) {
                        const __mmask16 live = qcal_tail16(n - j);
                        _mm512_mask_storeu_ps(z + j, live, qcal_load_bf16_masked(xr + j, live));
                    }
                } else {
                    const float *xr = (const float *)x + r * n;
                    for (int64_t j = 0; j < n; j++) z[j] = xr[j];
                }
                for (int64_t c = 0; c < m; c++) fwht_inplace(z + c * p, p);
                if (m > 1) {
                    for (int64_t i = 0; i < m; i++) {
                        float *yi = y + i * p;
                        for (int64_t t = 0; t < p; t += 16) {
                            const __mmask16 live = qcal_tail16(p - t);
                            __m512 acc = _mm512_setzero_ps();
                            for (int64_t j = 0; j < m; j++)
                                acc = _mm512_fmadd_ps(_mm512_set1_ps(a[i * m + j]),
                                                      _mm512_maskz_loadu_ps(live, z + j * p + t), acc);
                            _mm512_mask_storeu_ps(yi + t, live, acc);
                        }
                    }
                }
                const __m512 vs = _mm512_set1_ps(scale);
                for (int64_t j = 0; j < n; j += 16) {
                    const __mmask16 live = qcal_tail16(n - j);
                    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, y + j), vs);
                    if (is_bf16)
                        qcal_store_bf16_masked((uint16_t *)out + r * n + j, v, live);
                    else
                        _mm512_mask_storeu_ps((float *)out + r * n + j, live, v);
                }
            }
        }
        if (y != z) free(y);
        free(z);
    }
    return failed ? -2 : 0;
}

// ------------------------------------------------------------------ operator

// x (M, n) bf16 or float32 on the CPU (any strides: read contiguous), a (m, m) float32 contiguous with n = m * p,
// p a power of two; returns x Hᵀ, H = kron(a, S_p) / sqrt(n), in x's dtype.
static at::Tensor hadamard(const at::Tensor &x, const at::Tensor &a) {
    const char *op = "qcal::hadamard";
    TORCH_CHECK_TYPE((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.device().is_cpu(), op,
                     ": x must be a bf16 or float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, op, ": x must be (M, n) with n > 0, got ", x.sizes());
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == a.size(1) && a.size(0) > 0, op, ": a must be a square (m, m), got ",
                      a.sizes());
    const int64_t n = x.size(1), m = a.size(0);
    qcal::check_tensor(op, "a", a, at::kFloat, {m, m});
    TORCH_CHECK_VALUE(n % m == 0 && ((n / m) & (n / m - 1)) == 0, op, ": n = ", n, " must be m = ", m,
                      " times a power of two");
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc);
    const int64_t M = xc.size(0);
    qcal::check_rc(op, hadamard_rows(xc.const_data_ptr(), out.mutable_data_ptr(), x.scalar_type() == at::kBFloat16,
                                     M, n, qcal::in<float>(a), m, M * n >= (1 << 16) ? qcal::threads() : 1));
    return out;
}

static at::Tensor hadamard_meta(const at::Tensor &x, const at::Tensor &a) { return at::empty_like(x); }

TORCH_LIBRARY_FRAGMENT(qcal, m) { m.def("hadamard(Tensor x, Tensor a) -> Tensor"); }

TORCH_LIBRARY_IMPL(qcal, CPU, m) { m.impl("hadamard", &hadamard); }

TORCH_LIBRARY_IMPL(qcal, Meta, m) { m.impl("hadamard", &hadamard_meta); }
