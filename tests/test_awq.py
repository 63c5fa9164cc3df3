"""AWQ: scales folded exactly (float logits unchanged), never worse than round-to-nearest on the calibration
objective, better where a few input channels carry large activations; the ``awq-`` scheme prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, rel_err

from qcal.algorithms.awq import awq_error, awq_search, awq_smooth
from qcal.qtypes import qint4
from qcal.schemes import apply_scheme, describe_scheme, weight_format

CALIB = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(6)]
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(99))


def _salient(seed: int = 0):
    """A few hidden channels reach q/k/v and gate/up 20x stronger, their weight columns 20x weaker: the same float
    function, but round-to-nearest of those columns now loses what those channels carry."""
    model = make_tiny_llama(seed=seed, tie=False)
    with torch.no_grad():
        for block in model.model.layers:
            for norm, linears in ((block.input_layernorm, ("self_attn.q_proj", "self_attn.k_proj",
                                                           "self_attn.v_proj")),
                                  (block.post_attention_layernorm, ("mlp.gate_proj", "mlp.up_proj"))):
                norm.weight[:4] *= 20
                for n in linears:
                    block.get_submodule(n).weight[:, :4] /= 20
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_awq_folding_is_exact_and_never_worse_than_rtn():
    model = make_tiny_llama()
    ref = _logits(model)
    report = awq_smooth(model, CALIB, qint4, 32, False, progress=False)
    assert rel_err(_logits(model), ref) < 1e-5
    assert len(report) >= 4 and all(r["error"] <= r["rtn_error"] for r in report.values())


def test_awq_search_keeps_unit_scales_when_they_are_best():
    w = torch.randn(16, 32)
    h = torch.eye(32)  # every channel alike: nothing to protect
    s, err, base = awq_search([w], h, qint4, 32, False)
    assert err <= base and err == pytest.approx(awq_error([w], h, s, qint4, 32, False))


def test_awq_protects_salient_channels():
    ref = _logits(_salient())
    rtn = rel_err(_logits(apply_scheme(_salient(), "int4wo-32")), ref)
    awq = rel_err(_logits(apply_scheme(_salient(), "awq-int4wo-32", calib=lambda: CALIB)), ref)
    assert awq < 0.8 * rtn, (awq, rtn)
    assert "AWQ" in describe_scheme("awq-gptq-int4-32")


def test_awq_composes_with_gptq_and_rotation():
    model = apply_scheme(_salient(), "awq-gptq-int4-32", calib=lambda: CALIB)
    assert torch.isfinite(_logits(model)).all()
    assert weight_format("rot-awq-8da4w-gptq-32") == (qint4, 32, True)
    with pytest.raises(ValueError, match="no integer weight format"):
        apply_scheme(make_tiny_llama(), "awq-bf16", calib=lambda: CALIB)


def test_awq_runs_on_gptqs_pass_with_the_float_statistics():
    """``awq-gptq-*`` searches each block's scales on GPTQ's own pass (one forward per block less than a separate
    AWQ pass): the first block, whose inputs both passes share, gets the very scales AWQ alone finds."""
    from qcal.algorithms.awq import awq_block
    from qcal.algorithms.gptq import GPTQQuantizer

    alone = _salient()
    awq_smooth(alone, CALIB, qint4, 32, False, progress=False)
    fused, calls = _salient(), []
    fused.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    GPTQQuantizer(bits=4, groupsize=32, act_order=True, static_groups=True, progress=False,
                  prepare_block=lambda block, states: awq_block(block, states, qint4, 32, False)).quantize(
        fused, [torch.cat(CALIB)])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        assert torch.equal(fused.model.layers[0].get_submodule(norm).weight,
                           alone.model.layers[0].get_submodule(norm).weight)
    assert len(calls) == 3  # the model's call up to block 0, AWQ's statistics, GPTQ's solve
    ref = _logits(_salient())
    gptq = rel_err(_logits(apply_scheme(_salient(), "gptq-int4-32", calib=lambda: CALIB)), ref)
    both = rel_err(_logits(apply_scheme(_salient(), "awq-gptq-int4-32", calib=lambda: CALIB)), ref)
    assert both < gptq, (both, gptq)


def test_unquantized_runs_a_swapped_model_in_float():
    from qcal import quantize
    from qcal.nn import unquantized

    model = make_tiny_llama()
    ref = _logits(model)
    quantize(model, weights=qint4, group_size=32, exclude="lm_head")
    assert rel_err(_logits(model), ref) > 1e-3
    with unquantized(model):
        assert torch.equal(_logits(model), ref)
    assert rel_err(_logits(model), ref) > 1e-3  # quantized again after the with
