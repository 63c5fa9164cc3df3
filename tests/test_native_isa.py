"""Which native library a CPU takes (AVX-512 or AVX2), what each registers, and the bf16 GEMM on CPUs without bf16
hardware."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import pair_chain
from torch import nn

from qcal.kernels import common, library, native
from qcal.kernels.table import Impl
from qcal.schemes import apply_scheme

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx2", "fma", "f16c"}
AVX2 = {"avx2", "fma", "f16c", "sse4_2"}


@pytest.mark.parametrize("flags,forced,want", [
    (AVX512, None, "avx512"), (AVX2, None, "avx2"), ({"sse4_2", "avx"}, None, None),
    (AVX512, "avx2", "avx2"), (AVX2, "avx512", None), (AVX512, "neon", None),
])
def test_the_cpu_flags_choose_the_library(monkeypatch, flags, forced, want):
    monkeypatch.setattr(library, "_cpu_flags", lambda: set(flags))
    if forced is None:
        monkeypatch.delenv("QCAL_NATIVE_ISA", raising=False)
    else:
        monkeypatch.setenv("QCAL_NATIVE_ISA", forced)
    assert library._cpu_isa() == want


def test_a_cpu_without_avx2_loads_nothing_and_says_why(monkeypatch):
    monkeypatch.setattr(library, "_status", None)
    monkeypatch.setattr(library, "_loaded", False)
    monkeypatch.setattr(library, "_cpu_flags", lambda: {"sse4_2"})
    monkeypatch.delenv("QCAL_NATIVE", raising=False)
    monkeypatch.delenv("QCAL_NATIVE_ISA", raising=False)
    assert not native.available() and native.isa() is None and not native.has("add_rmsnorm")
    assert "lacks AVX2/FMA/F16C" in native.native_status()
    monkeypatch.setattr(library, "_status", None)
    monkeypatch.setattr(library, "_cpu_flags", lambda: set(AVX2))
    monkeypatch.setenv("QCAL_NATIVE_ISA", "avx512")
    assert native.isa() is None and "QCAL_NATIVE_ISA='avx512' is not one of this CPU's ['avx2']" in \
        native.native_status()


def test_each_library_compiles_its_own_sources():
    avx512, avx2 = library._sources("avx512"), library._sources("avx2")
    assert avx512 and avx2 and not set(avx512) & set(avx2)
    assert all(p.parent.name == "csrc_avx2" for p in avx2)
    assert library._build_dir("avx2") != library._build_dir("avx512")


def test_has_names_registered_operators_only():
    assert not native.has("no_such_operator")
    isa = native.isa()
    if isa is None:
        assert not native.has("add_rmsnorm")
    else:  # both libraries register the decode path
        assert native.has("w16a16_mm_small", "w4a8_mm", "add_rmsnorm", "decode_step_attention")
        assert native.available() == (isa == "avx512")
        assert native.has("w8a16_mm_panel", "w4a16_mm_panel")  # the weight-only panels too
        assert native.has("w8a8_mm_panel") == (isa == "avx512") and native.has("w16a16_mm_panel") == (isa == "avx2")
    with native.disabled():
        assert native.isa() is None and not native.has("w16a16_mm_small") and not native.available()


def test_an_avx2_table_row_needs_the_avx2_library_with_its_operator():
    row = Impl("x", lambda m, x: x, native="w4a8_mm")
    assert row.usable(torch.nn.Linear(2, 2)) == (native.isa() == "avx2" and native.has("w4a8_mm"))
    assert not Impl("y", lambda m, x: x, native="no_such_operator").usable(torch.nn.Linear(2, 2))
    assert Impl("z", lambda m, x: x, native=True).usable(torch.nn.Linear(2, 2)) == native.available()


@pytest.mark.skipif(native.isa() != "avx2", reason="the AVX2 library's int8dq rows")
def test_avx2_int8dq_runs_the_fused_kernel_at_every_m():
    """Without an AVX2 panel for A8W8 the fused kernel serves prefill too (PyTorch's _int_mm ran ~30x slower)."""
    torch.manual_seed(0)
    q = apply_scheme(nn.Sequential(nn.Linear(256, 96)), "int8dq", quantize_lm_head=True)[0]
    for m in (1, 9, 64, 512):
        assert q.kernel.choose(torch.bfloat16, m).name == "qcal avx2 int8 mm, row quantization fused"


@pytest.mark.parametrize("rows,bias", [(3, False), (37, True), (64, False)])
def test_bf16_linear_without_bf16_hardware_is_the_fp32_product_rounded_once(monkeypatch, rows, bias):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 200, generator=g).to(torch.bfloat16)
    w = torch.randn(96, 200, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    monkeypatch.setattr(common, "_bf16_gemm_emulated", lambda: True)
    got = common.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    if rows > 4 and (b is not None or not native.has("w16a16_mm_panel")):  # fp32 GEMM then one rounding
        assert torch.equal(got, F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16))
    elif rows > 4:  # the AVX2 panel kernel: one fp32 chain per output (tests/test_panel.py)
        assert torch.equal(got, pair_chain(x, w).to(torch.bfloat16))
    # within one bf16 ulp (plus fp32 summation error) of the exact sum
    ulp = exact.abs().clamp_min(1e-3) * 2.0 ** -7
    assert ((got.double() - exact).abs() <= ulp + 1e-4 * exact.abs().amax()).all()
    monkeypatch.setattr(common, "_bf16_gemm_emulated", lambda: False)
    assert torch.equal(common.linear(x, w, b), F.linear(x, w, b))
    assert common.linear(x.float(), w.float()).dtype == torch.float32  # other dtypes: F.linear as it is
