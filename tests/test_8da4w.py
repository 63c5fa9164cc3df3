"""Int8DynActInt4Weight: the same modules as the ``8da4w-<g>`` scheme, numerics against a direct reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qcal
from qcal.algorithms.int8_dyn_act_int4_weight import (
    Int8DynActInt4WeightGPTQQuantizer,
    Int8DynActInt4WeightQuantizer,
)
from qcal.schemes import apply_scheme
from tests.test_gptq import calib_ids, tiny_llama


def reference_8da4w(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, group: int) -> torch.Tensor:
    """Written out by hand: int8 symmetric per-token activations, int4 symmetric groups (scale amax/7)."""
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x / sx).clamp(-128, 127) * sx
    wg = w.reshape(w.shape[0], -1, group)
    sw = wg.abs().amax(-1, keepdim=True) / 7
    wq = (torch.round(wg / sw).clamp(-8, 7) * sw).reshape(w.shape)
    return xq @ wq.T + (0 if b is None else b)


def test_numerics_match_a_direct_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))
    ref = copy.deepcopy(model)
    x = torch.randn(5, 7, 64)
    Int8DynActInt4WeightQuantizer(groupsize=16, exclude=None).quantize(model)
    assert all(m.frozen for _, m in qcal.quantized_modules(model))
    h = torch.relu(reference_8da4w(x, ref[0].weight, ref[0].bias, 16))
    expected = reference_8da4w(h, ref[2].weight, None, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_same_modules_as_the_8da4w_scheme():
    x = torch.randint(0, 128, (2, 16))
    a = Int8DynActInt4WeightQuantizer(groupsize=32, precision=torch.bfloat16).quantize(tiny_llama())
    b = apply_scheme(tiny_llama(), "8da4w-32")
    ma, mb = dict(qcal.quantized_modules(a)), dict(qcal.quantized_modules(b))
    assert ma.keys() == mb.keys() and "lm_head" not in ma
    for name in ma:
        assert ma[name].qcal_config() == mb[name].qcal_config()
        assert torch.equal(ma[name].qweight, mb[name].qweight)
    assert next(a.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_gptq_weights_on_the_same_grid_and_closer_than_rtn():
    ids = calib_ids(16)
    test = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    base = tiny_llama()
    with torch.no_grad():
        ref = base(test).logits
        rtn = Int8DynActInt4WeightQuantizer(groupsize=16).quantize(copy.deepcopy(base))
        gptq = Int8DynActInt4WeightGPTQQuantizer(groupsize=16, progress=False).quantize(copy.deepcopy(base), ids)
        mr, mg = dict(qcal.quantized_modules(rtn)), dict(qcal.quantized_modules(gptq))
        for name in mr:
            assert mr[name].qcal_config() == mg[name].qcal_config()
            assert mg[name].weight_zero_point is None  # symmetric
            codes = mg[name].int_weight()
            assert codes.min() >= -8 and codes.max() <= 7
        err_rtn = (rtn(test).logits - ref).pow(2).mean()
        err_gptq = (gptq(test).logits - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_8da4w_gptq_scheme():
    ids = calib_ids()
    model = apply_scheme(tiny_llama(), "8da4w-gptq-16", calib=lambda: ids)
    mods = dict(qcal.quantized_modules(model))
    assert len(mods) == 14 and all(m.frozen and m.act_spec.dynamic for m in mods.values())
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="calibration data"):
        apply_scheme(tiny_llama(), "8da4w-gptq-16")
