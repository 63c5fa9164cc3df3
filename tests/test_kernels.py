"""Kernel dispatch and parity: every fast path agrees with the reference dequant path.

Tolerances (relative L2 error against ``frozen_forward_reference``, which itself runs in the
module's float dtype): bf16 models 1e-2 (the fast paths and the reference round differently in
bf16, ~2^-9 per element); fp32 A8W8 1e-5 (same integers, fp32 rescale); fp32 weight-only 1e-2
(frozen weight-only modules compute in bf16 on CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from torch import nn

import qcal
from qcal.explain import module_rows
from qcal.kernels import KERNELS, REFERENCE, Kernel, derived_bytes, native, register_kernel, select_kernel
from qcal.kernels.common import int4_codes_u8, tinygemm_scales_zeros
from qcal.kernels.cpu import W8G_MAX_M
from qcal.schemes import apply_scheme, cast_model

BF16_TOL = 1e-2
CPU_KERNEL = {"int4wo-64": "cpu_int4wo", "int4wo-32": "cpu_int4wo", "int4wo-pc": "cpu_int4wo",
              "int8wo": "cpu_int8wo", "int8dq": "cpu_int8dq", "8da4w-64": "cpu_8da4w", "8da4w-32": "cpu_8da4w"}


@pytest.fixture
def no_native():
    """Run with qcal's native kernels unavailable: PyTorch's ops (tinygemm) are chosen."""
    with native.disabled():
        yield


def _expected(scheme: str, use_native: bool) -> str:
    name = CPU_KERNEL[scheme]
    native_schemes = ("int4wo", "8da4w", "int8dq", "int8wo")
    return name + "_native" if use_native and scheme.split("-")[0] in native_schemes else name


def _frozen(scheme: str, n: int = 96, k: int = 256, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return apply_scheme(nn.Sequential(nn.Linear(k, n, bias=bias)), scheme, quantize_lm_head=True)[0]


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch-ops"])
@pytest.mark.parametrize("scheme", sorted(CPU_KERNEL))
@pytest.mark.parametrize("m", [1, 5, 16, 17, 48])
def test_cpu_kernel_parity_bf16(scheme, m, use_native, request):
    if use_native and native.isa() is None:  # either library: the AVX2 one has rows for these schemes too
        pytest.skip(f"native kernel {native.native_status()}")
    if not use_native:
        request.getfixturevalue("no_native")
    q = _frozen(scheme)
    assert q.kernel.name == _expected(scheme, use_native)
    x = torch.randn(2, m, 256, dtype=torch.bfloat16)
    y = q(x)
    ref = q.frozen_forward_reference(x)
    assert y.shape == ref.shape == (2, m, 96) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < BF16_TOL


@pytest.mark.parametrize("scheme", sorted(CPU_KERNEL))
def test_every_chosen_implementation_agrees(scheme):
    """Every implementation a module's table can reach (small M, large M, traced) computes the same thing."""
    q = _frozen(scheme)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    outs = {impl.name: impl.run(q, x).float() for impl in q.kernel.impls if impl.takes(torch.bfloat16, False)}
    assert len(outs) >= 2 or not native.available()
    first = next(iter(outs.values()))
    assert all(rel_err(y, first) < BF16_TOL for y in outs.values()), list(outs)


@pytest.mark.parametrize("kw,name,tol", [
    (dict(weights="qint8", activations="qint8", dynamic=True), "cpu_int8dq", 1e-5),
    (dict(weights="qint8"), "cpu_int8wo", BF16_TOL),
    (dict(weights="qint4", group_size=64, symmetric=False), "cpu_int4wo", BF16_TOL),
    (dict(weights="qint4", group_size=32, symmetric=True, activations="qint8", dynamic=True), "cpu_8da4w", BF16_TOL),
])
def test_cpu_kernel_parity_fp32_model(kw, name, tol):
    torch.manual_seed(0)
    m = qcal.freeze(qcal.quantize(nn.Sequential(nn.Linear(128, 64)), **kw))
    q = m[0]
    has_native = True  # fp32 inputs bypass the native paths, but the module still chooses the native kernel
    assert q.kernel.name == name + ("_native" if has_native and native.isa() is not None else "")
    for rows in (1, 40):
        x = torch.randn(rows, 128)
        y = q(x)
        assert y.dtype == torch.float32
        assert rel_err(y, q.frozen_forward_reference(x)) < tol


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("how", ["gguf-q8_0", "asymmetric groups of 32"])
def test_grouped_int8_weight_only_kernel_then_qcals_gemm(how, rows):
    """int8 weights in groups (llama.cpp's Q8_0, GPTQ's int8 groups): qcal's grouped kernel for small M where the
    native library is built; above it the AVX2 library's grouped panel, else the dequantized weight into the bf16
    GEMM, instead of the reference kernel's float op; fp32 models stay fp32."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(256, 96))
    if how == "gguf-q8_0":
        q = apply_scheme(lin, "gguf-q8_0", quantize_lm_head=True)[0]
    else:
        q = qcal.freeze(qcal.quantize(lin, weights="qint8", group_size=32, symmetric=False))[0]
    grouped = native.has("w8a16_group_mm")
    assert q.kernel.name == "cpu_int8wo-dequant" + ("_native" if grouped else "")
    small = grouped and rows <= W8G_MAX_M
    panel = native.has("w8a16_group_mm_panel")  # AVX2: qcal's panel on the codes instead of dequantize + GEMM
    assert q.kernel.choose(torch.bfloat16, rows).name.startswith(
        "qcal grouped int8" if small else "qcal panel avx2 grouped int8" if panel else "dequant")
    for dtype, tol in ((torch.bfloat16, BF16_TOL), (torch.float32, 1e-6)):
        x = torch.randn(rows, 256, dtype=dtype)
        y = q.to(dtype)(x)
        assert y.dtype == dtype and rel_err(y, q.frozen_forward_reference(x)) < tol


def test_tinygemm_convention_matches_reference(no_native):
    """tinygemm computes (u - 8) * scale + zero; ours is (q - zp) * s with u = q + 8, so zero = -zp * s."""
    q = _frozen("int4wo-64", bias=False)
    w_ref = q.dequantized_weight(torch.float32)
    sz = tinygemm_scales_zeros(q, 64, torch.float32)  # (K/g, N, 2)
    u = int4_codes_u8(q.qweight).float().view(96, 4, 64)
    w = (u - 8) * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)
    torch.testing.assert_close(w.view(96, 256), w_ref, rtol=1e-5, atol=1e-5)
    eye = torch.eye(256, dtype=torch.bfloat16)  # the packed op itself reproduces the weight
    got = q.kernel.choose(torch.bfloat16, 16).run(q, eye[:16]).float()
    torch.testing.assert_close(got, w_ref.t()[:16], rtol=1e-2, atol=1e-2)


def test_per_token_zero_row_and_outliers():
    q = _frozen("int8dq")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    x[1] = 0
    x[2, 7] = 1e4
    y, ref = q(x), q.frozen_forward_reference(x)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < BF16_TOL


def test_fallback_to_reference_and_derived_bytes():
    q = _frozen("int4wo-64")
    assert derived_bytes(q) == 96 * 256 // 2 + (256 // 64) * 96 * 2 * 2  # packed copy + bf16 scales/zeros
    # odd out_features: tinygemm needs N % 16 == 0 -> reference kernel
    r = _frozen("int4wo-64", n=40)
    assert r.kernel is REFERENCE and derived_bytes(r) == 0
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert rel_err(r(x), r.frozen_forward_reference(x)) == 0
    # int8 asymmetric weights per channel: the grouped kernel's float32 scales and zero-points (or nothing derived
    # without it: the dequantized weight into qcal's GEMM)
    torch.manual_seed(0)
    a = qcal.freeze(qcal.quantize(nn.Sequential(nn.Linear(64, 32)), weights="qint8", symmetric=False))[0]
    assert a.kernel.name.startswith("cpu_int8wo-dequant")
    assert derived_bytes(a) == (2 * 32 * 4 if native.has("w8a16_group_mm") else 0)


def test_reselect_drops_stale_derived_buffers_and_state_dict_is_canonical():
    q = _frozen("int4wo-64")
    assert {"_k_int4pack", "_k_n4w"} & set(dict(q.named_buffers()))
    assert not any(k.startswith("_k_") for k in q.state_dict())
    q.weight_spec = q.weight_spec.__class__(qcal.qint4, qcal.PerGroup(64), False)
    q.act_spec = qcal.spec.ActivationSpec(qcal.qint8, dynamic=True, symmetric=False)  # unsupported -> reference
    q.select_kernel()
    assert q.kernel is REFERENCE
    assert not any(n.startswith("_k_") for n, _ in q.named_buffers())


def test_register_kernel_first_wins():
    class Always(Kernel):
        name = "always"

        def supports(self, module):
            return getattr(module, "qcal_name", "") == "0"

        def __call__(self, module, x):
            return module.frozen_forward_reference(x)

    k = register_kernel(Always())
    try:
        q = _frozen("int8wo")
        assert q.kernel is k and "frozen[always]" in repr(q)
    finally:
        KERNELS.remove(k)
    assert select_kernel(q).name == _expected("int8wo", native.isa() is not None)


def test_explain_table(tiny_llama):
    apply_scheme(tiny_llama, "int4wo-32", quantize_lm_head=True)
    out = qcal.explain(tiny_llama, print_table=False)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["module", "shape", "scheme", "kernel"]
    assert "model.layers.0.self_attn.q_proj" in out and "cpu_int4wo" in out and "M<=" in out
    total = next(i for i, ln in enumerate(lines) if ln.startswith("total"))
    assert lines[total + 2] == "kernel dispatch:" and lines[total + 3].lstrip().startswith("cpu_int4wo")
    rows = module_rows(tiny_llama)
    assert len(rows) == 2 * 7 + 1 and all(r["kernel"].startswith("cpu_int4wo") for r in rows)
    q = next(r for r in rows if r["name"].endswith("q_proj"))
    assert q["bytes"] == 64 * 64 // 2 + 2 * 2 * 64 * 2  # packed int4 + bf16 scale and zero point (64 x 2)
    assert q["derived_bytes"] > 0


@pytest.mark.parametrize("scheme", ["int4wo-64", "int8dq", "8da4w-64"])
def test_cast_after_freeze_rederives_the_kernel_layout(scheme):
    """A frozen model cast (or moved) computes what a freshly loaded checkpoint in that state computes.

    apply_scheme freezes, then casts the model to bf16: the derived layout (e.g. tinygemm's
    ``-zp * s`` offsets) must come from the cast scales, not from the float32 ones at freeze.
    """
    from conftest import make_tiny_llama

    model = apply_scheme(make_tiny_llama(hidden=128), scheme, quantize_lm_head=True)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        for _, m in qcal.quantized_modules(model):
            m.select_kernel()  # what qcal.load does
        assert torch.equal(model(ids).logits, logits)
        model.float()
        assert all(m.weight_scale.dtype == torch.float32 for _, m in qcal.quantized_modules(model))
        assert rel_err(model(ids).logits, logits) < 2e-2  # the whole model in fp32 vs bf16
        cast_model(model, torch.bfloat16)  # as apply_scheme casts (rotary inv_freq kept in float32)
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme,name", [("int4wo-64", "cuda_int4wo"), ("int8wo", "cuda_int8wo"),
                                         ("int8dq", "cuda_int8dq"), ("8da4w-64", "cuda_8da4w")])
@pytest.mark.parametrize("m", [1, 17, 128, 300])
def test_cuda_kernel_parity(scheme, name, m):
    q = _frozen(scheme, n=128, k=256).cuda()
    x = torch.randn(m, 256, dtype=torch.bfloat16, device="cuda")
    y = q(x)
    assert q.kernel.name == name
    assert rel_err(y, q.frozen_forward_reference(x)) < BF16_TOL
