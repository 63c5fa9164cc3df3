"""qcal's grouped int8 weight-only kernel (``qcal::w8a16_group_mm``: GGUF Q8_0, GPTQ int8 with groups, asymmetric int8)
against an emulation of its fp32 operations, bit for bit, and its argument checks.

The emulation follows the kernel's documented order (csrc/int8_group.h): each weight the dequantizer's fp32 value
``(q - z) s``; per 32 columns, lane i of one chain takes columns 4 i then 4 i + 1, of the other 4 i + 2 then 4 i + 3,
one fused multiply-add a step (emulated in float64: the product of a bf16 and an fp32 value is exact there, and the
sum's one rounding to fp32 is checked to be exact on these seeded data by the equality itself); the two chains
added, the 8 lanes summed as (i, i + 4), (i, i + 2), (0, 1), rounded once to bf16.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import qcal
from qcal.kernels import native
from qcal.runtime.lean import LeanGenerator

pytestmark = pytest.mark.skipif(not native.has("w8a16_group_mm"),
                                reason=f"needs qcal's native library ({native.native_status()})")


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double() + c.double()).float()


def emulate(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, gs: int) -> torch.Tensor:
    """The kernel's numbers: x (M, K) bf16, w (N, K) int8, s / z (N, K / gs) float32."""
    M, K = x.shape
    N = w.shape[0]
    q = w.float()
    if z is not None:
        q = q - z.repeat_interleave(gs, 1)
    wv = q * s.repeat_interleave(gs, 1)  # (N, K) fp32, the dequantizer's values before bf16
    xf = x.float()
    acc = [torch.zeros(M, N, 8), torch.zeros(M, N, 8)]
    for k in range(0, K, 32):
        xb = xf[:, k:k + 32].reshape(M, 8, 4)  # [m, lane i, b]: column 4 i + b
        wb = wv[:, k:k + 32].reshape(N, 8, 4)
        for chain, cols in ((0, (0, 1)), (1, (2, 3))):
            for b in cols:
                acc[chain] = _fma32(xb[:, None, :, b], wb[None, :, :, b], acc[chain])
    v = acc[0] + acc[1]
    v = v[..., :4] + v[..., 4:]
    v = v[..., :2] + v[..., 2:]
    return (v[..., 0] + v[..., 1]).bfloat16()


def _case(M: int, N: int, K: int, gs: int, zero: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, K // gs, generator=g) * 0.02 + 1e-4
    z = (torch.randn(N, K // gs, generator=g) * 4) if zero else None
    sz = (torch.stack([s, z]) if zero else s[None]).contiguous()
    return x, w, s, z, sz


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("N, K, gs", [(16, 96, 32), (7, 64, 64), (37, 256, 128), (6, 160, 160)])
def test_matches_the_emulation_bit_for_bit(M, N, K, gs, zero):
    x, w, s, z, sz = _case(M, N, K, gs, zero)
    y = torch.ops.qcal.w8a16_group_mm(x, w, sz, zero, gs)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert torch.equal(y, emulate(x, w, s, z, gs))
    exact = x.double() @ ((w.double() - (z.double().repeat_interleave(gs, 1) if zero else 0))
                          * s.double().repeat_interleave(gs, 1)).T
    assert rel_err(y, exact) < 4e-3  # one bf16 rounding


def test_rows_and_threads_do_not_change_the_numbers():
    x, w, _, _, sz = _case(11, 52, 192, 64, True, seed=3)
    y = torch.ops.qcal.w8a16_group_mm(x, w, sz, True, 64)
    rows = torch.cat([torch.ops.qcal.w8a16_group_mm(x[i:i + 1], w, sz, True, 64) for i in range(11)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.qcal.w8a16_group_mm(x, w, sz, True, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, rows) and torch.equal(y, one)


def test_empty_and_non_finite_inputs():
    x, w, _, _, sz = _case(3, 8, 64, 32, False)
    assert torch.ops.qcal.w8a16_group_mm(x[:0], w, sz, False, 32).shape == (0, 8)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    y = torch.ops.qcal.w8a16_group_mm(x, w, sz, False, 32)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()


@pytest.mark.parametrize("change, err, match", [
    (dict(gs=16), ValueError, "group_size a positive multiple of 32"),
    (dict(gs=48), ValueError, "group_size"),
    (dict(w=torch.zeros(8, 64, dtype=torch.uint8)), TypeError, "w must be a Char"),
    (dict(sz=torch.zeros(1, 8, 3)), ValueError, "sz must be a contiguous"),
    (dict(sz=torch.zeros(1, 8, 2), zero=True), ValueError, r"sz must be a contiguous \[2, 8, 2\]"),
    (dict(x=torch.zeros(2, 32, dtype=torch.bfloat16)), ValueError, r"x must be \(M, 64\)"),
    (dict(x=torch.zeros(2, 64)), TypeError, "x must be a bf16"),
])
def test_arguments_are_checked(change, err, match):
    x, w, _, _, sz = _case(2, 8, 64, 32, False)
    args = dict(x=x, w=w, sz=sz, gs=32, zero=False)
    args.update(change)
    with pytest.raises(err, match=match) as e:
        torch.ops.qcal.w8a16_group_mm(args["x"], args["w"], args["sz"], args["zero"], args["gs"])
    assert "qcal::w8a16_group_mm" in str(e.value)


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "asymmetric"])
def test_decode_runs_the_kernel_in_the_native_step(scheme):
    """A gguf-q8_0 (or asymmetric grouped int8) model decodes through the kernel, bound in the native decode step:
    the same tokens and logits as the Python layer loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcal.schemes import apply_scheme

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if scheme == "asymmetric":
        qcal.freeze(qcal.quantize(model, weights="qint8", group_size=32, symmetric=False))
    else:
        apply_scheme(model, scheme, quantize_lm_head=True)
    proj = model.model.layers[0].mlp.down_proj
    assert proj.kernel.choose(torch.bfloat16, 1).name.startswith("qcal grouped int8")
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    fast, slow = LeanGenerator(model, 32), LeanGenerator(model, 32, native_step=False)
    assert fast.step_args is not None  # every projection bound
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, 8), slow.generate(ids, 8))
        ref = model(ids).logits[0, -1].float()
    fast.reset()
    with torch.no_grad():
        got = fast.prefill(ids)[0].float()
    assert rel_err(got, ref) < 2e-2
