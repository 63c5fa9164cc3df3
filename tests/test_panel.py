"""The weight-only panel (large-M) operators of either native library -- ``w8a16_mm_panel``, ``w4a16_mm_panel``
and, on AVX2, ``w16a16_mm_panel``, ``w8a16_group_mm_panel`` and ``wf8a16_mm_panel`` -- bit for bit against their
definition (one fp32 chain per output in vdpbf16ps's pair order, then the int8 scale and one rounding to bf16; int4:
the one-pass dequantizer's bf16 weight), exact on integers, independent of the thread count, on ragged shapes (M not
a multiple of the tile, K with tails), with denormal and non-finite inputs, and their argument checks; plus the
layers that route to them."""

from __future__ import annotations

import pytest
import torch
from conftest import pair_chain
from torch import nn

from qcal.kernels import common, native
from qcal.schemes import apply_scheme

pytestmark = pytest.mark.native_ops("w8a16_mm_panel", "w4a16_mm_panel")
ops = torch.ops.qcal


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _threads(n: int):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    return saved


def _int4_case(n: int, k: int, gs: int, seed: int):
    """Codes (n, k), the canonical packing (low nibble = even column), scales and offsets (n, k // gs)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = torch.rand(n, k // gs, generator=g) * 0.02 + 1e-3
    zp = torch.randn(n, k // gs, generator=g)
    return u, (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous(), s, zp


def _dequant4(u: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None, gs: int) -> torch.Tensor:
    """bf16((u - (8 + zp)) * s) in fp32, as the one-pass dequantizer computes it."""
    off = 8 + (zp if zp is not None else torch.zeros_like(s))
    return ((u.float() - off.repeat_interleave(gs, 1)) * s.repeat_interleave(gs, 1)).to(torch.bfloat16)


@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 64, 100])
@pytest.mark.parametrize("n,k", [(16, 4), (32, 12), (48, 40), (64, 576)])
def test_bit_for_bit_the_pair_chain(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-12, 6, (m, k), generator=g).float()))
    x = x.to(torch.bfloat16)  # over 18 binades: most fp32 sums round
    w8 = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 0.01
    assert _same(ops.w8a16_mm_panel(x, w8, ws), (pair_chain(x, w8) * ws).to(torch.bfloat16))
    for gs in (8, 32):
        if k % gs:
            continue
        u, packed, s, zp = _int4_case(n, k, gs, m + k + gs)
        for z in (zp, None):
            want = pair_chain(x, _dequant4(u, s, z, gs)).to(torch.bfloat16)
            assert _same(ops.w4a16_mm_panel(x, packed, s, z, gs), want)
    if native.has("w16a16_mm_panel"):
        w16 = torch.randn(n, k, generator=g).to(torch.bfloat16)
        assert _same(ops.w16a16_mm_panel(x, w16), pair_chain(x, w16).to(torch.bfloat16))


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("n,k", [(16, 4), (192, 576), (576, 1536)])
def test_weight_only_panels_are_exact_on_integers(m, n, k):
    """Integer activations, unit scales, integer offsets: every product and fp32 sum is an exact integer."""
    g = torch.Generator().manual_seed(m + n)
    x = torch.randint(-127, 128, (m, k), generator=g).to(torch.bfloat16)
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    exact8 = (x.long() @ w8.long().t()).float()
    assert torch.equal(ops.w8a16_mm_panel(x, w8, torch.ones(n)), exact8.to(torch.bfloat16))
    assert torch.equal(ops.w8a16_mm_panel(x, w8, torch.full((n,), 0.5)), (exact8 * 0.5).to(torch.bfloat16))
    if k % 8:
        return
    gs = 8 if k < 64 else 64
    u = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    qweight = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()  # canonical: low nibble = even column
    zp = torch.randint(-3, 4, (n, k // gs), generator=g).float()
    w4 = u.long().view(n, k // gs, gs) - 8 - zp.long().unsqueeze(-1)
    exact4 = (x.long() @ w4.view(n, k).t()).float().to(torch.bfloat16)
    assert torch.equal(ops.w4a16_mm_panel(x, qweight, torch.ones(n, k // gs), zp, gs), exact4)
    no_zp = (x.long() @ (u.long() - 8).t()).float().to(torch.bfloat16)
    assert torch.equal(ops.w4a16_mm_panel(x, qweight, torch.ones(n, k // gs), None, gs), no_zp)


def test_same_bits_with_any_number_of_threads():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(77, 576, generator=g).to(torch.bfloat16)
    w8 = torch.randint(-128, 128, (192, 576), generator=g, dtype=torch.int8)
    ws = torch.rand(192, generator=g)
    u, packed, s, zp = _int4_case(192, 576, 64, 7)
    w16 = torch.randn(192, 576, generator=g).to(torch.bfloat16)
    runs = []
    for threads in (1, 2, 3, 5):
        saved = _threads(threads)
        try:
            out = [ops.w8a16_mm_panel(x, w8, ws), ops.w4a16_mm_panel(x, packed, s, zp, 64)]
            if native.has("w16a16_mm_panel"):
                out.append(ops.w16a16_mm_panel(x, w16))
        finally:
            torch.set_num_threads(saved)
        runs.append(out)
    for out in runs[1:]:
        assert all(_same(a, b) for a, b in zip(out, runs[0], strict=True))


def test_denormal_inputs_read_as_zero_and_non_finite_rows_propagate():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=g).to(torch.bfloat16)
    x[2, 5] = 2.0 ** -130  # a bf16 denormal: vdpbf16ps reads it as zero
    x[4, 7] = float("nan")
    x[6, 9] = float("inf")
    w8 = torch.randint(-128, 128, (16, 64), generator=g, dtype=torch.int8)
    y = ops.w8a16_mm_panel(x, w8, torch.ones(16))
    clean = x.clone()
    clean[2, 5] = 0
    finite = [0, 1, 2, 3, 5, 7, 8]
    assert _same(y[finite], ops.w8a16_mm_panel(clean[finite], w8, torch.ones(16)))
    assert torch.isnan(y[4]).all() and not torch.isfinite(y[6]).any()
    if native.has("w16a16_mm_panel"):
        w16 = torch.randn(16, 64, generator=g).to(torch.bfloat16)
        w16[3, 11] = -(2.0 ** -133)
        want = pair_chain(x[finite], w16).to(torch.bfloat16)
        assert _same(ops.w16a16_mm_panel(x[finite], w16), want)


def test_int4_panel_uses_the_dequantizers_weight():
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192, bias=False)), "int4wo-64", quantize_lm_head=True)[0]
    x = torch.randn(100, 576, dtype=torch.bfloat16)
    w = native.dequant_int4(q.qweight, q.weight_scale, q.weight_zero_point)
    got = ops.w4a16_mm_panel(x, q.qweight, q.weight_scale.float(), q.weight_zero_point.float(), 64)
    assert _same(got, pair_chain(x, w).to(torch.bfloat16))


def test_panels_refuse_bad_input():
    x = torch.randn(8, 576, dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (40, 576), dtype=torch.int8)
    with pytest.raises(ValueError, match="w8a16_mm_panel: unsupported shape"):
        ops.w8a16_mm_panel(x, w, torch.ones(40))  # 40 rows: not a multiple of 16
    with pytest.raises(TypeError, match="w8a16_mm_panel: ws must be"):
        ops.w8a16_mm_panel(x, w[:32], torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match="w4a16_mm_panel"):
        ops.w4a16_mm_panel(x, torch.zeros(32, 288, dtype=torch.uint8), torch.ones(32, 48), None, 12)
    with pytest.raises(ValueError, match=r"w4a16_mm_panel: x must be \(M, 576\)"):
        ops.w4a16_mm_panel(x[:, :64], torch.zeros(32, 288, dtype=torch.uint8), torch.ones(32, 9), None, 64)
    if native.has("w16a16_mm_panel"):
        with pytest.raises(ValueError, match="w16a16_mm_panel: unsupported shape"):
            ops.w16a16_mm_panel(x, torch.zeros(40, 576, dtype=torch.bfloat16))
        with pytest.raises(TypeError, match="w16a16_mm_panel: x must be a bf16"):
            ops.w16a16_mm_panel(x.float(), torch.zeros(32, 576, dtype=torch.bfloat16))
        with pytest.raises(TypeError, match="w16a16_mm_panel: w must be"):
            ops.w16a16_mm_panel(x, torch.zeros(32, 576))
        assert ops.w16a16_mm_panel(x[:0], torch.zeros(32, 576, dtype=torch.bfloat16)).shape == (0, 32)


@pytest.mark.native_ops("w16a16_mm_panel_multi", "w8a16_mm_panel_multi", "w4a16_mm_panel_multi")
@pytest.mark.parametrize("m,threads", [(1, 1), (7, 2), (40, 2), (97, 3)])
def test_several_weights_in_one_call_are_the_one_weight_calls(m, threads):
    """The *_panel_multi operators (q / k / v, gate / up on one input): each output the one-weight operator's, bit for
    bit, whatever the weights' sizes (one block to many) and the threads."""
    g = torch.Generator().manual_seed(m)
    k = 200
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-8, 4, (m, k), generator=g).float()))
    x = x.to(torch.bfloat16)
    saved = _threads(threads)
    try:
        w16 = [torch.randn(n, k, generator=g).to(torch.bfloat16) for n in (96, 16, 48)]
        for y, w in zip(ops.w16a16_mm_panel_multi(x, w16), w16, strict=True):
            assert _same(y, ops.w16a16_mm_panel(x, w))
        w8 = [torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8) for n in (32, 64)]
        ws = [torch.rand(n, generator=g) * 0.01 for n in (32, 64)]
        for y, w, s in zip(ops.w8a16_mm_panel_multi(x, w8, ws), w8, ws, strict=True):
            assert _same(y, ops.w8a16_mm_panel(x, w, s))
        cases = [_int4_case(n, k, 40, m + n) for n in (16, 80, 32)]
        packed, scales = [c[1] for c in cases], [c[2] for c in cases]
        zps = [cases[0][3], None, cases[2][3]]  # with and without offsets in one call
        ys = ops.w4a16_mm_panel_multi(x, packed, scales, zps, 40)
        assert [tuple(y.shape) for y in ys] == [(m, 16), (m, 80), (m, 32)]
        for y, u, s, z in zip(ys, packed, scales, zps, strict=True):
            assert _same(y, ops.w4a16_mm_panel(x, u, s, z, 40))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.native_ops("w16a16_mm_panel_multi", "w8a16_mm_panel_multi", "w4a16_mm_panel_multi")
def test_several_weight_panels_refuse_bad_lists():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    u = [torch.zeros(16, 32, dtype=torch.uint8), torch.zeros(32, 32, dtype=torch.uint8)]
    s = [torch.ones(16, 2), torch.ones(32, 2)]
    with pytest.raises(ValueError, match="w4a16_mm_panel_multi: scale must hold one tensor per weight"):
        ops.w4a16_mm_panel_multi(x, u, s[:1], [None, None], 32)
    with pytest.raises(ValueError, match="w4a16_mm_panel_multi: zero_point must hold one tensor per weight"):
        ops.w4a16_mm_panel_multi(x, u, s, [None], 32)
    with pytest.raises(ValueError, match="w4a16_mm_panel_multi: between 1 and 64 weights, got 0"):
        ops.w4a16_mm_panel_multi(x, [], [], [], 32)
    with pytest.raises(ValueError, match=r"w4a16_mm_panel_multi \(weight 1\): w must be \(N, 32\)"):
        ops.w4a16_mm_panel_multi(x, [u[0], torch.zeros(32, 16, dtype=torch.uint8)], s, [None, None], 32)
    with pytest.raises(ValueError, match=r"w4a16_mm_panel_multi \(weight 1\): unsupported shape N=24"):
        ops.w4a16_mm_panel_multi(x, [u[0], torch.zeros(24, 32, dtype=torch.uint8)], [s[0], torch.ones(24, 2)],
                                 [None, None], 32)
    with pytest.raises(ValueError, match=r"panel_multi \(weight 1\): zero_point must be a contiguous \[32, 2\]"):
        ops.w4a16_mm_panel_multi(x, u, s, [None, torch.ones(16, 2)], 32)
    with pytest.raises(TypeError, match=r"w4a16_mm_panel_multi \(weight 0\): scale must be a Float"):
        ops.w4a16_mm_panel_multi(x, u, [s[0].double(), s[1]], [None, None], 32)
    with pytest.raises(ValueError, match=r"w4a16_mm_panel_multi: x must be \(M, 64\)"):
        ops.w4a16_mm_panel_multi(x[:, :32], u, s, [None, None], 32)
    with pytest.raises(TypeError, match=r"w16a16_mm_panel_multi \(weight 1\): w must be a BFloat16"):
        ops.w16a16_mm_panel_multi(x, [torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(16, 64)])
    with pytest.raises(ValueError, match=r"w8a16_mm_panel_multi: ws must hold one tensor per weight"):
        ops.w8a16_mm_panel_multi(x, [torch.zeros(16, 64, dtype=torch.int8)], [])
    with pytest.raises(ValueError, match=r"w8a16_mm_panel_multi \(weight 0\): ws must be a contiguous \[16\]"):
        ops.w8a16_mm_panel_multi(x, [torch.zeros(16, 64, dtype=torch.int8)], [torch.ones(32)])
    assert [tuple(y.shape) for y in ops.w4a16_mm_panel_multi(x[:0], u, s, [None, None], 32)] == [(0, 16), (0, 32)]


def _fma_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """pair_chain with fp32 weights: each step a fused multiply-add (the product exact in float64, one rounding)."""
    xd, wd = x.double(), w.double()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for k in range(0, x.shape[1], 2):
        for c in (k + 1, k):
            acc = (xd[:, c, None] * wd[None, :, c] + acc.double()).float()
    return acc


@pytest.mark.native_ops("w8a16_group_mm_panel", "wf8a16_mm_panel")
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("n,k,gs", [(16, 64, 32), (48, 104, 8), (32, 576, 64)])
def test_avx2_grouped_int8_and_fp8_panels_bit_for_bit(m, n, k, gs):
    """Grouped int8: each weight the dequantizer's fp32 value (q - z) s, one fused multiply-add a step in the pair
    order; fp8: the codes' exact values, then ws, as the int8 panel."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, k // gs, generator=g) * 0.02 + 1e-3
    z = torch.randn(n, k // gs, generator=g) * 3
    for zero in (False, True):
        sz = (torch.stack([s, z]) if zero else s[None]).contiguous()
        w = ((q.float() - z.repeat_interleave(gs, 1)) if zero else q.float()) * s.repeat_interleave(gs, 1)
        assert _same(ops.w8a16_group_mm_panel(x, q, sz, zero, gs), _fma_chain(x, w).to(torch.bfloat16))
    xt = torch.randn(m, k + 4, generator=g).to(torch.bfloat16)  # fp8: K % 8 == 4, the tail
    codes = torch.randint(0, 256, (n, k + 4), generator=g, dtype=torch.int16)
    codes = torch.where(codes & 0x7F == 0x7F, codes - 1, codes).to(torch.uint8)  # no NaN codes
    w8 = codes.view(torch.float8_e4m3fn)
    ws = torch.rand(n, generator=g) + 0.5
    assert _same(ops.wf8a16_mm_panel(xt, w8, ws), (pair_chain(xt, w8.float()) * ws).to(torch.bfloat16))
    with pytest.raises(ValueError, match="w8a16_group_mm_panel: unsupported shape"):
        ops.w8a16_group_mm_panel(x, q[:, : k - 2], s[None], False, gs)
    with pytest.raises(ValueError, match="w8a16_group_mm_panel: sz must be"):
        ops.w8a16_group_mm_panel(x, q, s[None], True, gs)
    with pytest.raises(TypeError, match="wf8a16_mm_panel: w must be a Float8_e4m3fn"):
        ops.wf8a16_mm_panel(xt, codes.view(torch.int8), ws)


@pytest.mark.native_ops("w16a16_mm_panel")
def test_bf16_layers_take_the_panel_for_more_than_four_rows(monkeypatch):
    monkeypatch.setattr(common, "_bf16_gemm_emulated", lambda: True)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 200, generator=g).to(torch.bfloat16)
    for rows in (5, 37):
        x = torch.randn(rows, 200, generator=g).to(torch.bfloat16)
        assert _same(common.linear(x, w), pair_chain(x, w).to(torch.bfloat16))
    w_odd = torch.randn(90, 200, generator=g).to(torch.bfloat16)  # 90 rows: not the panel's, the fp32 GEMM's
    x = torch.randn(8, 200, generator=g).to(torch.bfloat16)
    assert torch.equal(common.linear(x, w_odd), torch.nn.functional.linear(x.float(), w_odd.float()).bfloat16())


@pytest.mark.parametrize("scheme,rows", [("int8wo", 5), ("int8wo", 200), ("int4wo-64", 200), ("gguf-q8_0", 200),
                                         ("fp8wo", 200)])
def test_weight_only_layers_take_the_panel_for_prefill(scheme, rows):
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192, bias=False)), scheme, quantize_lm_head=True)[0]
    impl = q.kernel.choose(torch.bfloat16, rows)
    if native.isa() == "avx512" and native.amx():
        pytest.skip("weight-only prefill runs one dequantization and oneDNN's AMX GEMM on this CPU")
    if native.isa() == "avx512" and scheme in ("gguf-q8_0", "fp8wo"):
        pytest.skip("grouped int8 and fp8 prefill: one dequantization and the bf16 GEMM of an AVX512-BF16 CPU")
    assert impl.name.startswith("qcal panel")
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    assert _same(q(x), impl.run(q, x))


@pytest.mark.native_ops("wf8a16_mm_panel", "w16a16_mm_panel")
def test_fp8dq_prefill_panel_equals_the_codes_bf16_gemm():
    """fp8dq's codes product on the fp8 panel: the numbers of the bf16 GEMM on the codes (exact in bf16), rescaled
    the same way."""
    from qcal.kernels import cpu

    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192, bias=False)), "fp8dq", quantize_lm_head=True)[0]
    impl = q.kernel.choose(torch.bfloat16, 200)
    assert impl.run is cpu._fp8dq_panel
    x = torch.randn(200, 576, dtype=torch.bfloat16)
    assert _same(q(x), cpu._fp8dq_dequant(q, x))


def test_the_avx2_panel_rows_need_the_avx2_library_with_their_operator():
    from qcal.kernels import cpu

    for table, scheme, op in ((cpu.INT4WO, "int4wo-64", "w4a16_mm_panel"), (cpu.INT8WO, "int8wo", "w8a16_mm_panel")):
        (row,) = [i for i in table.impls if "panel avx2" in i.name]
        assert row.native == op
        q = apply_scheme(nn.Sequential(nn.Linear(576, 192, bias=False)), scheme, quantize_lm_head=True)[0]
        assert row.usable(q) == (native.isa() == "avx2")
        with native.disabled():
            assert not row.usable(q)
