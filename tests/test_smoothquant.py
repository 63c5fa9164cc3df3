"""SmoothQuant: exact folding, where it folds, the W8A8 schemes and torchao's three-call API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qcal
from qcal.algorithms.smoothquant import (
    ActivationStats,
    smooth,
    smooth_fq_linear_to_inference,
    smooth_model,
    smoothing_scale,
    smoothquant_w8a8,
    swap_linear_with_smooth_fq_linear,
)
from qcal.schemes import apply_scheme
from tests.test_gptq import calib_ids, tiny_llama


def outlier_llama(seed: int = 0):
    """A tiny Llama whose norms create a few outlier channels, as trained LLMs have."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] = 30.0
            layer.mlp.up_proj.weight[5:7] *= 20
    return model


def test_smoothing_scale_formula():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scale(act, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(smoothing_scale(act[:2], w[:2], 0.8), act[:2] ** 0.8 / w[:2] ** 0.2)


def test_folding_leaves_the_float_function_unchanged():
    model = outlier_llama()
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    scales = smooth_model(model, calib_ids(), alpha=0.5)
    # q/k/v fold into the input norm, gate/up into the post-attention norm, o into v, down into up
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj")}
    assert set(scales) == expected
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in scales.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-4)


def test_smoothing_flattens_activation_outliers():
    model = outlier_llama()
    ids = calib_ids()
    stats = ActivationStats(model)
    with stats:
        for x in ids:
            model(x)
    name = "model.layers.0.self_attn.q_proj"
    assert stats.norm_of[name] == "model.layers.0.input_layernorm"
    assert stats.norm_of["model.layers.0.mlp.down_proj"] is None
    ratio_before = (stats.absmax(name).max() / stats.absmax(name).median()).item()
    smooth(model, stats, 0.5)
    after = ActivationStats(model)
    with after:
        for x in ids:
            model(x)
    ratio_after = (after.absmax(name).max() / after.absmax(name).median()).item()
    assert ratio_after < ratio_before / 3


def test_a_norm_that_does_not_fold_exactly_is_left_alone():
    class OnePlusNorm(nn.Module):  # Gemma-style: y = x * (1 + w); dividing w by s is not exact
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d))

        def forward(self, x):
            return x * (1 + self.weight)

    torch.manual_seed(0)
    model = nn.Sequential(OnePlusNorm(16), nn.Linear(16, 8))
    ref = copy.deepcopy(model)
    x = torch.randn(4, 16) * torch.linspace(0.1, 10, 16)
    scales = smooth_model(model, [x], exclude=None)
    assert scales == {}
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def _ppl_proxy(model, ref_logits, x):
    with torch.no_grad():
        return (model(x).logits - ref_logits).pow(2).mean().item()


def test_w8a8_static_smoothing_beats_no_smoothing_on_outliers():
    base = outlier_llama()
    ids = calib_ids(8)
    x = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = base(x).logits
    plain = copy.deepcopy(base)
    qcal.quantize(plain, weights=qcal.qint8, activations=qcal.qint8, exclude="lm_head")
    qcal.schemes.calibrate(plain, ids)
    smoothed = smoothquant_w8a8(copy.deepcopy(base), ids, dynamic=False)
    assert _ppl_proxy(smoothed, ref, x) < 0.5 * _ppl_proxy(plain, ref, x)
    dyn = smoothquant_w8a8(copy.deepcopy(base), ids, dynamic=True)
    assert all(m.act_spec.dynamic for _, m in qcal.quantized_modules(dyn))
    assert _ppl_proxy(dyn, ref, x) < _ppl_proxy(smoothed, ref, x)


def test_seed_api_three_calls():
    model = outlier_llama()
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    qcal.quantize(plain, weights=qcal.qint8, activations=qcal.qint8, dynamic=True, exclude="lm_head")
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    swap_linear_with_smooth_fq_linear(model, alpha=0.5)
    with torch.no_grad():
        for ids in calib_ids(4):
            model(ids)
    smooth_fq_linear_to_inference(model)
    mods = dict(qcal.quantized_modules(model))
    assert len(mods) == 14 and "lm_head" not in mods
    assert all(m.frozen and m.act_spec.dynamic and m.weight_spec.qtype == qcal.qint8 for m in mods.values())
    with torch.no_grad():
        expected = ref(x).logits
        rel = (model(x).logits - expected).norm() / expected.norm()
        rel_plain = (plain(x).logits - expected).norm() / expected.norm()
    assert rel < 0.6 * rel_plain
    with pytest.raises(RuntimeError, match="swap_linear_with_smooth_fq_linear"):
        smooth_fq_linear_to_inference(model)
    fresh = swap_linear_with_smooth_fq_linear(tiny_llama())
    with pytest.raises(RuntimeError, match="no calibration batch"):
        smooth_fq_linear_to_inference(fresh)


def test_smoothquant_scheme_names(tmp_path):
    ids = calib_ids(4)
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    for name, dynamic in (("smoothquant-w8a8", True), ("smoothquant-w8a8-static", False)):
        model = apply_scheme(outlier_llama(), name, calib=lambda: ids)
        mods = dict(qcal.quantized_modules(model))
        assert len(mods) == 14 and all(m.frozen and m.act_spec.dynamic == dynamic for m in mods.values())
        assert next(model.parameters()).dtype == torch.bfloat16
    # the smoothed, frozen model saves and loads like any other
    qcal.serialization.save(model, tmp_path)
    loaded = qcal.serialization.load(outlier_llama(seed=2).to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
