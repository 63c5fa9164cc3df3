"""The sub-byte float weight-only kernel (``qcal::wfx_mm_small``: fp6 e3m2, fp5 e2m2, fp4 e2m1) on whichever native
library is loaded (AVX-512 or AVX2): weights read back exactly, its documented arithmetic bit for bit (vdpbf16ps
lanes per 32 columns, each group's lanes scaled by one fused multiply-add, the 16 lanes summed as
``_mm512_reduce_add_ps``, one rounding to bf16), the schemes' dispatch and its argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn

import qcal
from qcal.kernels import native
from qcal.primitives import float_grid, pack
from qcal.schemes import apply_scheme

pytestmark = pytest.mark.native_ops("wfx_mm_small")
ops = torch.ops.qcal
FORMATS = [("fp6wo", "qfloat6_e3m2"), ("fp5wo", "qfloat5_e2m2"), ("fp4wo-32", "qfloat4_e2m1")]


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add through float64: the products here (bf16 x 3-bit value, fp32 x fp32) are exact there,
    and the equality with the kernel checks that the sums' one rounding is too on these seeded data."""
    return (a.double() * b.double() + c.double()).float()


def emulate(x: torch.Tensor, values: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The kernel's numbers: x (M, K) bf16 (no denormals), values (N, K) the weights' fp32 values, ws (N, G)."""
    M, K = x.shape
    N, G = ws.shape
    gs = K // G
    xf = x.float()
    acc = torch.zeros(M, N, 16)
    for g in range(G):
        part = torch.zeros(M, N, 16)
        for k in range(g * gs, (g + 1) * gs, 32):
            xb = xf[:, None, k:k + 32].reshape(M, 1, 16, 2)
            wb = values[None, :, k:k + 32].reshape(1, N, 16, 2)
            for pair in (1, 0):  # the odd column first, as vdpbf16ps
                part = _fma32(xb[..., pair], wb[..., pair], part)
        acc = _fma32(part, ws[None, :, g, None], acc)
    a = acc[..., 8:] + acc[..., :8]
    a = a[..., 4:] + a[..., :4]
    return ((a[..., 0] + a[..., 2]) + (a[..., 1] + a[..., 3])).bfloat16()


@pytest.mark.parametrize("table", ["format", "any"])
@pytest.mark.parametrize("scheme,qt", FORMATS)
@pytest.mark.parametrize("m,n,k,groups", [(1, 8, 64, 1), (2, 5, 96, 3), (3, 9, 128, 2), (5, 4, 576, 1)])
def test_is_the_documented_arithmetic_bit_for_bit(scheme, qt, m, n, k, groups, table):
    """The format's table (its upper half the lower negated) and any other table of bf16 values."""
    qtype = getattr(qcal, qt)
    g = torch.Generator().manual_seed(m * 100 + n + k)
    codes = torch.randint(0, 1 << qtype.bits, (n, k), generator=g, dtype=torch.uint8)
    ws = torch.rand(n, groups, generator=g) + 0.25
    x = torch.randn(m, k, generator=g).bfloat16()
    lut = float_grid(qtype).to(torch.bfloat16)
    if table == "any":
        lut = torch.randn(1 << qtype.bits, generator=g).bfloat16()
    got = ops.wfx_mm_small(x, pack(codes, qtype), ws, lut, qtype.bits)
    values = lut.float()[codes.long()]
    assert torch.equal(got, emulate(x, values, ws))
    exact = x.double() @ (values.double() * ws.double().repeat_interleave(k // groups, 1)).t()
    assert rel_err(got, exact) < 4e-3


@pytest.mark.native_ops("wfx_mm_panel")
@pytest.mark.parametrize("table", ["format", "any"])
@pytest.mark.parametrize("scheme,qt", FORMATS)
@pytest.mark.parametrize("m,n,k,groups", [(7, 32, 64, 1), (20, 48, 128, 2), (5, 16, 96, 3)])
def test_avx2_panel_is_its_definition_bit_for_bit(scheme, qt, m, n, k, groups, table):
    """The AVX2 panel (prefill): each weight its value times its group's scale in fp32, one fp32 chain per output in
    the pair order (odd column first), each step a fused multiply-add, one rounding to bf16."""
    qtype = getattr(qcal, qt)
    g = torch.Generator().manual_seed(m + n + k)
    codes = torch.randint(0, 1 << qtype.bits, (n, k), generator=g, dtype=torch.uint8)
    ws = torch.rand(n, groups, generator=g) + 0.25
    x = torch.randn(m, k, generator=g).bfloat16()
    lut = float_grid(qtype).bfloat16() if table == "format" else torch.randn(1 << qtype.bits, generator=g).bfloat16()
    got = ops.wfx_mm_panel(x, pack(codes, qtype), ws, lut, qtype.bits)
    w = (lut.float()[codes.long()] * ws.repeat_interleave(k // groups, 1)).double()
    acc = torch.zeros(m, n)
    for c in range(0, k, 2):
        for col in (c + 1, c):
            acc = (x[:, col, None].double() * w[None, :, col] + acc.double()).float()
    assert torch.equal(got, acc.bfloat16())
    with pytest.raises(ValueError, match="wfx_mm_panel: unsupported shape"):
        ops.wfx_mm_panel(x, pack(codes, qtype)[:5], ws[:5], lut, qtype.bits)


@pytest.mark.parametrize("scheme,qt", FORMATS)
def test_subbyte_float_kernel_reads_every_weight_back_exactly(scheme, qt):
    """One-hot activations and power-of-two scales: each output is one weight's value times its scale, exact."""
    qtype = getattr(qcal, qt)
    n, k = 8, 64
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 1 << qtype.bits, (n, k), generator=g, dtype=torch.uint8)
    groups = 2 if scheme.startswith("fp4") else 1
    ws = 2.0 ** torch.randint(-3, 4, (n, groups), generator=g).float()
    lut = float_grid(qtype).to(torch.bfloat16)
    w = pack(codes, qtype)
    exact = (float_grid(qtype)[codes.long()] * ws.repeat_interleave(k // groups, 1)).t()  # (k, n)
    for start in range(0, k, 4):
        eye = torch.eye(k, dtype=torch.bfloat16)[start:start + 4]
        got = ops.wfx_mm_small(eye, w, ws, lut, qtype.bits)
        assert torch.equal(got, exact[start:start + 4].to(torch.bfloat16))


@pytest.mark.parametrize("scheme", ["fp6wo", "fp5wo", "fp4wo-32"])
def test_subbyte_float_schemes_run_the_native_kernel_near_the_reference(scheme):
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(576, 192)), scheme, quantize_lm_head=True)[0]
    bits = {"fp6wo": 6, "fp5wo": 5, "fp4wo-32": 4}[scheme]
    assert q.kernel.name == "cpu_fpxwo_native" and q.qweight.shape == (192, 576 * bits // 8)
    assert q.kernel.choose(torch.bfloat16, 1).run is q.kernel.choose(torch.bfloat16, 4).run
    if native.has("wfx_mm_panel"):  # AVX2: the panel above M = 4
        assert q.kernel.choose(torch.bfloat16, 40).name.startswith("qcal panel avx2 fp6/fp5/fp4")
    for rows in (1, 3, 40):
        x = torch.randn(rows, 576, dtype=torch.bfloat16)
        assert q(x).dtype == torch.bfloat16 and rel_err(q(x), q.frozen_forward_reference(x)) < 1e-2
    lut = q._buffers["_k_fxlut"]
    with pytest.raises(ValueError, match="multiples of 32"):
        ops.wfx_mm_small(torch.randn(1, 576, dtype=torch.bfloat16), q.qweight, torch.ones(192, 7), lut, bits)
    with pytest.raises(ValueError, match="bits must be 4, 5 or 6"):
        ops.wfx_mm_small(torch.randn(1, 576, dtype=torch.bfloat16), q.qweight, torch.ones(192, 1), lut, 3)
    with pytest.raises(TypeError, match="lut must be"):
        ops.wfx_mm_small(torch.randn(1, 576, dtype=torch.bfloat16), q.qweight, torch.ones(192, 1), lut.float(), bits)
