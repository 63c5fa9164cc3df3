"""GPTQ: the per-layer algorithm, the block-by-block driver, and the round trip through freeze/save/load."""

from __future__ import annotations

import copy
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qcal
from qcal.algorithms import GPTQQuantizer, InputRecorder, Int4WeightOnlyGPTQQuantizer, gptq_quantize_weight
from qcal.algorithms.sequential import find_blocks
from qcal.granularity import PerAxis, PerGroup
from qcal.primitives import choose_qparams, fake_quantize
from qcal.schemes import apply_scheme

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Samples of one fixed distribution: a few latent factors mixed into ``d`` channels plus noise."""
    mix = torch.randn(d // 4, d, generator=torch.Generator().manual_seed(1234))
    scale = torch.logspace(0, 1, d)  # channels of different magnitude, like LLM activations
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d // 4, generator=g)
    return (z @ mix + 0.1 * torch.randn(n, d, generator=g)) * scale


def output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - wq).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def rtn(w: torch.Tensor, qt, group_size, symmetric) -> torch.Tensor:
    gran = PerGroup(group_size) if group_size else PerAxis(0)
    s, z = choose_qparams(w, qt, gran, symmetric)
    return fake_quantize(w, s, z, qt)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calib_ids(n: int = 8, seqlen: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (1, seqlen), generator=g) for _ in range(n)]


@pytest.mark.parametrize(("bits", "group_size", "symmetric"),
                         [(4, 16, False), (4, None, False), (3, 16, False), (2, 32, False), (8, None, True),
                          (4, 32, True)])
def test_gptq_output_error_below_rtn_on_correlated_inputs(bits, group_size, symmetric):
    torch.manual_seed(0)
    x = correlated_inputs()
    w = torch.randn(48, 64)
    qt = {2: qcal.qint2, 3: qcal.qint3, 4: qcal.qint4, 8: qcal.qint8}[bits]
    res = gptq_quantize_weight(w, x.T @ x / len(x), qt, group_size, symmetric)
    gptq_err = output_error(w, res.weight, x)
    rtn_err = output_error(w, rtn(w, qt, group_size, symmetric), x)
    assert gptq_err < 0.75 * rtn_err
    assert res.error == pytest.approx(gptq_err, rel=1e-3)
    assert res.rtn_error == pytest.approx(rtn_err, rel=1e-3)
    assert res.codes.min() >= qt.qmin and res.codes.max() <= qt.qmax


def test_act_order_static_groups_stay_on_the_contiguous_grid():
    x = correlated_inputs()
    w = torch.randn(48, 64)
    res = gptq_quantize_weight(w, x.T @ x, qcal.qint4, 16, act_order=True)
    assert res.perm is not None and not torch.equal(res.perm, torch.arange(64))
    assert res.scale.shape == (48, 4)
    recon = qcal.primitives.dequantize(res.codes, res.scale, res.zero_point)
    assert torch.equal(recon, res.weight)
    assert res.error < res.rtn_error


def test_mse_clipping_search_keeps_codes_consistent():
    x = correlated_inputs()
    w = torch.randn(48, 64)
    plain = gptq_quantize_weight(w, x.T @ x, qcal.qint4, 16, static_groups=True)
    mse = gptq_quantize_weight(w, x.T @ x, qcal.qint4, 16, static_groups=True, mse=True)
    assert torch.equal(qcal.primitives.dequantize(mse.codes, mse.scale, mse.zero_point), mse.weight)
    assert (mse.scale <= plain.scale * (1 + 1e-6)).all()  # the search only shrinks ranges
    assert (mse.scale < plain.scale * 0.999).any()
    assert mse.error < mse.rtn_error


def test_singular_hessian_does_not_produce_nan(caplog):
    x = correlated_inputs(n=16)  # rank <= 16 < 64: singular
    x[:, 5] = 0  # a dead input channel
    w = torch.randn(32, 64)
    with caplog.at_level(logging.WARNING, logger="qcal.algorithms.gptq"):
        res = gptq_quantize_weight(w, x.T @ x, qcal.qint4, 16, percdamp=0.0)
    assert torch.isfinite(res.weight).all()
    assert res.damping > 0 and "retrying with damping" in caplog.text
    # a Hessian no damping can repair (negative definite) falls back to round-to-nearest
    with caplog.at_level(logging.WARNING, logger="qcal.algorithms.gptq"):
        bad = gptq_quantize_weight(w, -torch.eye(64), qcal.qint4, 16)
    assert torch.isfinite(bad.weight).all() and bad.damping == float("inf")
    assert torch.equal(bad.weight, rtn(w, qcal.qint4, 16, False))
    # all-zero Hessian (the layer never saw a non-zero input) is not an error either
    zero = gptq_quantize_weight(w, torch.zeros(64, 64), qcal.qint4, 16)
    assert torch.isfinite(zero.weight).all()
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize_weight(w, torch.full((64, 64), float("nan")), qcal.qint4, 16)


def test_codes_survive_freeze_exactly():
    model = tiny_llama()
    q = GPTQQuantizer(bits=4, groupsize=16, progress=False)
    q.quantize(model, calib_ids())
    before = {n: m.int_weight().clone() for n, m in qcal.quantized_modules(model)}
    assert len(q.report) == 14 and set(q.report) == set(before)
    for _, module in qcal.quantized_modules(model):
        s = module.weight_scale
        assert s is not None and s.shape == (module.out_features, module.in_features // 16)
        assert module.weight_zero_point.shape == s.shape
        # the dequantized GPTQ weight sits exactly on the grid: fake-quant is the identity on it
        assert torch.equal(module.qweight_fake(), module.weight)
    x = torch.randint(0, 128, (2, 32))
    fake = model(x).logits
    qcal.freeze(model)
    for n, m in qcal.quantized_modules(model):
        assert torch.equal(m.int_weight(), before[n])
    torch.testing.assert_close(model(x).logits, fake, rtol=0, atol=1e-5)


def test_gptq_model_beats_rtn_and_true_sequential_paths_agree():
    model = tiny_llama()
    ids = calib_ids(16)
    test = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    ref = model(test).logits

    @torch.no_grad()
    def err(m):
        return float((m(test).logits - ref).pow(2).mean())

    r = copy.deepcopy(model)
    qcal.quantize(r, weights=qcal.qint3, group_size=16, symmetric=False, exclude="lm_head")
    online = copy.deepcopy(model)
    GPTQQuantizer(bits=3, groupsize=16, progress=False).quantize(online, ids)
    staged = copy.deepcopy(model)
    GPTQQuantizer(bits=3, groupsize=16, batch_size=4, progress=False).quantize(staged, ids)
    assert err(online) < 0.8 * err(r)
    # one forward per block (all samples at once) and the bounded-memory staged passes are one algorithm
    torch.testing.assert_close(online(test).logits, staged(test).logits, rtol=0, atol=1e-4)


def test_act_order_round_trips_through_freeze_save_load(tmp_path):
    model = tiny_llama()
    q = GPTQQuantizer(bits=4, groupsize=16, act_order=True, static_groups=True, progress=False)
    q.quantize(model, calib_ids())
    assert all(r["perm"] is not None for r in q.report.values())
    x = torch.randint(0, 128, (2, 32))
    fake = model(x).logits
    qcal.freeze(model)
    frozen = model(x).logits
    torch.testing.assert_close(frozen, fake, rtol=0, atol=1e-5)
    qcal.serialization.save(model, tmp_path)
    loaded = qcal.serialization.load(tiny_llama(seed=3), tmp_path)
    assert torch.equal(loaded(x).logits, frozen)


def test_plain_module_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    assert find_blocks(model) is None
    inputs = [correlated_inputs(n=64, seed=s) for s in range(4)]
    ref = copy.deepcopy(model)
    r = copy.deepcopy(model)
    qcal.quantize(r, weights=qcal.qint4, group_size=32, symmetric=False)
    q = GPTQQuantizer(bits=4, groupsize=32, exclude=None, progress=False)
    q.quantize(model, inputs)
    assert set(q.report) == {"0", "2"}
    x = correlated_inputs(n=128, seed=9)
    with torch.no_grad():
        assert (model(x) - ref(x)).pow(2).mean() < 0.8 * (r(x) - ref(x)).pow(2).mean()


def test_int4_weight_only_gptq_quantizer_returns_frozen_model():
    model = tiny_llama()
    Int4WeightOnlyGPTQQuantizer(128, 0.01, 32, progress=False).quantize(model, calib_ids())
    mods = dict(qcal.quantized_modules(model))
    assert len(mods) == 14 and all(m.frozen for m in mods.values())
    assert "lm_head" not in mods
    spec = mods["model.layers.0.mlp.down_proj"].weight_spec
    assert spec.qtype == qcal.qint4 and spec.group_size == 32 and not spec.symmetric


def test_gptq_scheme_names():
    ids = calib_ids()
    for name, gs in (("gptq-int4-32", 32), ("gptq-int3-16-actorder", 16), ("gptq-int4-pc", None)):
        model = apply_scheme(tiny_llama(), name, calib=lambda: ids)
        mods = dict(qcal.quantized_modules(model))
        assert len(mods) == 14 and all(m.frozen for m in mods.values())
        assert mods["model.layers.1.self_attn.q_proj"].weight_spec.group_size == gs
        assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="calibration data"):
        apply_scheme(tiny_llama(), "gptq-int4-32")


def test_unsuffixed_gptq_name_is_act_order_with_static_groups():
    """The default name is the best measured configuration: the same weights as ``-actorder`` (act_order, static
    groups); ``-noactorder`` is the reference GPTQ."""
    ids = calib_ids()

    def weights(model):
        return {n: m.dequantized_weight() for n, m in qcal.quantized_modules(model)}

    default = weights(apply_scheme(tiny_llama(), "gptq-int4-32", calib=lambda: ids))
    explicit = weights(apply_scheme(tiny_llama(), "gptq-int4-32-actorder", calib=lambda: ids))
    reference = weights(apply_scheme(tiny_llama(), "gptq-int4-32-noactorder", calib=lambda: ids))
    for n, w in default.items():
        assert torch.equal(w, explicit[n])
    assert any(not torch.equal(w, reference[n]) for n, w in default.items())


class ByteTokenizer:
    """A stand-in tokenizer: one token per UTF-8 byte."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode("utf-8"))], dtype=torch.long))


@pytest.mark.skipif(not os.path.isdir(DATA), reason="shared/data is not available")
def test_input_recorder_is_seeded_and_never_uses_test():
    rec = InputRecorder(ByteTokenizer(), 64, vocab_size=256, data_dir=DATA)
    inputs = rec.record_inputs(["wikitext", "c4"], 5).get_inputs()
    assert len(inputs) == 5 and all(x.shape == (1, 64) and x.dtype == torch.long for x in inputs)
    again = InputRecorder(ByteTokenizer(), 64, data_dir=DATA).record_inputs(["wikitext", "c4"], 5).get_inputs()
    assert all(torch.equal(a, b) for a, b in zip(inputs, again, strict=True))
    valid = open(os.path.join(DATA, "wikitext-2-raw", "validation.txt"), encoding="utf-8").read().encode()
    assert bytes(inputs[0][0].tolist()) in valid
    prepped = InputRecorder(ByteTokenizer(), 16, input_prep_func=lambda ids: ids + 1, data_dir=DATA)
    assert prepped.record_inputs("c4", 2).get_inputs()[0].shape == (1, 16)
    with pytest.raises(ValueError, match="unknown calibration task"):
        InputRecorder(ByteTokenizer(), 16, data_dir=DATA).record_inputs("wikitext-test", 2)
    with pytest.raises(ValueError, match="vocab_size"):
        InputRecorder(ByteTokenizer(), 16, vocab_size=10, data_dir=DATA).record_inputs("c4", 1)


def test_act_order_every_kernel_matches_the_fake_quant_model():
    from qcal.kernels import KERNELS, REFERENCE

    model = tiny_llama()
    GPTQQuantizer(bits=4, groupsize=32, act_order=True, progress=False).quantize(model, calib_ids())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = {n: m(x) for n, m in qcal.quantized_modules(model) if m.in_features == 64}
        qcal.freeze(model)
        for name, module in qcal.quantized_modules(model):
            if name not in fake:
                continue
            torch.testing.assert_close(REFERENCE(module, x), fake[name], rtol=0, atol=1e-5)
            module.to(torch.bfloat16)
            ref = REFERENCE(module, x.bfloat16()).float()
            for kernel in KERNELS:  # every table that takes the module, every implementation it can reach
                plan = kernel.bind(module) if kernel.supports(module) else None
                for impl in plan.impls if plan is not None else ():
                    if impl.takes(torch.bfloat16, False):
                        out = impl.run(module, x.bfloat16()).float()
                        assert (out - ref).norm() <= 2e-2 * ref.norm(), (kernel.name, impl.name)


def test_activation_weighted_clipping_never_worse_than_min_max():
    """``mse="act"``: each row's range is searched against the error weighted by the input channels' mean square;
    min/max is one of the candidates, so the weighted error never grows (and here drops)."""
    from qcal.algorithms.gptq import _group_qparams
    from qcal.primitives import fake_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * torch.linspace(0.2, 3, 32)  # heavy columns: wide min/max ranges
    w[:, 0] *= 8
    importance = torch.rand(32, generator=g) ** 4 + 1e-3
    importance[0] = 1e-4  # the outlier column's input is nearly silent: clipping it costs little

    def err(mse):
        s, z = _group_qparams(w, qcal.qint4, False, torch.float32, mse, importance=importance)
        return ((fake_quantize(w, s[:, None], z[:, None], qcal.qint4) - w) ** 2 * importance).sum(1)

    minmax, act = err(False), err("act")
    assert (act <= minmax + 1e-6).all()
    assert act.sum() < 0.8 * minmax.sum()


def test_gptaq_fits_the_float_models_outputs():
    """``float_target`` (GPTAQ): each linear fitted to the float model's output on the float inputs, correcting the
    error of the layers quantized before it: on the calibration tokens, logits closer to the float model's than
    GPTQ's on a 4-block model; the first linears (same inputs in both streams) get GPTQ's very weights; refused where
    the two streams cannot sit side by side."""
    from conftest import make_tiny_llama, rel_err

    from qcal.algorithms.sequential import BlockStates
    from qcal.schemes import apply_scheme, streamable_scheme

    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    ids = calib

    def logits(m):
        with torch.no_grad():
            return m(ids).logits.float()
    ref = logits(make_tiny_llama(layers=4))
    out = {}
    for ft in (False, True):
        m = make_tiny_llama(layers=4)
        GPTQQuantizer(bits=4, groupsize=32, act_order=True, static_groups=True, float_target=ft,
                      progress=False).quantize(m, [calib])
        out[ft] = m
    q0 = [out[ft].model.layers[0].self_attn.q_proj.weight for ft in (False, True)]
    assert torch.equal(*q0)
    err = {ft: rel_err(logits(m), ref) for ft, m in out.items()}
    assert err[True] < 0.85 * err[False], err
    scheme = rel_err(logits(apply_scheme(make_tiny_llama(layers=4), "gptaq-int4-32", calib=lambda: [calib])), ref)
    assert scheme < err[False]
    for bad in (dict(batch_size=2), ):
        with pytest.raises(ValueError, match="float_target"):
            GPTQQuantizer(bits=4, groupsize=32, float_target=True, progress=False, **bad).quantize(
                make_tiny_llama(), [calib])
    with pytest.raises(ValueError, match="float_target"):
        GPTQQuantizer(bits=4, groupsize=32, float_target=True, progress=False).quantize(
            make_tiny_llama(), list(calib.split(1)) + [calib[:1, :16]])
    with pytest.raises(ValueError, match="float_target"):
        GPTQQuantizer(bits=4, groupsize=32, float_target=True, progress=False).quantize(
            nn.Linear(64, 8), BlockStates([((torch.randn(4, 64),), {})]))
    with pytest.raises(ValueError, match="whole model"):
        streamable_scheme("gptaq-int4-64")
