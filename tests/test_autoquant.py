"""autoquant: fastest candidate within the error budget, per layer; a report of what it measured."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import make_tiny_llama, rel_err

import qcal
from qcal.quantize import quantized_modules

aq = importlib.import_module("qcal.autoquant")  # the module (``qcal.autoquant`` is also the function's name)

CANDS = ("int8wo", "int4wo-32", "int8dq", "8da4w-32")


def test_zero_budget_keeps_every_layer_float():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    assert qcal.autoquant(model, ids, max_rel_error=0.0, candidates=CANDS, rounds=2) is model
    report = model.autoquant_report
    assert len(report) == 2 * 7 + 1
    assert all(r.chosen == "none" for r in report)
    assert not list(quantized_modules(model))


def test_choice_is_fastest_within_budget():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    ref = model(ids).logits
    budget = 0.03
    report = qcal.autoquant(model, ids, max_rel_error=budget, candidates=CANDS, rounds=3).autoquant_report
    qmods = dict(quantized_modules(model))
    for r in report:
        assert set(r.times) == {"none", *CANDS} and r.errors["none"] == 0.0
        assert r.rows == 4 and r.errors[r.chosen] <= budget
        eligible = [c for c in r.times if r.errors[c] <= budget]
        assert r.times[r.chosen] == min(r.times[c] for c in eligible)
        assert 0 < r.errors["int8wo"] < r.errors["int4wo-32"]  # 8-bit weights are more accurate than 4-bit
        if r.chosen != "none":
            assert qmods[r.name].frozen and qmods[r.name].kernel.name != "reference"
    assert rel_err(model(ids).logits, ref) < 0.1


def test_candidates_that_do_not_fit_are_skipped():
    model = torch.nn.Sequential(torch.nn.Linear(48, 32))  # 48 % 32 != 0: int4wo-32 cannot be built
    report = qcal.autoquant(model, torch.randn(2, 48), max_rel_error=1.0, candidates=("int4wo-32", "int8wo"),
                            rounds=2).autoquant_report
    assert set(report[0].times) == {"none", "int8wo"}


@pytest.fixture
def empty_cache():
    saved = dict(aq.AUTOQUANT_CACHE)
    aq.AUTOQUANT_CACHE.clear()
    yield aq.AUTOQUANT_CACHE
    aq.AUTOQUANT_CACHE.clear()
    aq.AUTOQUANT_CACHE.update(saved)


def _same_choices(a, b):
    return [(r.name, r.chosen) for r in a] == [(r.name, r.chosen) for r in b]


def _quantized_is_faster(fns, rounds, **kwargs):
    return {c: 1.0 if c == "none" else 0.5 for c in fns}


def test_first_forward_is_measured_then_swapped_like_torchao(empty_cache, monkeypatch):
    monkeypatch.setattr(aq, "fastest_round", _quantized_is_faster)
    torch.manual_seed(0)
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    ref = model(ids).logits
    out = qcal.autoquant(model, max_rel_error=0.05, candidates=("int8wo",), rounds=1)
    assert out is model and not list(quantized_modules(model)) and callable(model.finalize_autoquant)
    first = model(ids).logits  # measured on the way, computed in float
    assert torch.equal(first, ref)
    assert "finalize_autoquant" not in model.__dict__ and len(model.autoquant_report) == 2 * 7 + 1
    chosen = {r.name for r in model.autoquant_report if r.chosen != "none"}
    assert chosen and chosen == {n for n, _ in quantized_modules(model)}
    assert rel_err(model(ids).logits, ref) < 0.05


def test_manual_weighs_every_input_shape_by_its_calls(empty_cache):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    qcal.autoquant(model, candidates=("int8wo",), manual=True, rounds=1)
    for n in (1, 1, 1, 8):
        model(torch.randn(n, 64))
    report = model.finalize_autoquant()
    (r,) = report
    assert r.calls == {(1, 64): 3, (8, 64): 1}
    w = (64, 64)
    for c in ("none", "int8wo"):
        per_call = [empty_cache[(c, w, (n, 64), "torch.float32", "cpu")] for n in (1, 8)]
        assert r.times[c] == pytest.approx((3 * per_call[0] + per_call[1]) / 4)


def test_unseen_layers_raise_and_leave_the_model_recording(empty_cache, monkeypatch):
    monkeypatch.setattr(aq, "fastest_round", _quantized_is_faster)
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = Two()
    qcal.autoquant(model, torch.randn(2, 32), candidates=("int8wo",), manual=True, rounds=1)
    with pytest.raises(RuntimeError, match="1 linear layers saw no input .*b"):
        model.finalize_autoquant()
    assert type(model.a) is torch.nn.Linear and type(model.b) is torch.nn.Linear
    model(torch.randn(2, 32), use_b=True)  # still recording
    assert {r.name for r in model.finalize_autoquant()} == {"a", "b"}

    other = Two()
    qcal.autoquant(other, torch.randn(2, 32), max_rel_error=1.0, candidates=("int8wo",), error_on_unseen=False,
                   rounds=1)
    assert [r.name for r in other.autoquant_report] == ["a"]
    assert type(other.b) is torch.nn.Linear and type(other.a) is not torch.nn.Linear


def test_cache_saved_and_loaded_skips_the_timing(empty_cache, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    first = qcal.autoquant(make_tiny_llama(), ids, candidates=CANDS, rounds=1).autoquant_report
    path = tmp_path / "plan.json"
    aq.save_autoquant_cache(path)
    saved = dict(empty_cache)
    empty_cache.clear()
    assert aq.load_autoquant_cache(path) == len(saved) and empty_cache == saved

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although every shape is cached")

    monkeypatch.setattr(aq, "fastest_round", no_timing)
    again = qcal.autoquant(model, ids, candidates=CANDS, rounds=1).autoquant_report
    assert _same_choices(first, again)


def test_bad_cache_files_and_arguments_are_refused(empty_cache, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"scheme": "int8wo", "weight": [4, 4], "input": [1, 4], "dtype": "torch.float32",
                                "device": "cpu", "seconds": 1e-5}, {"scheme": "int8wo", "seconds": -1}]))
    with pytest.raises(ValueError, match="entry 1"):
        aq.load_autoquant_cache(bad)
    assert not empty_cache  # nothing added from a file that failed
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        aq.load_autoquant_cache(bad)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="unknown scheme 'int3wo'"):
        qcal.autoquant(model, torch.randn(1, 8), candidates=("int3wo",))
    with pytest.raises(ValueError, match="max_rel_error"):
        qcal.autoquant(model, torch.randn(1, 8), max_rel_error=-1)
    assert not model[0]._forward_pre_hooks and "finalize_autoquant" not in model.__dict__


def test_compiled_model_is_quantized_inside_its_wrapper(empty_cache, monkeypatch):
    monkeypatch.setattr(aq, "fastest_round", _quantized_is_faster)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    x = torch.randn(4, 64)
    ref = model(x)
    compiled = torch.compile(model, backend="eager")
    assert qcal.autoquant(compiled, max_rel_error=0.05, candidates=("int8wo",), rounds=1) is compiled
    assert torch.allclose(compiled(x), ref, atol=1e-6)
    assert [r.chosen for r in model.autoquant_report] == ["int8wo", "int8wo"]
    assert {n for n, _ in quantized_modules(model)} == {"0", "2"}
    assert rel_err(compiled(x), ref) < 0.05
