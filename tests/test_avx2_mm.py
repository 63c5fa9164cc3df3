"""The small-M matmul operators (``w16a16_mm_small``, ``w8a16_mm_vnni``, ``w8a8_mm_small``, ``w8a16_mm_small``,
``wf8a16_mm_small``, ``wf8a8_mm``) on whichever native library is loaded (AVX-512 or AVX2): numbers against float64
references, the documented arithmetic bit for bit, tails of M, N and K, outlier, zero and non-finite rows, argument
checks, and the fp8 layers that run them.

bf16 products: fp32 lanes accumulate ``2 ceil(K / 32)`` products each (one rounding per FMA), 16 lanes are summed
pairwise (4 more roundings) and the sum is rounded once to bf16, so with ``u = 2^-24``, ``n = 2 ceil(K / 32) + 4``
and ``e = n u / (1 - n u) * sum_k |x_k w_k|``, the result is within ``2^-8 (|exact| + e) + e`` of the exact dot
product.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import rel_err
from torch import nn

from qcal.kernels import native
from qcal.schemes import apply_scheme

pytestmark = pytest.mark.native_ops("w16a16_mm_small", "w8a16_mm_vnni")
ops = torch.ops.qcal
FLT_MIN = torch.finfo(torch.float32).tiny


def _gen(*key: int) -> torch.Generator:
    seed = 0
    for v in key:
        seed = (seed * 1000003 + v) % (2**31)
    return torch.Generator().manual_seed(seed)


def _bf16_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product (float64) and the bound on a bf16-product kernel's error (module docstring)."""
    exact = x.double() @ w.double().t()
    n = 2 * math.ceil(x.shape[1] / 32) + 4
    e = n * 2.0**-24 / (1 - n * 2.0**-24) * (x.double().abs() @ w.double().abs().t())
    return exact, 2.0**-8 * (exact.abs() + e) + e


def _vdpbf16ps(x: torch.Tensor, w: torch.Tensor, tree: bool = True) -> torch.Tensor:
    """The bf16 kernels' sums (fp32, before any scale): per lane j of 16 and 32 columns, fma(x[2j+1], w[2j+1], acc)
    then fma(x[2j], w[2j], acc), rounded to nearest even, denormal inputs as zero and tiny results flushed to zero
    (vdpbf16ps); then _mm512_reduce_add_ps's order (upper 8 lanes + lower 8, the 128-bit halves, lanes {0,1} + {2,3},
    lane 0 + lane 1; ``tree=False``: a running sum over the lanes instead). A bf16 x bf16 product is exact in
    float64 and so is its sum with an fp32 lane wherever that sum can round differently, so float64 then one
    rounding to fp32 is the FMA."""
    m, k = x.shape
    kp = -(-k // 32) * 32
    xf = torch.zeros(m, kp, dtype=torch.float64)
    wf = torch.zeros(w.shape[0], kp, dtype=torch.float64)
    xf[:, :k], wf[:, :k] = x.double(), w.double()
    xf[xf.abs() < FLT_MIN], wf[wf.abs() < FLT_MIN] = 0.0, 0.0
    acc = torch.zeros(m, w.shape[0], 16, dtype=torch.float64)
    for s in range(kp // 32):
        xs = xf[:, None, 32 * s:32 * s + 32].reshape(m, 1, 16, 2)
        ws = wf[None, :, 32 * s:32 * s + 32].reshape(1, -1, 16, 2)
        for pair in (1, 0):
            acc = (acc + xs[..., pair] * ws[..., pair]).float().double()
            acc = torch.where(acc.abs() < FLT_MIN, acc * 0.0, acc)
    a = acc.float()
    if not tree:
        out = a[..., 0]
        for lane in range(1, 16):
            out = out + a[..., lane]
        return out
    a = a[..., 8:] + a[..., :8]
    a = a[..., 4:] + a[..., :4]
    return (a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])


def _digits(x: torch.Tensor, w: torch.Tensor, wsum: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``w8a16_mm_vnni``'s documented arithmetic for finite rows: x scaled by 2^E, E = 23 - p with max |x| in
    [2^(p-1), 2^p), rounded half to even to xf; s = sum_k (xf + 2^23) w[n, k] - 2^23 wsum[n] (exact); then
    2^-E s ws[n] in double, rounded to fp32 and to bf16."""
    rows = []
    for row in x.double():
        top = row.abs().max().item()
        e = 23 - (math.frexp(top)[1] if top > 0 else 0)
        u = torch.round(row * 2.0**e).long() + (1 << 23)
        s = w.long() @ u - wsum.long() * (1 << 23)
        rows.append((s.double() * 2.0**-e * ws.double()).float())
    return torch.stack(rows).to(torch.bfloat16)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, any NaN matching any NaN."""
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())).all())


def _bf16_bits(shape, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """bf16 values of random sign and mantissa with biased exponents in [lo, hi] (0: zero and denormals)."""
    sign = torch.randint(0, 2, shape, generator=g) << 15
    exp = torch.randint(lo, hi + 1, shape, generator=g) << 7
    return (sign | exp | torch.randint(0, 128, shape, generator=g)).to(torch.int16).view(torch.bfloat16)


# ---------------------------------------------------------------- bf16 x bf16


@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 31), (5, 33), (70, 100), (16, 576), (9, 1000)])
def test_bf16_within_the_fp32_bound_and_exact_on_integers(m, n, k):
    g = _gen(m, n, k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    got = ops.w16a16_mm_small(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact, bound = _bf16_bound(x, w)
    assert ((got.double() - exact).abs() <= bound).all()
    ints = torch.randint(-8, 9, (m, k), generator=g).to(torch.bfloat16)  # every partial sum exact in fp32
    wints = torch.randint(-8, 9, (n, k), generator=g).to(torch.bfloat16)
    assert torch.equal(ops.w16a16_mm_small(ints, wints), (ints.long() @ wints.long().t()).float().to(torch.bfloat16))


@pytest.mark.parametrize("lo,hi", [(100, 154), (0, 70), (1, 64), (180, 254), (0, 255)])
def test_bf16_is_the_documented_vdpbf16ps_arithmetic(lo, hi):
    """Bit for bit, over exponent ranges reaching denormals (DAZ, FTZ), overflow and NaN/Inf. The AVX-512 library
    runs the instruction itself; the AVX2 library reproduces the Intel SDM's definition."""
    if native.isa() != "avx2":
        pytest.skip("the AVX-512 library runs vdpbf16ps itself")
    g = _gen(lo, hi)
    for m, n, k in [(1, 7, 64), (3, 5, 47), (4, 9, 130), (6, 2, 17)]:
        x, w = _bf16_bits((m, k), lo, hi, g), _bf16_bits((n, k), lo, hi, g)
        assert _same(ops.w16a16_mm_small(x, w), _vdpbf16ps(x, w).to(torch.bfloat16))


def test_bf16_lane_sum_order():
    """Lanes that cancel across the halves (lane j + 8 = -lane j + a small part): summing the upper and lower halves
    first, as _mm512_reduce_add_ps does, keeps the small parts that a running sum over the lanes rounds away."""
    if native.isa() != "avx2":
        pytest.skip("the AVX-512 library runs _mm512_reduce_add_ps itself")
    g = _gen(31)
    x = torch.zeros(64, 32)
    big = torch.exp2(torch.randint(19, 22, (64, 8), generator=g).float())
    big *= 1 + torch.randint(0, 128, (64, 8), generator=g) / 128  # bf16 values in [2^19, 2^22)
    small = torch.randint(16, 256, (64, 8), generator=g) / 16 * (torch.randint(0, 2, (64, 8), generator=g) * 2 - 1)
    x[:, 1:16:2], x[:, 17:32:2], x[:, 16:32:2] = big, -big, small
    x, w = x.to(torch.bfloat16), torch.ones(5, 32, dtype=torch.bfloat16)
    got = torch.cat([ops.w16a16_mm_small(x[i:i + 4], w) for i in range(0, 64, 4)])
    assert _same(got, _vdpbf16ps(x, w).to(torch.bfloat16))
    assert not torch.equal(got, _vdpbf16ps(x, w, tree=False).to(torch.bfloat16))


def test_bf16_zero_outlier_and_nonfinite_rows():
    g = _gen(11)
    x = torch.randn(5, 200, generator=g).to(torch.bfloat16)
    w = torch.randn(37, 200, generator=g).to(torch.bfloat16)
    w[:, 7] = 1.0
    x[0] = 0.0
    x[1, 3] = 1e30  # an outlier: the row's result is its term, the rest within the bound
    clean = ops.w16a16_mm_small(x, w)
    assert torch.equal(clean[0].view(torch.int16), torch.zeros(37, dtype=torch.int16))  # +0
    exact, bound = _bf16_bound(x, w)
    assert ((clean.double() - exact).abs() <= bound).all()
    x[2, 50] = float("nan")
    x[3, 7] = float("inf")
    got = ops.w16a16_mm_small(x, w)
    assert torch.isnan(got[2]).all() and torch.equal(got[3], torch.full((37,), float("inf"), dtype=torch.bfloat16))
    assert torch.equal(got[[0, 1, 4]], clean[[0, 1, 4]])  # rows are independent


# ---------------------------------------------------------------- int8 weight-only through activation digits


@pytest.mark.parametrize("m", range(1, 10))
@pytest.mark.parametrize("n,k", [(1, 1), (5, 15), (3, 17), (6, 70), (13, 130), (192, 576)])
def test_int8_digits_exact(m, n, k):
    """Integer activations give the exact integer sums; values spanning 2^15 of their row's largest give the exact
    dot product rounded once."""
    g = _gen(m, n, k)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    wsum = native.int8_row_sums(w)
    x = torch.randint(-15, 16, (m, k), generator=g).to(torch.bfloat16)
    exact = (x.long() @ w.long().t()).float().to(torch.bfloat16)
    assert torch.equal(ops.w8a16_mm_vnni(x, w, wsum, torch.ones(n)), exact)
    mag = torch.exp2(torch.randint(-14, 1, (m, k), generator=g).float()) * (1 + torch.rand(m, k, generator=g))
    sign = torch.randint(0, 2, (m, k), generator=g) * 2 - 1
    x = (sign * mag * 3.0).to(torch.bfloat16)  # |x| in [3 2^-14, 6): within 2^15 of the row's largest
    ws = torch.rand(n, generator=g) * 0.02 + 1e-3
    ref = ((x.double() @ w.double().t()) * ws.double()).float().to(torch.bfloat16)
    assert torch.equal(ops.w8a16_mm_vnni(x, w, wsum, ws), ref)


def test_int8_digits_are_the_documented_fixed_point():
    """Rows spanning more than 2^23 (their small values rounded to the grid of 2^-E), tiny and huge rows, and row sums
    that are not the weight's (the kernel subtracts the wsum it is given): the documented integers, bit for bit."""
    g = _gen(21)
    for m, n, k in [(3, 11, 100), (5, 6, 333), (2, 4, 2049)]:
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        x = _bf16_bits((m, k), 1, 254, g)  # every finite exponent: most values below the grid
        x[0] = (torch.randn(k, generator=g) * 1e-38).to(torch.bfloat16)  # E past 127
        x[-1] = (torch.randn(k, generator=g) * 1e37).to(torch.bfloat16)  # E negative
        ws = torch.rand(n, generator=g) + 0.5
        for wsum in (native.int8_row_sums(w), torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)):
            assert torch.equal(ops.w8a16_mm_vnni(x, w, wsum, ws), _digits(x, w, wsum, ws))


def test_int8_digits_worst_case_magnitudes_over_long_rows():
    """Digits and weights at their extremes over K up to the digit kernel's limit (2^16): the int32 partial sums
    must not wrap."""
    for k in (16385, 65536):
        x = torch.full((2, k), 1 - 2**-8, dtype=torch.bfloat16)  # u = xf + 2^23 close to 2^24
        x[1, ::2] = -1.0
        w = torch.full((3, k), -128, dtype=torch.int8)
        w[1] = 127
        ws = torch.tensor([1e-5, 2e-5, 3e-5])
        ref = ((x.double() @ w.double().t()) * ws.double()).float().to(torch.bfloat16)
        assert torch.equal(ops.w8a16_mm_vnni(x, w, native.int8_row_sums(w), ws), ref)


@pytest.mark.native_ops("w8a16_mm_small")
@pytest.mark.parametrize("n", [32, 33])
def test_int8_digits_zero_outlier_and_nonfinite_rows(n):
    g = _gen(3)
    w = torch.randint(-127, 128, (n, 64), generator=g, dtype=torch.int8)
    wsum, ws = native.int8_row_sums(w), torch.full((n,), 0.5)
    x = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    x[0] = 0  # an all-zero row
    x[1] *= 1e-38  # subnormal scale: the exponent of the fixed point goes past 127
    x[2, 0] = 1e4  # the rest of the row within 2^-23 of it at worst
    got = ops.w8a16_mm_vnni(x, w, wsum, ws)
    assert torch.equal(got[0], torch.zeros(n, dtype=torch.bfloat16))
    full = (x.double() @ w.double().t()) * 0.5
    bound = 2.0**-8 * full.abs() + 2.0**-24 * x.double().abs().amax(1, keepdim=True) * w.double().abs().sum(1) * 0.5
    assert ((got.double() - full).abs() <= bound).all()
    x[3, 5] = float("nan")  # a non-finite value: the widening kernel's IEEE semantics for the whole call
    got = ops.w8a16_mm_vnni(x, w, wsum, ws)
    assert torch.isnan(got[3]).all() and torch.equal(got[:3], ops.w8a16_mm_small(x, w, ws)[:3])
    assert not torch.equal(got[:3], ops.w8a16_mm_vnni(x[:3], w, wsum, ws))  # the digits differ somewhere
    x[3, 5] = float("inf")
    assert _same(ops.w8a16_mm_vnni(x, w, wsum, ws), ops.w8a16_mm_small(x, w, ws))


@pytest.mark.native_ops("w8a16_mm_small")
def test_int8_digits_past_their_k_limit_take_the_widening_kernel():
    g = _gen(5)
    w = torch.randint(-128, 128, (3, 65537), generator=g, dtype=torch.int8)
    x = torch.randn(2, 65537, generator=g).to(torch.bfloat16)
    ws = torch.rand(3, generator=g)
    assert torch.equal(ops.w8a16_mm_vnni(x, w, native.int8_row_sums(w), ws), ops.w8a16_mm_small(x, w, ws))


# ---------------------------------------------------------------- int8 weight-only, widened (the digits' fallback)


@pytest.mark.native_ops("w8a16_mm_small")
@pytest.mark.parametrize("m,n,k", [(1, 5, 70), (3, 16, 32), (4, 7, 100), (9, 3, 576)])
def test_int8_widened_within_the_fp32_bound(m, n, k):
    g = _gen(m, n, k, 1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    got = ops.w8a16_mm_small(x, w, torch.ones(n))
    exact, bound = _bf16_bound(x, w)
    assert ((got.double() - exact).abs() <= bound).all()
    ints = torch.randint(-15, 16, (m, k), generator=g).to(torch.bfloat16)
    exact = (ints.long() @ w.long().t()).float()
    assert torch.equal(ops.w8a16_mm_small(ints, w, torch.full((n,), 0.5)), (exact * 0.5).to(torch.bfloat16))
    if native.isa() == "avx2":  # the documented arithmetic: the lanes' sum times ws in fp32, rounded once
        ws = torch.rand(n, generator=g)
        want = (_vdpbf16ps(x, w.to(torch.bfloat16)) * ws).to(torch.bfloat16)
        assert _same(ops.w8a16_mm_small(x, w, ws), want)


@pytest.mark.native_ops("wf8a16_mm_small")
@pytest.mark.parametrize("m,n,k", [(1, 5, 70), (3, 16, 32), (4, 7, 100), (9, 3, 576)])
def test_fp8_widened_within_the_fp32_bound_and_every_code_exact(m, n, k):
    """float8 e4m3fn weights (fp8 weight-only): every finite code -- subnormals, zeros of both signs, +-448 --
    widened exactly, then the bf16 kernels' arithmetic (bit for bit on AVX2; within the bound anywhere)."""
    g = _gen(m, n, k, 2)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int16)
    codes[0, : min(k, 254)] = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F])[: min(k, 254)]
    codes = torch.where(codes & 0x7F == 0x7F, codes - 1, codes)  # no NaN (quantization clamps to +-448)
    w = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    wb = w.to(torch.bfloat16)  # exact: 4 significant bits, exponents within bf16's
    ws = torch.rand(n, generator=g) + 0.5
    got = ops.wf8a16_mm_small(x, w, ws)
    exact, bound = _bf16_bound(x, wb)
    assert ((got.double() - exact * ws.double()[None]).abs() <= bound * ws.double()[None] * 1.01 + 1e-30).all()
    if native.isa() == "avx2":
        assert _same(got, (_vdpbf16ps(x, wb) * ws).to(torch.bfloat16))


# ---------------------------------------------------------------- fp8 weights (fp8wo, fp8dq) in the layers


@pytest.mark.native_ops("wf8a16_mm_small")
def test_fp8_widening_is_exact_for_every_code():
    """One-hot activations read each float8 e4m3fn weight back: all 254 finite codes, subnormals and signs included."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]  # 0x7F / 0xFF are NaN in e4m3fn
    w = finite.view(torch.float8_e4m3fn).reshape(2, -1)  # (2, 127)
    assert w.shape == (2, 127)
    for start in range(0, w.shape[1], 4):
        eye = torch.eye(w.shape[1], dtype=torch.bfloat16)[start:start + 4]
        got = ops.wf8a16_mm_small(eye, w, torch.ones(2))
        assert torch.equal(got, w.float()[:, start:start + 4].t().to(torch.bfloat16))


@pytest.mark.native_ops("wf8a16_mm_small")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k", [(16, 32), (5, 70), (192, 576)])
def test_fp8_weight_only_kernel_against_float(m, n, k):
    g = torch.Generator().manual_seed(m + n)
    x = torch.randint(-15, 16, (m, k), generator=g).to(torch.bfloat16)
    w = torch.randint(-8, 9, (n, k), generator=g).float().to(torch.float8_e4m3fn)  # small integers: exact in fp8
    exact = (x.float() @ w.float().t()).to(torch.bfloat16)
    assert torch.equal(ops.wf8a16_mm_small(x, w, torch.ones(n)), exact)


@pytest.mark.native_ops("wf8a16_mm_small", "wf8a8_mm")
@pytest.mark.parametrize("scheme", ["fp8wo", "fp8dq", "fp8dq-pt"])
def test_fp8_schemes_run_the_native_kernel_near_the_reference(scheme):
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192)), scheme, quantize_lm_head=True)[0]
    assert q.kernel.name == f"cpu_{scheme.removesuffix('-pt')}_native" and q.qweight.dtype == torch.float8_e4m3fn
    op = "wf8a16_mm_small" if scheme == "fp8wo" else "wf8a8_mm"
    assert q.kernel.choose(torch.bfloat16, 1).direct[0] == op
    for rows in (1, 3, 40):  # the native kernel to M=4; above: the AVX2 panel, or dequantize + GEMM
        x = torch.randn(rows, 576, dtype=torch.bfloat16)
        assert q(x).dtype == torch.bfloat16 and rel_err(q(x), q.frozen_forward_reference(x)) < 1e-2
    with pytest.raises(TypeError, match="wf8a16_mm_small: w must be a Float8_e4m3fn"):
        ops.wf8a16_mm_small(torch.randn(1, 576, dtype=torch.bfloat16), q.qweight.view(torch.uint8),
                            torch.ones(192))


@pytest.mark.native_ops("wf8a8_mm")
def test_fp8_per_tensor_activations_use_one_scale_an_input():
    """fp8dq-pt: one scale for the whole input (a large row coarsens every row), per-token fp8dq one a row."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(576, 192, bias=False))
    pt = apply_scheme(copy.deepcopy(lin), "fp8dq-pt", quantize_lm_head=True)[0]
    tok = apply_scheme(copy.deepcopy(lin), "fp8dq", quantize_lm_head=True)[0]
    assert pt.act_spec.to_dict()["per_token"] is False and "per_token" not in tok.act_spec.to_dict()
    x = torch.randn(3, 576, dtype=torch.bfloat16)
    x[0] *= 1e6  # its scale swamps the small rows' values: below e4m3's smallest subnormal they flush to zero
    ref = lin.bfloat16()(x)
    for rows in ((0, 1, 2), (1,)):  # the kernel (M <= 4) and, for one row alone, the same as per token
        xs = x[list(rows)]
        assert rel_err(pt(xs), pt.frozen_forward_reference(xs)) < 1e-2
    assert rel_err(tok(x)[1:], ref[1:]) < 0.05 and rel_err(pt(x)[1:], ref[1:]) > 0.5
    assert rel_err(pt(x[1:]), ref[1:]) < 0.05


# ---------------------------------------------------------------- dynamic A8W8


def _a8w8_reference(x, w, ws):
    from qcal.kernels.common import quantize_per_token

    xq, xs = quantize_per_token(x)
    return ((xq.long() @ w.long().t()).float() * xs).mul_(ws.view(1, -1)).to(torch.bfloat16)


@pytest.mark.native_ops("w8a8_mm_small_multi")
@pytest.mark.parametrize("m,threads", [(1, 1), (17, 2), (40, 3)])
def test_a8w8_several_weights_in_one_call_are_the_one_weight_calls(m, threads):
    """w8a8_mm_small_multi (q / k / v, gate / up on one input): each output w8a8_mm_small's for its weight, bit for
    bit, for weights of fewer rows than a unit to many, whatever the threads."""
    g = _gen(m, threads, 7)
    k = 70
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    w = [torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8) for n in (3, 48, 9)]
    ws = [torch.rand(wi.shape[0], generator=g) * 0.01 for wi in w]
    sums = [native.int8_row_sums(wi) for wi in w]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ys = ops.w8a8_mm_small_multi(x, w, sums, ws)
        assert [tuple(y.shape) for y in ys] == [(m, 3), (m, 48), (m, 9)]
        for y, wi, si, wsi in zip(ys, w, sums, ws, strict=True):
            assert torch.equal(y, ops.w8a8_mm_small(x, wi, si, wsi))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.native_ops("w8a8_mm_small_multi")
def test_a8w8_several_weights_refuse_bad_lists():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(16, 64, dtype=torch.int8)
    sums, ws = native.int8_row_sums(w), torch.ones(16)
    with pytest.raises(ValueError, match="w8a8_mm_small_multi: wsum must hold one tensor per weight"):
        ops.w8a8_mm_small_multi(x, [w, w], [sums], [ws, ws])
    with pytest.raises(ValueError, match="w8a8_mm_small_multi: ws must hold one tensor per weight"):
        ops.w8a8_mm_small_multi(x, [w], [sums], [])
    with pytest.raises(ValueError, match=r"w8a8_mm_small_multi \(weight 1\): K=32 where weight 0 has K=64"):
        ops.w8a8_mm_small_multi(x, [w, w[:, :32].contiguous()], [sums, sums], [ws, ws])
    with pytest.raises(ValueError, match=r"w8a8_mm_small_multi \(weight 0\): wsum must be a contiguous \[16\]"):
        ops.w8a8_mm_small_multi(x, [w], [sums[:8]], [ws])
    with pytest.raises(TypeError, match=r"w8a8_mm_small_multi \(weight 0\): ws must be a Float"):
        ops.w8a8_mm_small_multi(x, [w], [sums], [ws.double()])


@pytest.mark.native_ops("w8a8_mm_small")
@pytest.mark.parametrize("m", [*range(1, 10), 33, 130])  # prefill-sized M too: the AVX2 build's int8dq at every M
@pytest.mark.parametrize("n,k", [(1, 1), (5, 70), (6, 15), (48, 576), (9, 130)])
def test_a8w8_equals_quantize_per_token_and_int_mm(m, n, k):
    g = _gen(m, n, k, 2)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    x[0, 0] = 40.0  # an outlier: the row's scale
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01
    assert torch.equal(ops.w8a8_mm_small(x, w, native.int8_row_sums(w), ws), _a8w8_reference(x, w, ws))


@pytest.mark.native_ops("w8a8_mm_small")
def test_a8w8_extreme_codes_and_weights():
    """Codes of +-127 against weights of -128 and 127 in every column: the largest pairs of products (2 * 128 *
    127), which a 16-bit pair sum must hold exactly, and sums far from zero."""
    k = 1000  # 31 blocks of 32 columns and 8 more
    x = torch.full((5, k), 2.0).to(torch.bfloat16)
    x[1, 1::2] = -2.0
    x[2] = -2.0
    x[3, ::3] = 0.5  # codes 32 between the +-127
    x[4, :500] = -2.0
    w = torch.full((7, k), -128, dtype=torch.int8)
    w[1] = 127
    w[2, 1::2] = 127
    w[3, :k // 2] = 127
    w[4] = torch.randint(-128, 128, (k,), generator=_gen(12), dtype=torch.int8)
    ws = torch.rand(7, generator=_gen(13)) + 0.5
    got = ops.w8a8_mm_small(x, w, native.int8_row_sums(w), ws)
    want = _a8w8_reference(x, w, ws)
    assert torch.equal(got, want)
    assert float(want[0, 0]) != 0 and abs(float(want[0, 0]) / float(ws[0])) > 1e3  # -128 * 127 * 1000 * scale


@pytest.mark.native_ops("w8a8_mm_small")
def test_a8w8_zero_and_nonfinite_rows():
    g = _gen(8)
    x = torch.randn(4, 100, generator=g).to(torch.bfloat16)
    w = torch.randint(-128, 128, (10, 100), generator=g, dtype=torch.int8)
    ws = torch.rand(10, generator=g)
    x[0] = 0
    x[1, 10] = float("nan")
    x[2, 20] = float("-inf")
    got = ops.w8a8_mm_small(x, w, native.int8_row_sums(w), ws)
    assert torch.equal(got[0].view(torch.int16), torch.zeros(10, dtype=torch.int16))
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert torch.equal(got[3], _a8w8_reference(x[3:], w, ws)[0])


# ---------------------------------------------------------------- every operator


def test_threads_do_not_change_the_results():
    g = _gen(9)
    x = torch.randn(5, 300, generator=g).to(torch.bfloat16)
    wb = torch.randn(37, 300, generator=g).to(torch.bfloat16)
    w = torch.randint(-128, 128, (37, 300), generator=g, dtype=torch.int8)
    wsum, ws = native.int8_row_sums(w), torch.rand(37, generator=g)
    calls = [lambda: ops.w16a16_mm_small(x, wb), lambda: ops.w8a16_mm_vnni(x, w, wsum, ws)]
    if native.has("w8a8_mm_small"):
        calls.append(lambda: ops.w8a8_mm_small(x, w, wsum, ws))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append([c() for c in calls])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0], strict=True))


def test_empty_shapes_and_meta():
    assert ops.w16a16_mm_small(torch.zeros(0, 8, dtype=torch.bfloat16), torch.zeros(3, 8, dtype=torch.bfloat16)).shape \
        == (0, 3)
    assert ops.w16a16_mm_small(torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(0, 8, dtype=torch.bfloat16)).shape \
        == (2, 0)
    w = torch.zeros(0, 8, dtype=torch.int8)
    assert ops.w8a16_mm_vnni(torch.zeros(2, 8, dtype=torch.bfloat16), w, torch.zeros(0, dtype=torch.int32),
                             torch.zeros(0)).shape == (2, 0)
    meta = ops.w16a16_mm_small(torch.empty(3, 64, dtype=torch.bfloat16, device="meta"),
                               torch.empty(5, 64, dtype=torch.bfloat16, device="meta"))
    assert meta.shape == (3, 5) and meta.device.type == "meta"


def test_bf16_refuses_bad_input():
    op = "qcal::w16a16_mm_small"
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    for call, exc, match in [
        (lambda: ops.w16a16_mm_small(x.float(), w), TypeError, "x must be a bf16 CPU tensor"),
        (lambda: ops.w16a16_mm_small(x[:, :32], w), ValueError, r"x must be \(M, 64\)"),
        (lambda: ops.w16a16_mm_small(x[None], w), ValueError, r"x must be \(M, 64\)"),
        (lambda: ops.w16a16_mm_small(x, w.float()), TypeError, "w must be a BFloat16"),
        (lambda: ops.w16a16_mm_small(x, w[0]), ValueError, r"w must be \(N, K\)"),
        (lambda: ops.w16a16_mm_small(x, w[:, :0]), ValueError, r"w must be \(N, K\)"),
        (lambda: ops.w16a16_mm_small(x[:, :8], w.t()), ValueError, "w must be a contiguous"),
    ]:
        with pytest.raises(exc, match=f"{op}: {match}"):
            call()


@pytest.mark.parametrize("name", ["w8a16_mm_vnni",
                                  pytest.param("w8a8_mm_small", marks=pytest.mark.native_ops("w8a8_mm_small"))])
def test_int8_with_row_sums_refuses_bad_input(name):
    fn, op = getattr(ops, name), f"qcal::{name}"
    w = torch.zeros(6, 64, dtype=torch.int8)
    wsum, ws, x = native.int8_row_sums(w), torch.ones(6), torch.zeros(2, 64, dtype=torch.bfloat16)
    for args, exc, match in [
        ((x.float(), w, wsum, ws), TypeError, "x must be a bf16 CPU tensor"),
        ((x[:, :63], w, wsum, ws), ValueError, r"x must be \(M, 64\)"),
        ((x, w.to(torch.uint8), wsum, ws), TypeError, "w must be a Char"),
        ((x, w.t().contiguous().t(), wsum, ws), ValueError, "w must be a contiguous"),
        ((x, w[0], wsum, ws), ValueError, r"w must be \(N, K\)"),
        ((x, w, wsum[:5], ws), ValueError, "wsum must be a contiguous"),
        ((x, w, wsum.long(), ws), TypeError, "wsum must be a Int"),
        ((x, w, wsum, ws.to(torch.bfloat16)), TypeError, "ws must be a Float"),
        ((x, w, wsum, torch.ones(7)), ValueError, "ws must be a contiguous"),
    ]:
        with pytest.raises(exc, match=f"{op}: {match}"):
            fn(*args)


def _fp8dq_reference(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, per_token: bool) -> torch.Tensor:
    """fp8dq's reference path (qcal.kernels.cpu._fp8_codes, the fp8 kernel on the codes with unit scales, then both
    scales in fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax().view(1, 1)
    s = (amax / 448.0).clamp_min(FLT_MIN)
    xq = (xf / s).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.bfloat16)
    y = ops.wf8a16_mm_small(xq, w, torch.ones(w.shape[0]))
    return (y.float() * ws * s).to(torch.bfloat16)


@pytest.mark.native_ops("wf8a8_mm", "wf8a16_mm_small")
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 5, 70), (3, 16, 32), (4, 7, 100), (64, 64, 64)])
def test_fp8dq_fused_is_the_reference_quantization_and_kernel(m, n, k, per_token):
    """wf8a8_mm (fp8dq's activations quantized, the fp8 kernel and the rescale in one call) against the reference
    path bit for bit: activations over 30 binades (e4m3's subnormals and every rounding), a zero row; with an
    identity weight each code is read back on its own."""
    g = _gen(m, n, k, 3, per_token)
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-20, 10, (m, k), generator=g).float()))
    x = x.to(torch.bfloat16)
    x[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
    if m > 2:
        x[1] = 0.0
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int16)
    w = torch.where(codes & 0x7F == 0x7F, codes - 1, codes).to(torch.uint8).view(torch.float8_e4m3fn)
    ws = torch.rand(n, generator=g) + 0.5
    assert _same(ops.wf8a8_mm(x, w, ws, per_token), _fp8dq_reference(x, w, ws, per_token))
    if n == k:
        eye = torch.eye(k).to(torch.float8_e4m3fn)
        assert _same(ops.wf8a8_mm(x, eye, ws, per_token), _fp8dq_reference(x, eye, ws, per_token))


@pytest.mark.native_ops("wf8a8_mm")
def test_fp8dq_fused_non_finite_rows():
    """A row holding NaN or Inf: NaN outputs in it (per token) or everywhere (one scale for the tensor), as on the
    reference path."""
    g = _gen(7)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    x[1, 5], x[2, 9] = float("nan"), float("inf")
    w = torch.randn(16, 64, generator=g).to(torch.float8_e4m3fn)
    ws = torch.rand(16, generator=g)
    tok = ops.wf8a8_mm(x, w, ws, True)
    assert torch.isfinite(tok[0]).all() and torch.isnan(tok[1:]).all()
    assert _same(tok[:1], ops.wf8a8_mm(x[:1], w, ws, False))
    assert torch.isnan(ops.wf8a8_mm(x, w, ws, False)).all()
    with pytest.raises(TypeError, match="qcal::wf8a8_mm: w must be a Float8_e4m3fn"):
        ops.wf8a8_mm(x, w.view(torch.int8), ws, True)


@pytest.mark.native_ops("wf8a16_mm_small")
def test_fp8_refuses_bad_input():
    fn, op = ops.wf8a16_mm_small, "qcal::wf8a16_mm_small"
    w = torch.zeros(6, 64, dtype=torch.float8_e4m3fn)
    ws, x = torch.ones(6), torch.zeros(2, 64, dtype=torch.bfloat16)
    for args, exc, match in [
        ((x.float(), w, ws), TypeError, "x must be a bf16 CPU tensor"),
        ((x[:, :63], w, ws), ValueError, r"x must be \(M, 64\)"),
        ((x, w.view(torch.int8), ws), TypeError, "w must be a Float8_e4m3fn"),
        ((x, w[0], ws), ValueError, r"w must be \(N, K\)"),
        ((x, w, torch.ones(7)), ValueError, "ws must be a contiguous"),
    ]:
        with pytest.raises(exc, match=f"{op}: {match}"):
            fn(*args)


# ---------------------------------------------------------------- dequantization for the large-M paths


@pytest.mark.native_ops("dequant_w4")
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("n,k,gs", [(48, 576, 32), (16, 576, 64), (5, 96, 96), (3, 1536, 1536)])
def test_dequant_w4_is_the_weight_in_fp32_rounded_once(zero, n, k, gs):
    from qcal.kernels.common import int4_codes_u8

    g = _gen(n, k, gs, zero)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // gs, generator=g) * 2.0 ** torch.randint(-20, 4, (n, k // gs), generator=g)
    zp = (torch.randn(n, k // gs, generator=g) * 3).round() + torch.rand(n, k // gs, generator=g) if zero else None
    scale[0, 0] = 1e-39  # a denormal product survives (vcvtneps2bf16 would flush it)
    u = int4_codes_u8(qweight).float().view(n, k // gs, gs)
    off = torch.full((), 8.0) if zp is None else (zp + 8.0).unsqueeze(-1)
    want = ((u - off) * scale.unsqueeze(-1)).view(n, k).to(torch.bfloat16)
    got = ops.dequant_w4(qweight, scale, zp)
    if native.isa() == "avx512":
        got, want = got[1:], want[1:]
    assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.native_ops("dequant_w8")
@pytest.mark.parametrize("n,k", [(4, 8), (7, 100), (192, 576), (3, 5)])
def test_dequant_w8_is_the_weight_in_fp32_rounded_once(n, k):
    g = _gen(n, k)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    s = torch.rand(n, generator=g) * 2.0 ** torch.randint(-30, 8, (n,), generator=g)
    want = (q.float() * s.view(n, 1)).to(torch.bfloat16)
    assert torch.equal(ops.dequant_w8(q, s).view(torch.int16), want.view(torch.int16))


@pytest.mark.native_ops("dequant_w4", "dequant_w8")
def test_dequant_operators_refuse_bad_arguments():
    u8, f = torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1)
    for call, match in [(lambda: ops.dequant_w4(u8, torch.ones(4, 3), None), "multiple of 32"),
                        (lambda: ops.dequant_w4(u8.to(torch.int8), f, None), "qweight"),
                        (lambda: ops.dequant_w4(u8, f.double(), None), "scale"),
                        (lambda: ops.dequant_w4(u8, f, torch.ones(3, 1)), "zero_point"),
                        (lambda: ops.dequant_w8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5)), "scale"),
                        (lambda: ops.dequant_w8(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4)), "qweight")]:
        with pytest.raises((ValueError, TypeError), match=match):
            call()
