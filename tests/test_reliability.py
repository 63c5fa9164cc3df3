"""Hostile input on the fast paths: wrong shapes are refused (never read past a weight), PyTorch's private
ops only see the shapes they handle, NaN/Inf in an activation row give a non-finite output row on every path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcal
from qcal.kernels import native
from qcal.schemes import apply_scheme, quantize_kwargs


def _frozen(scheme: str, k: int = 128, n: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    return apply_scheme(nn.Sequential(nn.Linear(k, n)), scheme, quantize_lm_head=True)


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("scheme", ["int8wo", "int8dq", "int4wo-32", "8da4w-32"])
@pytest.mark.parametrize("k", [256, 262144, 64])
def test_wrong_input_width_is_refused(scheme, native_on, k):
    with native.disabled(not native_on):
        m = _frozen(scheme)
    for rows in (1, 4, 64):
        with pytest.raises(ValueError, match="features"):
            m(torch.randn(rows, k, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17])
def test_int8_weight_only_pytorch_path_any_k(rows):
    """``_weight_int8pack_mm`` returns garbage or crashes when K % 32 != 0: those shapes take the safe path."""
    with native.disabled():
        m = _frozen("int8wo", k=100, n=32)
    assert m[0].kernel.name == "cpu_int8wo"
    x = torch.randn(rows, 100)
    ref = nn.functional.linear(x.bfloat16(), m[0].dequantized_weight(torch.bfloat16), m[0].bias.bfloat16())
    assert torch.allclose(m(x).bfloat16().float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.native_ops("w8a16_mm_vnni", "w4a8_mm")  # either library: each registered operator is tried
def test_native_operators_check_k():
    """Every native matmul refuses an input whose width is not the weight's (it would read out of bounds)."""
    ops = torch.ops.qcal
    w8, ws, w16 = torch.zeros(32, 64, dtype=torch.int8), torch.ones(32), torch.zeros(32, 64, dtype=torch.bfloat16)
    w4, sz = torch.zeros(32, 32, dtype=torch.uint8), torch.zeros(2, 2, 2, 16, dtype=torch.bfloat16)
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    calls = {"w8a16_mm_small": lambda: ops.w8a16_mm_small(x, w8, ws),
             "w8a16_mm_vnni": lambda: ops.w8a16_mm_vnni(x, w8, native.int8_row_sums(w8), ws),
             "w8a8_mm_small": lambda: ops.w8a8_mm_small(x, w8, native.int8_row_sums(w8), ws),
             "w8a16_mm_panel": lambda: ops.w8a16_mm_panel(x, w8, ws),
             "w8a8_mm_panel": lambda: ops.w8a8_mm_panel(x, w8, native.int8_row_sums(w8), ws),
             "w4a16_mm_small": lambda: ops.w4a16_mm_small(x, w4, sz, False, 32),
             "w4a8_mm": lambda: ops.w4a8_mm(x, w4, sz, 32),
             "w4a16_mm_panel": lambda: ops.w4a16_mm_panel(x, w4, torch.ones(32, 2), None, 32),
             "w16a16_mm_small": lambda: ops.w16a16_mm_small(x, w16),
             "w16a16_mm_panel": lambda: ops.w16a16_mm_panel(x, w16)}
    tried = [name for name in calls if native.has(name)]
    assert len(tried) >= 9  # nine matmuls in either library
    for name in tried:
        with pytest.raises(ValueError, match=r"x must be \(M, 64\)"):
            calls[name]()


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("scheme", ["int8dq", "8da4w-32", "int8wo", "int4wo-32", "fp8wo", "fp8dq", "fp6wo", "fp4wo-32"])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_nan_and_inf_rows_propagate(scheme, native_on, rows):
    with native.disabled(not native_on):
        m = _frozen(scheme, k=256)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    x[0, 37] = float("nan")
    if rows > 1:
        x[1, 200] = float("inf")
    y = m(x)
    assert torch.isnan(y[0]).all()
    if rows > 1:
        assert (~torch.isfinite(y[1])).all()
        assert torch.isfinite(y[2:]).all()
    ref = m[0].frozen_forward_reference(x)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))


def test_group_size_true_is_refused():
    with pytest.raises(ValueError, match="group_size"):
        qcal.quantize(nn.Sequential(nn.Linear(64, 64)), weights=qcal.qint4, group_size=True)


_PROBE = "from qcal.kernels import library as n; print(n.isa() is not None, n._cache_dir())"


def _probe(cache, code: str = _PROBE, **env):
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "QCAL_CACHE_DIR": str(cache), **env})
    assert run.returncode == 0, run.stderr[-2000:]  # never a crash (SIGBUS, SIGSEGV)
    ok, where = run.stdout.split()
    return ok == "True", where, run.stderr


@pytest.mark.native_ops("w4a8_mm")  # either library
def test_kernel_cache_is_private_and_verified(tmp_path):
    import shutil
    import subprocess

    from qcal.kernels import library

    cache = tmp_path / "cache"
    libdir = cache / "native"
    built = library._build_dir(native.isa())  # this run's build: its objects spare the copy a full compile
    libdir.mkdir(parents=True, mode=0o700)
    shutil.copytree(built, libdir / built.name, copy_function=shutil.copy2)
    ok, where, _ = _probe(cache)
    assert ok and where == str(libdir) and (libdir.stat().st_mode & 0o777) == 0o700
    (lib,) = libdir.glob("*/*.so")
    assert lib.with_suffix(".sha256").is_file()
    # a library planted under the expected name (its constructor would run as the caller) is not loaded
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "evil.c"
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void f(void) {{ FILE *o = '
                   f'fopen("{marker}", "w"); if (o) fclose(o); }}\n')
    cc = shutil.which("gcc") or shutil.which("cc")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    ok, _, _ = _probe(cache)
    assert ok and not marker.exists() and library._trusted(lib)  # relinked from the objects and recorded
    # a truncated library is rebuilt, not loaded (it would kill the process with SIGBUS)
    lib.write_bytes(lib.read_bytes()[:4096])
    ok, _, _ = _probe(cache)
    assert ok and library._trusted(lib)
    # a cache directory others can write to is not used at all
    libdir.chmod(0o777)
    ok, where, err = _probe(cache, "from qcal.kernels import library as n; print(True, n._cache_dir())")
    shutil.rmtree(where, ignore_errors=True)
    assert ok and where != str(libdir) and "writable by others" in err


def test_empty_batches():
    m = nn.Sequential(nn.Linear(64, 32))
    qcal.quantize(m, weights=qcal.qint8, activations=qcal.qint8)
    with qcal.Calibration():
        m(torch.randn(0, 64))  # nothing to record, no error
        m(torch.randn(4, 64))
    qcal.freeze(m)
    assert m(torch.randn(0, 64)).shape == (0, 32) and m(torch.randn(2, 0, 64)).shape == (2, 0, 32)
    for scheme in ("int8wo", "int8dq", "int4wo-32", "8da4w-32", "fp8wo", "fp8dq", "fp6wo", "fp5wo", "fp4wo-32"):
        assert _frozen(scheme, k=64, n=32)(torch.randn(0, 64, dtype=torch.bfloat16)).shape == (0, 32)


def test_freeze_meta_model_is_a_clear_error():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(64, 32))
    qcal.quantize(m, weights=qcal.qint4, group_size=32)
    with pytest.raises(ValueError, match="'0' has its weight on the meta device"):
        qcal.freeze(m)


def _state(model):
    return {n: (type(m), {k: v.detach().clone() for k, v in m.state_dict().items()}) for n, m in model.named_modules()}


def _same(model, before):
    now = _state(model)
    assert now.keys() == before.keys()
    for n, (t, sd) in before.items():
        assert now[n][0] is t, n
        assert sd.keys() == now[n][1].keys(), n
        assert all(torch.equal(sd[k], now[n][1][k]) or (torch.isnan(sd[k]).any() and torch.allclose(
            sd[k], now[n][1][k], equal_nan=True)) for k in sd), n


def _calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]


@pytest.mark.parametrize("scheme", ["gptq-int4-32", "smoothquant-w8a8", "w8a8-static", "int4wo-32"])
def test_scheme_failing_midway_leaves_the_model_as_it_was(scheme):
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")  # met only in the second block
    before = _state(model)
    with pytest.raises(ValueError, match="NaN"):
        apply_scheme(model, scheme, calib=_calib)
    _same(model, before)
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None


def test_interrupted_gptq_leaves_the_model_as_it_was(monkeypatch):
    from conftest import make_tiny_llama

    from qcal.algorithms.gptq import GPTQQuantizer

    model = make_tiny_llama()
    before = _state(model)
    calls = {"n": 0}
    solve = GPTQQuantizer._solve

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 9:  # in the second block, after the first was rewritten
            raise KeyboardInterrupt
        return solve(self, *args)

    monkeypatch.setattr(GPTQQuantizer, "_solve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_scheme(model, "gptq-int4-32-actorder", calib=_calib)
    assert calls["n"] == 9
    _same(model, before)
    monkeypatch.setattr(GPTQQuantizer, "_solve", solve)
    apply_scheme(model, "gptq-int4-32-actorder", calib=_calib)  # and the model is still usable


def test_gptq_quantizer_direct_call_is_transactional():
    from conftest import make_tiny_llama

    from qcal.algorithms.gptq import GPTQQuantizer

    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match="NaN"):
        GPTQQuantizer(groupsize=32).quantize(model, _calib())
    _same(model, before)


@pytest.mark.parametrize("magnitude", [1e-5, 1e-3])
@pytest.mark.parametrize("scheme", ["int8wo", "int4wo-32", "8da4w-32", "int8dq"])
def test_float16_models_with_small_weights(scheme, magnitude):
    """float16 scales would stop at 6.1e-5 (weights of 1e-5 became 0, of 1e-3 got 3% error): scales are float32."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 64, bias=False)).half()
    with torch.no_grad():
        m[0].weight.mul_(magnitude / m[0].weight.abs().max())
    w = m[0].weight.detach().float().clone()
    qcal.quantize(m, **quantize_kwargs(scheme))
    qcal.freeze(m)
    m.half()  # a later cast keeps them too
    assert m[0].weight_scale.dtype == torch.float32
    bound = {"int8wo": 0.01, "int8dq": 0.01}.get(scheme, 0.12)
    assert ((m[0].dequantized_weight(torch.float32) - w).norm() / w.norm()).item() < bound
    x = torch.randn(3, 256, dtype=torch.float16)
    ref = m[0].frozen_forward_reference(x).float()
    assert ((m(x).float() - ref).norm() / ref.norm()).item() < 2e-2
