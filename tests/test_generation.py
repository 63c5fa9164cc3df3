"""qcal.generation.LeanGenerator and its native elementwise kernels, against Hugging Face's bf16 modeling code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_reference, make_tiny_llama, rel_err

from qcal.generation import LeanGenerator, unsupported_reason
from qcal.kernels import native
from qcal.kernels.attention import set_attention
from qcal.schemes import apply_scheme

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels {native.native_status()}")


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
    got = native.add_rmsnorm(got_x, norm.weight.data, 1e-5, delta)
    assert torch.equal(got_x, ref_x)
    assert rel_err(got, ref) < 2e-3 and (got != ref).float().mean() < 0.02  # fp32 sum order: rare 1-ulp ties
    plain = native.add_rmsnorm(x.clone(), norm.weight.data, 1e-5)
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
    native.rope_store(src, cache[:, 4:4 + m].transpose(0, 1), cos, sin)
    assert torch.equal(cache[:, 4:4 + m].transpose(0, 1), ref)
    assert torch.isnan(cache[:, :4].float()).all() and torch.isnan(cache[:, 4 + m:].float()).all()
    inplace = src.clone()
    native.rope_store(inplace, inplace, cos, sin)
    assert torch.equal(inplace, ref)
    native.rope_store(src, cache[:, :m].transpose(0, 1), None, None)  # plain copy (the value cache)
    assert torch.equal(cache[:, :m].transpose(0, 1), src)


@needs_native
def test_silu_mul_is_llama_mlp_activation():
    gate, up = _bf16(2, 1536, seed=1, scale=4.0), _bf16(2, 1536, seed=2)
    gate[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.0])
    ref = F.silu(gate) * up
    got = native.silu_mul(gate.clone(), up)
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
    got = native.prefill_attention(q, k, v, start, d ** -0.5)
    assert got.shape == q.shape and rel_err(got, ref) < 5e-3  # bf16 probabilities and output (observed ~2e-3)


@needs_native
def test_elementwise_kernels_reject_bad_arguments():
    x = _bf16(2, 64)
    with pytest.raises(TypeError, match="add_rmsnorm: x"):
        native.add_rmsnorm(x.float(), x[0], 1e-5)
    with pytest.raises(ValueError, match="add_rmsnorm: shapes"):
        native.add_rmsnorm(x, x[0, :32].contiguous(), 1e-5)
    with pytest.raises(ValueError, match="rope_store"):
        native.rope_store(x.view(2, 1, 64), torch.empty(2, 1, 32, dtype=torch.bfloat16), x, x)
    with pytest.raises(ValueError, match="silu_mul"):
        native.silu_mul(x, x[:1].contiguous())
    with pytest.raises(ValueError, match="prefill_attention"):
        native.prefill_attention(x.view(2, 4, 16), x.view(2, 4, 16)[:, :1], x.view(2, 4, 16)[:, :1], 5, 0.25)


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
    with torch.no_grad():
        assert rel_err(gen.forward(ids), model(ids).logits[:, -1]) < 2e-2  # prefill: qcal's flash kernel vs SDPA
        for step in range(3):
            nxt = torch.tensor([[7 + step]])
            ids = torch.cat([ids, nxt], dim=1)
            assert rel_err(gen.forward(nxt), model(ids).logits[:, -1]) < 2e-2
    assert gen.length == 23


@needs_native
def test_chunked_prefill_continues_the_cache():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    gen = LeanGenerator(model, 32)
    whole = gen.forward(ids)
    gen.reset()
    gen.forward(ids[:, :10])
    assert rel_err(gen.forward(ids[:, 10:]), whole) < 2e-2


@needs_native
@pytest.mark.parametrize("scheme", ["bf16", "int4wo-64", "8da4w-64", "int8dq", "int8wo"])
def test_greedy_decoding_follows_hugging_face(scheme):
    """Teacher-forced along Hugging Face's greedy tokens: every step's logits agree to bf16 rounding, and the
    generator picks the same token wherever Hugging Face's choice is not a near tie."""
    model = apply_scheme(make_tiny_llama(hidden=128, tie=False), scheme, quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = greedy_reference(_hf(model), prompt, 12)
    gen = LeanGenerator(model, 24)
    decided = 0
    with torch.no_grad():
        logits = gen.forward(prompt)
        for t in range(12):
            want = model(torch.cat([prompt, ref[:, :t]], dim=1)).logits[:, -1]
            assert rel_err(logits, want) < 2e-2
            top2 = want.float().topk(2).values[0]
            if top2[0] - top2[1] > 0.02 * want.float().abs().max():
                assert logits.argmax(-1).item() == ref[0, t].item()
                decided += 1
            logits = gen.forward(ref[:, t:t + 1])
    assert decided >= 8


@needs_native
def test_time_generation_and_cache_bounds():
    model = make_tiny_llama(hidden=64).to(torch.bfloat16)
    gen = LeanGenerator(model, 16)
    prefill, decode = gen.time_generation(torch.zeros(1, 8, dtype=torch.long), 8)
    assert prefill > 0 and decode > 0 and gen.length == 16
    with pytest.raises(ValueError, match="max_cache_len=16"):
        gen.time_generation(torch.zeros(1, 9, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="exceed max_cache_len"):
        gen.forward(torch.zeros(1, 1, dtype=torch.long))


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
    if native.available():
        assert "bf16" in unsupported_reason(fp32)
        with pytest.raises(ValueError, match="not supported: the model is not in bf16"):
            LeanGenerator(fp32, 8)
    else:
        assert "native" in unsupported_reason(fp32)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).to(torch.bfloat16)
    assert unsupported_reason(gpt2) is not None


@needs_native
def test_choose_runtime_uses_one_runtime_for_every_model():
    from qcal.eval.runner import EvalConfig, RuntimeUnavailableError, _speed_runner, choose_runtime

    bf16 = make_tiny_llama(hidden=64).to(torch.bfloat16)
    fp32 = make_tiny_llama(hidden=64)
    assert choose_runtime([bf16], EvalConfig(runtime="auto")) == "lean"
    assert choose_runtime([bf16, fp32], EvalConfig(runtime="auto")) == "hf"
    assert choose_runtime([bf16], EvalConfig(runtime="auto", compile=True)) == "hf"
    assert choose_runtime([bf16], EvalConfig(runtime="hf")) == "hf"
    with pytest.raises(RuntimeUnavailableError, match="not in bf16"):
        choose_runtime([bf16, fp32], EvalConfig(runtime="lean"))
    gen = _speed_runner(bf16, EvalConfig(prefill_len=8, new_tokens=4), "lean")
    assert isinstance(gen, LeanGenerator) and gen.max_cache_len == 12
