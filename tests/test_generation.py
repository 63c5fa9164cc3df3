"""qcal.runtime.LeanGenerator and its native elementwise kernels, against Hugging Face's bf16 modeling code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_reference, make_tiny_llama, rel_err

from qcal.kernels import native
from qcal.runtime import LeanGenerator, TokenGenerator, ops, set_attention, unsupported_reason
from qcal.schemes import apply_scheme

needs_native = pytest.mark.usefixtures("runtime_kernels")


def _bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


# ---------------------------------------------------------------- the elementwise kernels, bit for bit


@needs_native
@pytest.mark.parametrize("n", [576, 64, 100])
def test_add_rmsnorm_is_llama_rmsnorm_after_the_residual_add(n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, delta = _bf16(3, n, seed=1), _bf16(3, n, seed=2)
    norm = LlamaRMSNorm(n, eps=1e-5)
    norm.weight.data = _bf16(n, seed=3)
    ref_x = x + delta
    ref = norm(ref_x)
    got_x = x.clone()
    got = ops.add_rmsnorm(got_x, norm.weight.data, 1e-5, delta)
    assert torch.equal(got_x, ref_x)
    assert rel_err(got, ref) < 2e-3 and (got != ref).float().mean() < 0.02  # fp32 sum order: rare 1-ulp ties
    plain = ops.add_rmsnorm(x.clone(), norm.weight.data, 1e-5)
    assert rel_err(plain, norm(x)) < 2e-3


@needs_native
@pytest.mark.parametrize("d", [64, 48, 40, 128])
def test_rope_store_is_apply_rotary_pos_emb_into_a_strided_cache(d):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, heads = 3, 5
    src, cos, sin = _bf16(m, heads, d, seed=1), _bf16(m, d, seed=2), _bf16(m, d, seed=3)
    ref, _ = apply_rotary_pos_emb(src.transpose(0, 1).unsqueeze(0), src.transpose(0, 1).unsqueeze(0),
                                  cos.unsqueeze(0), sin.unsqueeze(0))
    ref = ref[0].transpose(0, 1)  # (m, heads, d)
    cache = torch.full((heads, 10, d), float("nan"), dtype=torch.bfloat16)  # (heads, positions, d), like the KV cache
    ops.rope_store(src, cache[:, 4:4 + m].transpose(0, 1), cos, sin)
    assert torch.equal(cache[:, 4:4 + m].transpose(0, 1), ref)
    assert torch.isnan(cache[:, :4].float()).all() and torch.isnan(cache[:, 4 + m:].float()).all()
    inplace = src.clone()
    ops.rope_store(inplace, inplace, cos, sin)
    assert torch.equal(inplace, ref)
    ops.rope_store(src, cache[:, :m].transpose(0, 1), None, None)  # plain copy (the value cache)
    assert torch.equal(cache[:, :m].transpose(0, 1), src)


@needs_native
def test_silu_mul_is_llama_mlp_activation():
    gate, up = _bf16(2, 1536, seed=1, scale=4.0), _bf16(2, 1536, seed=2)
    gate[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.0])
    ref = F.silu(gate) * up
    got = ops.silu_mul(gate.clone(), up)
    assert (got != ref).sum() <= 2 and rel_err(got, ref) < 1e-3  # exp to ~2e-7: a rare rounding tie may differ


@needs_native
@pytest.mark.parametrize("n,heads,kv_heads,d,start", [(512, 9, 3, 64, 0), (5, 4, 2, 32, 0), (70, 8, 8, 128, 13),
                                                      (1, 9, 3, 64, 40), (33, 16, 1, 16, 100)])
def test_prefill_attention_matches_fp32_causal_sdpa(n, heads, kv_heads, d, start):
    q = _bf16(n, heads, d, seed=1)
    k, v = _bf16(kv_heads, start + n + 7, d, seed=2), _bf16(kv_heads, start + n + 7, d, seed=3)  # a longer cache
    k[:, start + n:] = float("nan")  # positions past the last query are never read
    end = start + n
    mask = torch.ones(n, end, dtype=torch.bool).tril(diagonal=start)
    ref = F.scaled_dot_product_attention(q.float().transpose(0, 1), k[:, :end].float(), v[:, :end].float(),
                                         attn_mask=mask, scale=d ** -0.5, enable_gqa=True).transpose(0, 1)
    got = ops.prefill_attention(q, k, v, start, d ** -0.5)
    assert got.shape == q.shape and rel_err(got, ref) < 5e-3  # bf16 probabilities and output (observed ~2e-3)


@needs_native
@pytest.mark.parametrize("hq,hkv,d,pos", [(9, 3, 64, 0), (9, 3, 64, 37), (4, 4, 32, 5), (8, 2, 128, 200)])
def test_decode_step_attention_is_rope_stores_and_decode_attention(hq, hkv, d, pos):
    """The fused decode step: bit for bit rope_store (query, key into the cache, value copy) + decode_attention."""
    length = 256
    q, k, v = _bf16(1, hq * d, seed=1), _bf16(1, hkv * d, seed=2), _bf16(1, hkv * d, seed=3)
    cos, sin = _bf16(length, d, seed=4), _bf16(length, d, seed=5)
    kc, vc = _bf16(hkv, length, d, seed=6), _bf16(hkv, length, d, seed=7)
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    out = torch.ops.qcal.decode_step_attention(q, k, v, kc, vc, pos, cos, sin, d ** -0.5)
    qh = q2.view(1, hq, d)
    ops.rope_store(qh, qh, cos[pos:pos + 1], sin[pos:pos + 1])
    ops.rope_store(k.view(1, hkv, d), kc2.transpose(0, 1)[pos:pos + 1], cos[pos:pos + 1], sin[pos:pos + 1])
    ops.rope_store(v.view(1, hkv, d), vc2.transpose(0, 1)[pos:pos + 1], None, None)
    ref = ops.decode_attention(q2.view(1, hq, 1, d), kc2[None, :, :pos + 1], vc2[None, :, :pos + 1], None, d ** -0.5)
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)  # cache rows beyond pos untouched
    assert out.shape == (1, hq * d) and torch.equal(out, ref.view(1, hq * d))


@needs_native
def test_decode_step_attention_refuses_bad_arguments():
    q, k, cos = _bf16(1, 9 * 64), _bf16(1, 3 * 64), _bf16(16, 64)
    kc = torch.zeros(3, 16, 64, dtype=torch.bfloat16)
    step = torch.ops.qcal.decode_step_attention
    with pytest.raises(ValueError, match="pos 16 is outside"):
        step(q, k, k, kc, kc.clone(), 16, cos, cos, 0.1)
    with pytest.raises(ValueError, match="k must be"):
        step(q, k[:, :96].contiguous(), k, kc, kc.clone(), 0, cos, cos, 0.1)
    with pytest.raises(ValueError, match="q must be"):
        step(q[:, :100].contiguous(), k, k, kc, kc.clone(), 0, cos, cos, 0.1)
    with pytest.raises(ValueError, match="cos and sin"):
        step(q, k, k, kc, kc.clone(), 3, cos[:3].contiguous(), cos[:3].contiguous(), 0.1)
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        step(q, k, k, kc, kc[:, :8].contiguous(), 0, cos, cos, 0.1)
    with pytest.raises(TypeError, match="bf16 CPU"):
        step(q.float(), k, k, kc, kc.clone(), 0, cos, cos, 0.1)


@needs_native
def test_elementwise_kernels_reject_bad_arguments():
    x = _bf16(2, 64)
    with pytest.raises(TypeError, match="add_rmsnorm: x"):
        ops.add_rmsnorm(x.float(), x[0], 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: weight must be"):
        ops.add_rmsnorm(x, x[0, :32].contiguous(), 1e-5)
    with pytest.raises(ValueError, match="rope_store"):
        ops.rope_store(x.view(2, 1, 64), torch.empty(2, 1, 32, dtype=torch.bfloat16), x, x)
    with pytest.raises(ValueError, match="silu_mul"):
        ops.silu_mul(x, x[:1].contiguous())
    with pytest.raises(ValueError, match="prefill_attention"):
        ops.prefill_attention(x.view(2, 4, 16), x.view(2, 4, 16)[:, :1], x.view(2, 4, 16)[:, :1], 5, 0.25)


# ---------------------------------------------------------------- the generator against Hugging Face


def _hf(model):
    """The Hugging Face reference: same model, qcal's decode-attention kernel (the generator's), SDPA prefill (the
    generator's prefill attention is qcal's own kernel: logits agree to bf16 rounding, tokens exactly here)."""
    return set_attention(model, "qcal")


@needs_native
def test_logits_match_hugging_face_bf16_prefill_and_decode():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    _hf(model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    gen = LeanGenerator(model, 32)
    assert isinstance(gen, TokenGenerator)
    with torch.no_grad():
        assert rel_err(gen.prefill(ids), model(ids).logits[:, -1]) < 2e-2  # prefill: qcal's flash kernel vs SDPA
        for step in range(3):
            nxt = torch.tensor([[7 + step]])
            ids = torch.cat([ids, nxt], dim=1)
            assert rel_err(gen.decode(nxt), model(ids).logits[:, -1]) < 2e-2
    assert gen.length == 23


@needs_native
def test_chunked_prefill_continues_the_cache():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    gen = LeanGenerator(model, 32)
    whole = gen.prefill(ids)
    gen.reset()
    gen.prefill(ids[:, :10])
    assert rel_err(gen.prefill(ids[:, 10:]), whole) < 2e-2


@needs_native
def test_lean_runtime_runs_fp8_dynamic_activations():
    """fp8 activations (3 mantissa bits: relative steps of 6%) turn the two runtimes' last-bit differences into a
    few percent of the logits, so only closeness is asked here."""
    model = apply_scheme(make_tiny_llama(hidden=128, tie=False), "fp8dq", quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    gen = LeanGenerator(model, 24)
    with torch.no_grad():
        logits = gen.prefill(prompt)
        assert logits.dtype == torch.bfloat16 and rel_err(logits, model(prompt).logits[:, -1]) < 6e-2
        for _ in range(4):
            logits = gen.decode(logits.argmax(-1, keepdim=True))
            assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@needs_native
@pytest.mark.parametrize("scheme", ["bf16", "int4wo-64", "8da4w-64", "int8dq", "int8wo", "fp8wo", "fp6wo", "fp4wo-32"])
def test_greedy_decoding_follows_hugging_face(scheme):
    """Teacher-forced along Hugging Face's greedy tokens: every step's logits agree to bf16 rounding, and the
    generator picks the same token wherever Hugging Face's choice is not a near tie."""
    tol = 2e-2
    model = apply_scheme(make_tiny_llama(hidden=128, tie=False), scheme, quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = greedy_reference(_hf(model), prompt, 12)
    gen = LeanGenerator(model, 24)
    decided = 0
    with torch.no_grad():
        logits = gen.prefill(prompt)
        for t in range(12):
            want = model(torch.cat([prompt, ref[:, :t]], dim=1)).logits[:, -1]
            assert rel_err(logits, want) < tol
            top2 = want.float().topk(2).values[0]
            if top2[0] - top2[1] > 0.02 * want.float().abs().max():
                assert logits.argmax(-1).item() == ref[0, t].item()
                decided += 1
            logits = gen.decode(ref[:, t:t + 1])
    assert decided >= 8


@needs_native
@pytest.mark.parametrize("scheme", ["bf16", "int4wo-64", "8da4w-64", "int8dq", "int8wo", "fp8wo", "fp6wo"])
def test_native_decode_step_is_the_python_loop_bit_for_bit(scheme):
    """qcal::decode_layers (the decode step's layer loop in one call) against the same loop in Python: the same
    logits and caches, bit for bit; it runs wherever every projection is one qcal operator."""
    model = apply_scheme(make_tiny_llama(hidden=128, layers=3, tie=False), scheme, quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    step, loop = LeanGenerator(model, 24), LeanGenerator(model, 24, native_step=False)
    assert loop.step_args is None
    if scheme in ("bf16", "int4wo-64", "8da4w-64", "int8dq", "int8wo") or native.available():
        assert step.step_args is not None and len(step.step_args[2]) == 7 * 3
    with torch.no_grad():
        assert torch.equal(step.prefill(prompt), loop.prefill(prompt))
        tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
        for t in range(8):
            a, b = step.decode(tokens[:, t:t + 1]), loop.decode(tokens[:, t:t + 1])
            assert torch.equal(a, b), f"step {t}: {(a.float() - b.float()).abs().max()}"
    assert torch.equal(step.k_cache, loop.k_cache) and torch.equal(step.v_cache, loop.v_cache)


@needs_native
@pytest.mark.parametrize("scheme", ["bf16", "int4wo-64", "gguf-q4_0", "int8wo", "8da4w-64", "int8dq"])
def test_prefill_runs_q_k_v_and_gate_up_as_one_call_bit_for_bit(scheme, monkeypatch):
    """Prefill's q / k / v and gate / up projections, each group one call of an operator for several weights where
    their kernel has one: the logits and caches of the projection-by-projection loop, bit for bit."""
    from qcal.kernels import common
    from qcal.runtime import lean

    model = apply_scheme(make_tiny_llama(hidden=128, layers=2, tie=False), scheme, quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    op = {"bf16": "w16a16_mm_panel_multi", "int8wo": "w8a16_mm_panel_multi", "8da4w-64": "w4a8_mm_multi",
          "int8dq": "w8a8_mm_small_multi"}.get(scheme, "w4a16_mm_panel_multi")
    fused = native.has(op) and (scheme != "bf16" or common._bf16_gemm_emulated())
    for group in (qkv, gate_up):
        assert (lean._multi(group, 40) is not None) == fused
        assert lean._multi(group, 4) is None  # decode-sized calls keep their small-M kernels
    one, apart = LeanGenerator(model, 48), LeanGenerator(model, 48)
    with torch.no_grad():
        a = one.prefill(prompt)
        monkeypatch.setattr(lean, "_multi", lambda mods, rows: None)
        b = apart.prefill(prompt)
    assert torch.equal(a, b)
    assert torch.equal(one.k_cache, apart.k_cache) and torch.equal(one.v_cache, apart.v_cache)
    monkeypatch.undo()
    calls = []
    attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
    assert lean._multi(qkv, 40) is None and lean._multi(gate_up, 40) is not None or not fused
    one.reset()
    with torch.no_grad():
        assert torch.equal(one.prefill(prompt), a) and calls == [1]  # the hooked module ran as a module


@needs_native
@pytest.mark.native_ops("decode_layers")
@pytest.mark.parametrize("scheme", ["bf16", "int4wo-64"])
def test_native_decode_step_is_the_one_thread_loop_whatever_the_threads(scheme):
    """The matmuls' threads take their own share of the units and then steal the rest (a share per thread asked
    for, a team of at most one thread a processor): with 2 and 5 threads asked for, the step's logits are the
    one-thread Python loop's bit for bit."""
    model = apply_scheme(make_tiny_llama(hidden=128, layers=2, tie=False), scheme, quantize_lm_head=True)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads, native_step in ((1, False), (2, True), (5, True)):
            torch.set_num_threads(threads)
            gen = LeanGenerator(model, 8, native_step=native_step)
            with torch.no_grad():
                outs.append([gen.prefill(tokens[:, :2])] + [gen.decode(tokens[:, t:t + 1]) for t in range(2, 6)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(o, outs[0], strict=True))


@needs_native
@pytest.mark.native_ops("decode_layers")
@pytest.mark.parametrize("threads", [2, 4])
def test_native_decode_step_team_is_the_kernels_own_regions_at_depth(threads):
    """After a 150-token prompt (decode attention split into slices of positions for 4 threads asked, the team at
    most one thread a processor): the step's logits with its one team of threads are those with every kernel
    opening its own OpenMP region, bit for bit."""
    model = apply_scheme(make_tiny_llama(hidden=128, layers=2, tie=False), "int4wo-64", quantize_lm_head=True)
    tokens = torch.randint(0, 256, (1, 154), generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    outs = []
    try:
        torch.set_num_threads(threads)
        for team in (True, False):
            gen = LeanGenerator(model, 160)
            assert gen._step is not None
            gen._step.set_team(team)
            with torch.no_grad():
                gen.prefill(tokens[:, :150])
                outs.append([gen.decode(tokens[:, t:t + 1]) for t in range(150, 154)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))


@needs_native
@pytest.mark.native_ops("decode_layers")
def test_native_decode_step_checks_its_arguments_before_touching_the_stream():
    model = apply_scheme(make_tiny_llama(hidden=128, layers=2, tie=False), "int4wo-64")
    gen = LeanGenerator(model, 8)
    assert gen.step_args is not None
    norms, eps, names, tensors, ints = gen.step_args
    x, h = _bf16(1, 128, seed=1), torch.zeros(1, 128, dtype=torch.bfloat16)

    def call(**change):
        a = {"norms": norms, "eps": eps, "ops": names, "tensors": tensors, "ints": ints, "x": x.clone(), "h": h,
             **change}
        before = a["x"].clone()
        try:
            return torch.ops.qcal.decode_layers(a["x"], a["h"], None, a["norms"], a["eps"], gen.k_cache, gen.v_cache,
                                                0, gen.cos, gen.sin, gen.scale, a["ops"], a["tensors"], a["ints"])
        finally:
            assert torch.equal(a["x"], before) or not change  # an error leaves the residual stream as it was

    out = call()
    assert out.shape == (1, 128) and out.dtype == torch.bfloat16
    bad = [({"ops": ["nope"] + names[1:]}, "no operator qcal::nope"),
           ({"ops": ["add_rmsnorm"] + names[1:]}, "is not a projection"),
           ({"ops": names[:-1]}, "take 14 projections, got 13"),
           ({"tensors": tensors[:-1]}, "tensors ends before"),
           ({"ints": ints + [3]}, "take .* ints, got"),
           ({"ints": [2] + ints[1:]}, "is a bool, got 2"),
           ({"norms": norms[:-1]}, "take 4 norm weights"),
           ({"norms": [norms[0].float()] + norms[1:]}, "norm weight"),
           ({"x": _bf16(2, 128)}, r"x must be a contiguous \(1, hidden\)"),
           ({"h": torch.zeros(1, 64, dtype=torch.bfloat16)}, "h")]
    for change, message in bad:
        with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
            call(**change)


@needs_native
@pytest.mark.native_ops("decode_layers")
def test_native_decode_step_checks_bound_projections_when_planned():
    """Projections whose kernels the step binds (bound.h) have their arguments checked as their operators check
    them, and their shapes chained, when the step is planned; the step's result is not a buffer the next run
    writes."""
    model = apply_scheme(make_tiny_llama(hidden=128, layers=3, tie=False), "8da4w-64")
    gen = LeanGenerator(model, 8)
    norms, eps, names, tensors, ints = gen.step_args
    step = torch.classes.qcal.DecodeStep
    broken = list(tensors)
    per_layer = len(tensors) // 3
    broken[per_layer + 1] = broken[per_layer + 1][:1]  # layer 1's q_proj scales: wrong shape
    with pytest.raises(ValueError, match=r"qcal::w4a8_mm: sz must be a contiguous \[8, 2, 1, 16\]"):
        step(norms, eps, gen.k_cache, gen.v_cache, gen.cos, gen.sin, gen.scale, names, broken, ints)
    model = make_tiny_llama(hidden=128, layers=3, tie=False).to(torch.bfloat16)
    gen = LeanGenerator(model, 8)
    norms, eps, names, tensors, ints = gen.step_args
    assert names[:7] == ["w16a16_mm_small"] * 7 and len(tensors) == 21
    swapped = list(tensors)
    swapped[10] = tensors[11]  # layer 1's o projection given the gate's weight: (128 -> 256)
    with pytest.raises(ValueError, match=r"layer 1's o projection \(qcal::w16a16_mm_small\) is \(128 -> 256\), "
                                         r"expected \(128 -> 128\)"):
        step(norms, eps, gen.k_cache, gen.v_cache, gen.cos, gen.sin, gen.scale, names, swapped, ints)
    x, h = _bf16(1, 128, seed=1), torch.zeros(1, 128, dtype=torch.bfloat16)
    first = gen._step.run(x.clone(), h, None, 0)
    kept = first.clone()
    second = gen._step.run(_bf16(1, 128, seed=2), h, None, 1)
    assert torch.equal(first, kept) and not torch.equal(first, second)


@needs_native
@pytest.mark.native_ops("decode_layers")
def test_native_decode_step_recovers_from_an_error_inside_a_layer():
    """A projection that fails after the step has started (an operator called through the dispatcher refusing its
    input, layer 2 of 3) raises the operator's message; the threads are released and the next step runs (serial
    and with two threads)."""
    model = make_tiny_llama(hidden=128, layers=3, tie=False).to(torch.bfloat16)
    gen = LeanGenerator(model, 8)
    norms, eps, names, tensors, ints = gen.step_args
    broken = list(names)
    broken[7] = "dequant_w8"  # layer 1's q projection: one tensor argument as before, but h is not int8 codes
    bad = torch.classes.qcal.DecodeStep(norms, eps, gen.k_cache, gen.v_cache, gen.cos, gen.sin, gen.scale, broken,
                                        tensors, ints)
    good = gen._step
    x, h = _bf16(1, 128, seed=1), torch.zeros(1, 128, dtype=torch.bfloat16)
    for threads in (2, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with pytest.raises((RuntimeError, ValueError, TypeError), match="qcal::dequant_w8"):
                bad.run(x.clone(), h, None, 0)
            ref = good.run(x.clone(), h, None, 0)
            assert torch.equal(good.run(x.clone(), h, None, 0), ref)
        finally:
            torch.set_num_threads(before)
    on = good.set_team(False)
    assert on is True and torch.equal(good.run(x.clone(), h, None, 0), ref)  # the team changes no number
    good.set_team(True)


@needs_native
def test_time_generation_and_cache_bounds():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    gen = LeanGenerator(model, 16)
    prefill, decode = gen.time_generation(torch.zeros(1, 8, dtype=torch.long), 8)
    assert prefill > 0 and decode > 0 and gen.length == 16
    with pytest.raises(ValueError, match="max_cache_len=16"):
        gen.time_generation(torch.zeros(1, 9, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="exceed max_cache_len"):
        gen.decode(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decode: token must be \(1, 1\)"):
        gen.decode(torch.zeros(1, 2, dtype=torch.long))


@needs_native
def test_hooks_are_kept_and_rebound_modules_are_seen():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: calls.append(1))
    gen = LeanGenerator(model, 16)
    gen.generate(torch.zeros(1, 4, dtype=torch.long), 3)
    assert len(calls) == 4  # the prefill and the three decode steps ran the hooked module
    proj = model.model.layers[1].self_attn.o_proj
    proj.weight = torch.nn.Parameter(torch.zeros_like(proj.weight))  # replaced: a new generation sees it
    out = gen.generate(torch.zeros(1, 4, dtype=torch.long), 3)
    assert torch.equal(out, greedy_reference(_hf(model), torch.zeros(1, 4, dtype=torch.long), 3))


def test_unsupported_models_are_refused_with_the_reason():
    fp32 = make_tiny_llama(hidden=64)
    if ops.available():
        assert "bf16" in unsupported_reason(fp32)
        with pytest.raises(ValueError, match="not supported: the model is not in bf16"):
            LeanGenerator(fp32, 8)
    else:
        assert "native" in unsupported_reason(fp32)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).to(torch.bfloat16)
    assert unsupported_reason(gpt2) is not None


@needs_native
def test_resolve_runtime_uses_one_runtime_and_attention_for_every_model():
    from qcal.eval.runner import EvalConfig, RuntimeUnavailableError, resolve_runtime, speed_runner

    bf16 = make_tiny_llama(hidden=64).to(torch.bfloat16)
    fp32 = make_tiny_llama(hidden=64)
    assert resolve_runtime(EvalConfig(), [bf16]) == ("lean", "qcal")  # the default run
    assert resolve_runtime(EvalConfig(attention="qcal"), [bf16]) == ("lean", "qcal")
    assert resolve_runtime(EvalConfig(), [bf16, fp32]) == ("hf", "qcal")
    assert resolve_runtime(EvalConfig(attention="sdpa"), [bf16]) == ("hf", "sdpa")  # lean runs qcal's attention only
    assert resolve_runtime(EvalConfig(attention="model"), [bf16]) == ("hf", None)
    assert resolve_runtime(EvalConfig(attention=None), [bf16]) == ("hf", None)
    assert resolve_runtime(EvalConfig(runtime="hf"), [bf16]) == ("hf", "qcal")
    assert resolve_runtime(EvalConfig(compile=True), [bf16]) == ("compiled", "qcal")
    assert resolve_runtime(EvalConfig(compile=True, attention="model"), [bf16]) == ("compiled", None)
    assert resolve_runtime(EvalConfig(runtime="hf", compile=True, attention="sdpa"), [bf16]) == ("compiled", "sdpa")
    with pytest.raises(RuntimeUnavailableError, match="not in bf16"):
        resolve_runtime(EvalConfig(runtime="lean"), [bf16, fp32])
    with pytest.raises(RuntimeUnavailableError, match="not attention 'eager'"):
        resolve_runtime(EvalConfig(runtime="lean", attention="eager"), [bf16])
    with pytest.raises(RuntimeUnavailableError, match="compile"):
        resolve_runtime(EvalConfig(runtime="lean", compile=True), [bf16])
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        resolve_runtime(EvalConfig(attention="flash"), [bf16])
    with pytest.raises(ValueError, match="unknown runtime 'fast'"):
        resolve_runtime(EvalConfig(runtime="fast"), [bf16])
    gen = speed_runner(bf16, "lean", "qcal", 12)
    assert isinstance(gen, LeanGenerator) and gen.max_cache_len == 12 and gen.kv_bits is None
    if ops.has_kv():
        assert speed_runner(bf16, "lean", "qcal", 12, kv_bits=8).kv_bits == 8  # --kv-cache int8: decode with it
        assert resolve_runtime(EvalConfig(kv_cache="int8"), [bf16]) == ("lean", "qcal")
    else:  # a library without the quantized cache's operators: the model's own generate with qcal's cache
        assert resolve_runtime(EvalConfig(kv_cache="int8"), [bf16]) == ("hf", "qcal")
        with pytest.raises(ValueError, match="kv_bits=8 needs the quantized-cache operators"):
            LeanGenerator(bf16, 12, kv_bits=8)


def test_resolve_runtime_without_the_decode_kernel_on_the_device():
    from qcal.eval.runner import EvalConfig, resolve_runtime

    meta = make_tiny_llama(hidden=64).to("meta")  # a device the decode kernel does not run on (as a GPU)
    assert resolve_runtime(EvalConfig(), [meta]) == ("hf", None)  # auto: the model's own attention
    assert resolve_runtime(EvalConfig(compile=True), [meta]) == ("compiled", "eager")  # compiled: eager fuses best


# ---------------------------------------------------------------- which models qualify, by structure


def _tiny(config_cls, model_cls, **extra):
    cfg = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return model_cls(cfg).eval().to(torch.bfloat16)


@needs_native
def test_qwen2_runs_and_follows_hugging_face():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _tiny(Qwen2Config, Qwen2ForCausalLM)  # q/k/v projections with biases, no sliding window
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert unsupported_reason(model) is None
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    ref = greedy_reference(_hf(model), prompt, 6)
    gen = LeanGenerator(model, 16)
    assert torch.equal(gen.generate(prompt, 6), ref)
    with torch.no_grad():
        gen.reset()
        assert rel_err(gen.prefill(prompt), model(prompt).logits[:, -1]) < 2e-2


def test_extra_weights_in_a_layer_are_refused_with_the_module_named():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16)  # RMSNorms of q and k inside the attention
    assert unsupported_reason(qwen3) in (f"qcal native runtime operators unavailable (kernels "
                                         f"{native.native_status()})",
                                         "model.layers.0.self_attn.q_norm (Qwen3RMSNorm) holds weights the lean "
                                         "runtime does not apply")
    llama = make_tiny_llama(hidden=64).to(torch.bfloat16)
    llama.model.layers[1].pre_feedforward_layernorm = torch.nn.LayerNorm(64)  # as Gemma's extra norms
    if ops.available():
        with pytest.raises(ValueError, match=r"model.layers.1.pre_feedforward_layernorm \(LayerNorm\) holds weights"):
            LeanGenerator(llama, 8)


@needs_native
def test_structure_and_config_checks_name_what_is_missing():
    from transformers import MistralConfig, MistralForCausalLM

    def reason(edit):
        model = make_tiny_llama(hidden=64).to(torch.bfloat16)
        edit(model)
        return unsupported_reason(model)

    assert reason(lambda m: None) is None
    assert reason(lambda m: delattr(m.model.layers[0].mlp, "up_proj")) == "model.layers.0 lacks mlp.up_proj"
    assert reason(lambda m: setattr(m.model.layers[0].mlp, "act_fn", torch.nn.GELU())) == \
        "model.layers.0.mlp.act_fn is not a SiLU"
    assert reason(lambda m: setattr(m.config, "hidden_act", "gelu")) == "needs hidden_act='silu' and pretraining_tp=1"
    assert reason(lambda m: setattr(m.model.layers[1], "post_attention_layernorm", torch.nn.LayerNorm(64))) == \
        "model.layers.1.post_attention_layernorm (LayerNorm) is not an RMSNorm with a weight and variance_epsilon"
    assert reason(lambda m: setattr(m.model.layers[0].self_attn, "scaling", 0.5)) == \
        "model.layers.0.self_attn scales scores by 0.5, not head_dim ** -0.5"
    assert reason(lambda m: delattr(m.model, "rotary_emb")) == "model.model has no rotary_emb module"
    assert reason(lambda m: setattr(m.config, "residual_multiplier", 0.2)) == \
        "residual_multiplier=0.2 is not applied by the lean runtime"
    mistral = _tiny(MistralConfig, MistralForCausalLM, sliding_window=8)
    assert unsupported_reason(mistral) == "sliding-window attention is not supported"
    assert unsupported_reason(_tiny(MistralConfig, MistralForCausalLM, sliding_window=None)) is None


@needs_native
@pytest.mark.native_ops(*ops.KV_OPS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_cache_follows_hugging_face_with_the_same_cache(bits):
    """kv_bits: teacher-forced along Hugging Face's greedy tokens with qcal's QuantizedKVCache, every step's logits
    agree to bf16 rounding (the same stored codes; decode attention reads them in registers)."""
    from qcal.runtime.kv_cache import QuantizedKVCache

    model = _hf(make_tiny_llama(hidden=128, tie=False).to(torch.bfloat16))
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    gen = LeanGenerator(model, 24, kv_bits=bits)
    plain = LeanGenerator(model, 24)
    assert gen.cache_nbytes() <= plain.cache_nbytes() * (0.625 if bits == 8 else 0.5)
    cache = QuantizedKVCache(model.config, bits=bits)
    with torch.no_grad():
        got, want = gen.prefill(prompt), model(prompt, cache=cache, use_cache=True).logits[:, -1]
        assert rel_err(got, want) < 2e-2
        float_logits = plain.prefill(prompt)
        for t in range(steps.shape[1]):
            tok = steps[:, t:t + 1]
            got, want = gen.decode(tok), model(tok, cache=cache, use_cache=True).logits[:, -1]
            assert rel_err(got, want) < 2e-2
            float_logits = plain.decode(tok)
        assert 0 < rel_err(got, float_logits) < (0.05 if bits == 8 else 0.2)  # quantized, and close to float


@needs_native
@pytest.mark.native_ops(*ops.KV_OPS)
def test_quantized_kv_cache_arguments_are_checked():
    model = make_tiny_llama(hidden=128).to(torch.bfloat16)  # head_dim 32
    with pytest.raises(ValueError, match="kv_bits must be 8, 4 or None"):
        LeanGenerator(model, 8, kv_bits=2)
    with pytest.raises(ValueError, match="multiple of 16 dividing head_dim=32"):
        LeanGenerator(model, 8, kv_bits=4, kv_group_size=8)
    gen = LeanGenerator(model, 8, kv_bits=4, kv_group_size=None)  # one group a head
    assert gen.k_cache[1].shape[-1] == 1 and gen.generate(torch.zeros(1, 3, dtype=torch.long), 4).shape == (1, 4)
