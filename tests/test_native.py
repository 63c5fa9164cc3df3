"""qcal's native operators (``torch.ops.qcal``): exact integer results, layouts, shapes, argument checks, fallback,
torch.compile.

With integer activations, unit scales and integer offsets every product and sum in the kernel is an
exact fp32 integer, so its output must equal the exact integer matmul rounded once to bf16.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err
from torch import nn

from qcal.kernels import native
from qcal.kernels.common import int4_codes_u8
from qcal.schemes import apply_scheme

pytestmark = pytest.mark.usefixtures("native_kernels")
ops = torch.ops.qcal


def _exact_case(m: int, n: int, k: int, gs: int, with_offset: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    x = torch.randint(-127, 128, (m, k), generator=g).to(torch.bfloat16)
    scale = torch.ones(n, k // gs)
    offset = torch.randint(-3, 4, (n, k // gs), generator=g).float() if with_offset else None
    w = (u.long() - 8).view(n, k // gs, gs)
    if offset is not None:
        w = w - offset.long().unsqueeze(-1)
    exact = (x.long() @ w.view(n, k).t()).float().to(torch.bfloat16)
    return x, native.pack_int4(u), native.pack_scales(scale, offset), exact


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k,gs", [(16, 64, 64), (48, 256, 32), (96, 200, 40), (64, 576, 576)])
@pytest.mark.parametrize("with_offset", [False, True])
def test_exact_on_integers(m, n, k, gs, with_offset):
    x, w, sz, exact = _exact_case(m, n, k, gs, with_offset)
    y = ops.w4a16_mm_small(x, w, sz, with_offset, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert torch.equal(y, exact)


def test_threads_do_not_change_the_result():
    x, w, sz, exact = _exact_case(3, 96, 256, 64, True, seed=1)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(ops.w4a16_mm_small(x, w, sz, True, 64))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], exact) and torch.equal(outs[1], exact)


def test_pack_matches_the_documented_layout():
    u = torch.randint(0, 16, (32, 16), dtype=torch.uint8)
    p = native.pack_int4(u).view(torch.int16).view(2, 2, 32)  # [block, octet, word]
    for blk, o, j, q in [(0, 0, 0, 0), (1, 1, 31, 3), (0, 1, 6, 2), (1, 0, 17, 1)]:
        word = int(p[blk, o, j]) & 0xFFFF
        assert (word >> (4 * q)) & 15 == u[16 * blk + j // 2, 8 * o + 2 * q + j % 2]


def test_unsupported_shapes_are_refused():
    assert not native.w4_fits(40, 64, 64)  # rows not a multiple of 16
    assert not native.w4_fits(16, 60, 60)  # K not a multiple of 8
    assert not native.w4_fits(16, 64, 48)  # group does not divide K
    x, w, sz, _ = _exact_case(1, 16, 64, 64, False)
    with pytest.raises(ValueError, match="unsupported shape"):
        ops.w4a16_mm_small(x, w, sz, False, 48)
    with pytest.raises(TypeError, match="bf16"):
        ops.w4a16_mm_small(x.float(), w, sz, False, 64)


def test_disabled_and_failed_builds_fall_back(monkeypatch, tmp_path):
    from qcal.kernels import library

    monkeypatch.setattr(library, "_status", None)
    monkeypatch.setattr(library, "_loaded", False)
    monkeypatch.setenv("QCAL_NATIVE", "0")
    assert not native.available() and "QCAL_NATIVE=0" in native.native_status()
    q = apply_scheme(nn.Sequential(nn.Linear(64, 32)), "int4wo-32", quantize_lm_head=True)[0]
    assert q.kernel.name == "cpu_int4wo"

    monkeypatch.setattr(library, "_status", None)
    monkeypatch.delenv("QCAL_NATIVE")
    monkeypatch.setenv("QCAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
    assert "build failed" in native.native_status()
    assert any("native kernels not built" in str(w.message) for w in caught)


def test_frozen_module_native_vs_reference_and_compiled():
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(256, 96)), "int4wo-64", quantize_lm_head=True)[0]
    assert q.kernel.name == "cpu_int4wo_native"
    codes = int4_codes_u8(q.qweight)
    assert torch.equal(q._k_n4w, native.pack_int4(codes))
    x = torch.randn(1, 3, 256, dtype=torch.bfloat16)
    eager = q(x)
    assert rel_err(eager, q.frozen_forward_reference(x)) < 1e-2
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("m", [1, 3, 6])
def test_fused_per_token_quantization_is_exact(m):
    """8da4w in one call: the same int8 codes and scales as quantize_per_token, exact integer sums, one rounding."""
    from qcal.kernels.common import quantize_per_token

    g = torch.Generator().manual_seed(m)
    n, k, gs = 48, 256, 64
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    x[0, :5] = 0
    codes, xs = quantize_per_token(x)
    exact = (codes.long() @ (u.long() - 8).t()).float()
    packed = native.pack_int4_vnni(u)
    # layout: block 0, octet 1, row 3, byte 2 holds columns 8 + 2 (low nibble) and 8 + 6 (high nibble)
    assert packed.view(n // 16, k // 8, 16, 4)[0, 1, 3, 2] == u[3, 10] | (u[3, 14] << 4)
    y = ops.w4a8_mm(x, packed, native.pack_scales(torch.ones(n, k // gs), None), gs)
    assert torch.equal(y, (exact * xs).to(torch.bfloat16))


@pytest.mark.parametrize("bias", [False, True])
def test_8da4w_eager_fast_path_compiled_and_reference_agree(bias):
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(256, 96, bias=bias)), "8da4w-64", quantize_lm_head=True)[0]
    q = q.to(torch.bfloat16)
    assert q.kernel.name == "cpu_8da4w_native"
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    eager, generic = q(x), q.kernel.choose(torch.bfloat16, 2).run(q, x) + (q.bias if bias else 0)  # run(): no bias
    ref = q.frozen_forward_reference(x)
    assert eager.dtype == torch.bfloat16 and rel_err(eager, ref) < 1e-2 and rel_err(generic.float(), ref) < 1e-2
    torch._dynamo.reset()
    assert rel_err(torch.compile(q, fullgraph=True)(x), eager) < 1e-2
    big = torch.randn(300, 256, dtype=torch.bfloat16)  # prefill-sized: the VNNI kernel runs at every M
    assert q.kernel.choose(torch.bfloat16, 300).native and rel_err(q(big), q.frozen_forward_reference(big)) < 1e-2


def test_dtype_casts_leave_the_packed_scales_alone():
    """model.to(dtype) casts floating buffers, but kernel-derived ones keep the dtype their kernel reads."""
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(256, 96)), "int4wo-64", quantize_lm_head=True)[0]
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    before = q(x)
    q.float()
    assert q._k_n4sz.dtype == torch.bfloat16 and q.kernel.name == "cpu_int4wo_native"
    assert rel_err(q(x.float()), q.frozen_forward_reference(x.float())) < 1e-2
    q.to(torch.bfloat16)
    assert torch.equal(q(x), before)


# ---------------------------------------------------------------- the A8W8 (int8 x int8) kernel


def _int8_case(m: int, n: int, k: int, seed: int = 0):
    from qcal.kernels.common import quantize_per_token

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ws = (torch.rand(n, generator=g) * 0.01).to(torch.bfloat16)
    xq, xs = quantize_per_token(x)
    exact = (xq.long() @ w.long().t()).float()  # the int32 sums, exact
    return x, w, ws, (exact * xs).mul_(ws.view(1, -1)).to(torch.bfloat16)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("n,k", [(16, 4), (5, 70), (48, 576), (1536, 576), (578, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kernel_equals_quantize_per_token_and_int_mm(m, n, k, threads):
    x, w, ws, want = _int8_case(m, n, k)
    wsum = native.int8_row_sums(w)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(ops.w8a8_mm_small(x, w, wsum, ws.float()), want)
    finally:
        torch.set_num_threads(saved)


def test_int8_kernel_refuses_bad_input():
    x, w, ws, _ = _int8_case(2, 48, 64)
    wsum = native.int8_row_sums(w)
    with pytest.raises(TypeError, match="w8a8_mm_small: x must be a bf16"):
        ops.w8a8_mm_small(x.float(), w, wsum, ws.float())
    with pytest.raises(ValueError, match="w8a8_mm_small: x must be"):
        ops.w8a8_mm_small(x[:, :62], w, wsum, ws.float())
    with pytest.raises(ValueError, match="w must be a contiguous"):
        ops.w8a8_mm_small(x, w.t().contiguous().t(), wsum, ws.float())  # a non-contiguous weight
    with pytest.raises(ValueError, match="wsum must be"):
        ops.w8a8_mm_small(x, w, wsum[:3], ws.float())
    with pytest.raises(TypeError, match="ws must be a Float"):
        ops.w8a8_mm_small(x, w, wsum, ws)  # bf16 scales: the kernel reads float32


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scheme", ["int8dq", "int8wo"])
def test_int8_modules_eager_compiled_and_reference_agree(scheme, bias):
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192, bias=bias)), scheme, quantize_lm_head=True)[0]
    assert q.kernel.name == f"cpu_{scheme}_native"
    x = torch.randn(1, 3, 576, dtype=torch.bfloat16)
    eager = q(x)
    assert rel_err(eager, q.frozen_forward_reference(x)) < 1e-2
    torch._dynamo.reset()
    assert rel_err(torch.compile(q, fullgraph=True)(x), eager) < 1e-2
    q.to(torch.float32).to(torch.bfloat16)  # casts leave the derived float32 scales intact
    assert torch.equal(q(x), eager)


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("gs", [32, 64, 576])
def test_native_dequant_int4_is_the_weight_rounded_once(zero, gs):
    from qcal.kernels.common import dequant_int4

    torch.manual_seed(0)
    scheme = f"int4wo-{gs}" if gs != 576 else "int4wo-pc"
    q = apply_scheme(nn.Sequential(nn.Linear(576, 48, bias=False)), scheme, quantize_lm_head=True)[0]
    if not zero:
        q.weight_zero_point = None
    exact = q.dequantized_weight(torch.float32)  # (q - zp) * s in fp32
    got = native.dequant_int4(q.qweight, q.weight_scale, q.weight_zero_point)
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact.to(torch.bfloat16))
    assert torch.equal(dequant_int4(q, torch.bfloat16), got)  # the large-M path uses it
    with native.disabled():  # PyTorch's ops (other CPUs, traced graphs) build the very same weight
        assert torch.equal(dequant_int4(q, torch.bfloat16), got)
    assert native.dequant_int4(q.qweight[:, :8], q.weight_scale[:, :1], None) is None  # groups of 16: not ours


# ---------------------------------------------------------------- the int8 weight-only kernel


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k", [(16, 32), (5, 70), (192, 576), (576, 1536)])
def test_int8_weight_only_kernel_is_exact_on_integers(m, n, k):
    """Integer activations and unit scales: every product and fp32 partial sum is an exact integer."""
    g = torch.Generator().manual_seed(m + n)
    x = torch.randint(-15, 16, (m, k), generator=g).to(torch.bfloat16)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (x.long() @ w.long().t()).float().to(torch.bfloat16)
    assert torch.equal(ops.w8a16_mm_small(x, w, torch.ones(n)), exact)
    scaled = ops.w8a16_mm_small(x, w, torch.full((n,), 0.5))
    assert torch.equal(scaled, (exact.float() * 0.5).to(torch.bfloat16))


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n,k", [(16, 32), (5, 70), (192, 576), (576, 1536), (3, 130)])
def test_int8_digit_kernel_is_exact(m, n, k):
    """The activations as fixed-point digits: integer inputs give the exact integer sums, and values spanning 2^15
    of their row's largest give the exact dot product rounded once (float64 reference), K tails included."""
    g = torch.Generator().manual_seed(7 * m + n)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    wsum = native.int8_row_sums(w)
    x = torch.randint(-15, 16, (m, k), generator=g).to(torch.bfloat16)
    exact = (x.long() @ w.long().t()).float().to(torch.bfloat16)
    assert torch.equal(ops.w8a16_mm_vnni(x, w, wsum, torch.ones(n)), exact)
    mag = torch.exp2(torch.randint(-14, 1, (m, k), generator=g).float())  # a dynamic range of 2^15
    x = (torch.randn(m, k, generator=g) * mag * 3.0).to(torch.bfloat16)
    ws = torch.rand(n, generator=g) * 0.02 + 1e-3
    ref = ((x.double() @ w.double().t()) * ws.double()).float().to(torch.bfloat16)
    assert torch.equal(ops.w8a16_mm_vnni(x, w, wsum, ws), ref)
    # where bf16 widening (fp32 partial sums) rounds, the digit kernel's error is no larger
    full = (x.double() @ w.double().t()) * ws.double()
    widened = ops.w8a16_mm_small(x, w, ws).double()
    assert (ref.double() - full).abs().max() <= (widened - full).abs().max() + 1e-12


def test_int8_digit_kernel_refuses_bad_input():
    w = torch.randint(-127, 128, (192, 576), dtype=torch.int8)
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="w8a16_mm_vnni.*wsum"):
        ops.w8a16_mm_vnni(x, w, torch.zeros(191, dtype=torch.int32), torch.ones(192))
    with pytest.raises(TypeError, match="w8a16_mm_vnni.*wsum"):
        ops.w8a16_mm_vnni(x, w, torch.zeros(192), torch.ones(192))
    with pytest.raises(ValueError, match="w8a16_mm_vnni"):
        ops.w8a16_mm_vnni(torch.randn(1, 575, dtype=torch.bfloat16), w, native.int8_row_sums(w), torch.ones(192))


def test_int8wo_kernel_refuses_bad_input():
    w = torch.randint(-127, 128, (192, 576), dtype=torch.int8)
    with pytest.raises(TypeError, match="w8a16_mm_small"):
        ops.w8a16_mm_small(torch.randn(3, 576), w, torch.ones(192))
    with pytest.raises(ValueError, match="contiguous"):
        ops.w8a16_mm_small(torch.randn(3, 576, dtype=torch.bfloat16), w.t().contiguous().t(), torch.ones(192))


# ---------------------------------------------------------------- the large-M panel kernels


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("n,k", [(16, 4), (48, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a8w8_panel_equals_quantize_per_token_and_int_mm(m, n, k, threads):
    x, w, ws, want = _int8_case(m, n, k)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(ops.w8a8_mm_panel(x, w, native.int8_row_sums(w), ws.float()), want)
    finally:
        torch.set_num_threads(saved)


def test_a8w8_panel_refuses_bad_input():  # the weight-only panels': tests/test_panel.py
    x = torch.randn(8, 576, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (40, 576), dtype=torch.int8)
    with pytest.raises(ValueError, match="w8a8_mm_panel: unsupported shape"):
        ops.w8a8_mm_panel(x, w, native.int8_row_sums(w), torch.ones(40))  # 40 rows: not a multiple of 16
    with pytest.raises(TypeError, match="w8a8_mm_panel"):
        ops.w8a8_mm_panel(x.float(), w[:32], native.int8_row_sums(w[:32]), torch.ones(32))


@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
@pytest.mark.parametrize("scheme", ["int8dq", "int8wo", "int4wo-64"])
def test_frozen_modules_take_the_panel_kernel_for_prefill(scheme, amx, monkeypatch):
    """Prefill: the panel kernels, except weight-only layers where PyTorch's bf16 GEMM runs on AMX (one
    dequantization, then oneDNN's GEMM)."""
    monkeypatch.setattr(native, "amx", lambda: amx)
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192)), scheme, quantize_lm_head=True)[0]
    x = torch.randn(1, 200, 576, dtype=torch.bfloat16)
    impl = q.kernel.choose(torch.bfloat16, 200)
    assert impl.name.startswith("qcal panel") if scheme == "int8dq" or not amx else "dequant + bf16 mm" in impl.name
    y = q(x)
    assert y.shape == (1, 200, 192) and y.dtype == torch.bfloat16
    assert torch.equal(y, (impl.run(q, x.view(200, 576)) + q.bias).view(1, 200, 192))
    assert rel_err(y, q.frozen_forward_reference(x)) < 1e-2
    if amx and scheme == "int8wo":  # the dequantized weight is the reference's, bit for bit
        assert torch.equal(torch.ops.qcal.dequant_w8(q.qweight, q.weight_scale.reshape(-1).float()),
                           q.dequantized_weight(torch.bfloat16).reshape(192, 576))


@pytest.mark.parametrize("n", [8, 12, 64, 576, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_hadamard_kernel_applies_the_transform_matrix(n, dtype, threads):
    """Integer rows and the ±1 factors: every butterfly and mixing sum is an exact float32 integer, so the kernel's
    output is that exact sum times float32(1/sqrt(n)), rounded once (then to bf16 for bf16 rows)."""
    from qcal.nn.hadamard import OnlineHadamard

    had = OnlineHadamard(n)
    had(torch.zeros(1, n))  # builds the cached factor
    a = had._a[torch.device("cpu")]
    x = torch.randint(-8, 9, (70, n), generator=torch.Generator().manual_seed(n)).to(dtype)
    sums = (x.double() @ (had.matrix() * n ** 0.5).round().T).float()  # exact integers
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.hadamard(x, a)
        strided = ops.hadamard(torch.cat([x, x], 1)[:, ::2], a)  # read contiguous whatever the strides
    finally:
        torch.set_num_threads(before)
    assert y.dtype == dtype
    assert torch.equal(y, (sums * torch.tensor(n ** -0.5, dtype=torch.float32)).to(dtype))
    assert torch.equal(strided, ops.hadamard(torch.cat([x, x], 1)[:, ::2].contiguous(), a))


def test_hadamard_kernel_refuses_bad_input():
    a12 = torch.ones(12, 12)
    for x, a, match in [(torch.zeros(2, 24, dtype=torch.float16), a12, "bf16 or float32"),
                        (torch.zeros(24), a12, r"\(M, n\)"),
                        (torch.zeros(2, 24), torch.ones(12, 6), "square"),
                        (torch.zeros(2, 24), a12.double(), "a must be a Float"),
                        (torch.zeros(2, 36), a12, "power of two"),
                        (torch.zeros(2, 20), a12, "power of two")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ops.hadamard(x, a)


# ---------------------------------------------------------------- bf16 x bf16, small M (a float model's decode)


@pytest.mark.parametrize("m,n,k", [(1, 1536, 576), (3, 70, 100), (4, 16, 5632), (2, 3, 31)])
def test_bf16_small_m_kernel_is_the_fp32_product_rounded_once(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    got = ops.w16a16_mm_small(x, w)
    exact = x.double() @ w.double().t()
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # fp32 sums in another order than float64's: within bf16's rounding of the exact value, plus fp32 noise
    assert ((got.double() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-5 * exact.abs().max()).all()
    ints = torch.randint(-8, 9, (m, k), generator=g).to(torch.bfloat16)  # small integers: every sum exact in fp32
    wints = torch.randint(-8, 9, (n, k), generator=g).to(torch.bfloat16)
    assert torch.equal(ops.w16a16_mm_small(ints, wints), (ints.float() @ wints.float().t()).to(torch.bfloat16))


def test_bf16_small_m_kernel_refuses_bad_input():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \(M, 64\)"):
        ops.w16a16_mm_small(torch.zeros(1, 32, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match="w must be a BFloat16"):
        ops.w16a16_mm_small(torch.zeros(1, 64, dtype=torch.bfloat16), w.float())
    with pytest.raises(ValueError, match="contiguous"):
        ops.w16a16_mm_small(torch.zeros(1, 8, dtype=torch.bfloat16), w.t())
