"""``torch.compile(fullgraph=True)`` on frozen models: no graph breaks, same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_reference, make_tiny_llama, rel_err

from qcal.schemes import apply_scheme


@pytest.mark.parametrize("scheme", ["int4wo-32", "int8wo", "int8dq", "8da4w-32"])
def test_frozen_tiny_llama_has_no_graph_breaks(scheme):
    model = apply_scheme(make_tiny_llama(), scheme, quantize_lm_head=True)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_matches_eager_decode_and_prefill():
    model = apply_scheme(make_tiny_llama(), "int4wo-32", quantize_lm_head=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for m in (1, 80):  # small-M (tinygemm) and large-M (dequant + mm) paths
            ids = torch.randint(0, 256, (1, m))
            assert rel_err(compiled(ids).logits, model(ids).logits) < 1e-3


def test_static_cache_generator_matches_dynamic_cache_greedy():
    from qcal.runtime import StaticCacheGenerator

    model = apply_scheme(make_tiny_llama(), "int4wo-32", quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = greedy_reference(model, prompt, 6)  # dynamic-cache greedy decoding, eager
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    gen = StaticCacheGenerator(model, max_cache_len=20, backend="eager")
    for _ in range(2):  # the cache is reset between runs
        assert torch.equal(gen.generate(prompt, 6), ref)
    assert counters["stats"]["unique_graphs"] == 2  # one prefill graph, one decode graph: no per-step recompiles
    assert model.config._attn_implementation == "sdpa"  # switched for the generator's calls only
    prefill_s, decode_s = gen.time_generation(prompt, 6)
    assert prefill_s > 0 and decode_s > 0
    with pytest.raises(ValueError, match="max_cache_len"):
        gen.time_generation(prompt, 9)
