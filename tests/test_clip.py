"""Clipping search: weight ranges chosen against the calibration inputs' mean squares, never worse than min/max on
that objective; the ``clip-`` prefix for round-to-nearest and GPTQ schemes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from qcal import quantize
from qcal.algorithms.clip import clip_search, clip_weights, input_mean_squares
from qcal.qtypes import qint4, qint8
from qcal.schemes import apply_scheme, describe_scheme

CALIB = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(6)]
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(99))


def _heavy_tailed(seed: int = 0):
    """The tiny model with Student-t (3 degrees of freedom) linear weights: a few large weights per group stretch
    min/max, the case clipping is for."""
    model = make_tiny_llama(seed=seed, tie=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.layers:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    z = torch.randn(m.weight.shape, generator=g)
                    chi = torch.randn((3, *m.weight.shape), generator=g).pow(2).mean(0)
                    m.weight.copy_(z / chi.sqrt() * 0.02)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_input_mean_squares_of_a_quantized_linear_are_the_float_inputs():
    lin = nn.Linear(16, 8)
    xs = [torch.randn(3, 5, 16) for _ in range(2)]
    model = quantize(nn.Sequential(lin), weights=qint4, group_size=8, activations=qint8, dynamic=True)
    stats = input_mean_squares(model, xs, {"0": model[0]})
    ref = torch.cat([x.reshape(-1, 16) for x in xs]).pow(2).mean(0)
    torch.testing.assert_close(stats["0"], ref)


@pytest.mark.parametrize("kw", [dict(weights=qint4, group_size=32, symmetric=False),
                                dict(weights=qint4, group_size=32, symmetric=False, zero_point="int"),
                                dict(weights=qint4, symmetric=True), dict(weights=qint8)])
def test_clip_search_is_never_worse_than_minmax(kw):
    model = quantize(_heavy_tailed(1), exclude="lm_head", **kw)
    report = clip_weights(model, CALIB, progress=False)
    assert len(report) == 14  # 2 blocks x 7 linears
    assert all(r["error"] <= r["minmax_error"] for r in report.values())
    gain = sum(r["error"] for r in report.values()) / sum(r["minmax_error"] for r in report.values())
    assert gain < (0.97 if kw["weights"] is qint4 else 1.0 + 1e-9), gain


def test_clip_search_lowers_the_output_error_on_unseen_inputs():
    """Independent input channels of unequal scale: the weighted objective is the expected output error, so the
    searched ranges give a lower output error than min/max on inputs the search never saw."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 128, generator=g) / torch.randn(3, 64, 128, generator=g).pow(2).mean(0).sqrt())
    channel_scale = torch.rand(128, generator=g) * 3 + 0.1
    calib = [torch.randn(256, 128, generator=g) * channel_scale for _ in range(4)]
    test = torch.randn(4096, 128, generator=g) * channel_scale
    ref = test @ lin.weight.T

    def output_error(model):
        with torch.no_grad():
            return float((model(test) - ref).pow(2).mean())
    minmax = quantize(nn.Sequential(nn.Linear(128, 64, bias=False)), weights=qint4, group_size=32, symmetric=False)
    minmax[0].weight.data.copy_(lin.weight)
    minmax[0].fix_weight_qparams()
    clipped = quantize(nn.Sequential(nn.Linear(128, 64, bias=False)), weights=qint4, group_size=32, symmetric=False)
    clipped[0].weight.data.copy_(lin.weight)
    clip_weights(clipped, calib, progress=False)
    assert output_error(clipped) < 0.95 * output_error(minmax), (output_error(clipped), output_error(minmax))


def test_clip_search_with_flat_importance_matches_the_weighted_objective():
    model = quantize(nn.Sequential(nn.Linear(64, 16)), weights=qint4, group_size=16, symmetric=False)
    scale, zp, err, base = clip_search(model[0], torch.ones(64))
    assert err <= base
    with pytest.raises(ValueError, match="input channels"):
        clip_search(model[0], torch.ones(32))


def test_clip_prefix_for_rtn_and_gptq():
    rtn = apply_scheme(_heavy_tailed(), "int4wo-32")
    clip = apply_scheme(_heavy_tailed(), "clip-int4wo-32", calib=lambda: CALIB)
    q, c = rtn.model.layers[0].mlp.down_proj, clip.model.layers[0].mlp.down_proj
    assert (c.weight_scale <= q.weight_scale).all() and (c.weight_scale < q.weight_scale).any()
    assert torch.isfinite(_logits(clip)).all()
    gptq = _logits(apply_scheme(make_tiny_llama(), "gptq-int4-32", calib=lambda: CALIB))
    both = _logits(apply_scheme(make_tiny_llama(), "awq-clip-gptq-int4-32", calib=lambda: CALIB))
    assert torch.isfinite(both).all() and not torch.equal(both, gptq)
    assert "clipping search" in describe_scheme("clip-gptq-int4-32")
    for bad in ("clip-bf16", "clip-gptq-gguf-q4_0", "clip-clip-int4wo-32"):
        model = make_tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="clip"):
            apply_scheme(model, bad, calib=lambda: CALIB)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
