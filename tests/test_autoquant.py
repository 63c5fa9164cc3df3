"""autoquant: fastest candidate within the error budget, per layer; a report of what it measured."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama, rel_err

import qcal
from qcal.quantize import quantized_modules

CANDS = ("int8wo", "int4wo-32", "int8dq", "8da4w-32")


def test_zero_budget_keeps_every_layer_float():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    report = qcal.autoquant(model, ids, max_rel_error=0.0, candidates=CANDS, rounds=2)
    assert len(report) == 2 * 7 + 1
    assert all(r.chosen == "none" for r in report)
    assert not list(quantized_modules(model))


def test_choice_is_fastest_within_budget():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4))
    ref = model(ids).logits
    budget = 0.03
    report = qcal.autoquant(model, ids, max_rel_error=budget, candidates=CANDS, rounds=3)
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
                            rounds=2)
    assert set(report[0].times) == {"none", "int8wo"}
