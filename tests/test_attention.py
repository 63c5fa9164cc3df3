"""qcal's one-query decode attention: the kernel against fp32 SDPA, the fallbacks, and the Hugging Face wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_reference, make_tiny_llama, rel_err

from qcal.runtime import ops
from qcal.runtime.hf_attention import attention_forward, available, register, resolve, set_attention

needs_native = pytest.mark.usefixtures("runtime_kernels")
TOL = 5e-3  # fp32 accumulation, one bf16 rounding of the output (observed ~1.7e-3)


def _qkv(hq, hkv, length, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, 1, d, generator=g).to(torch.bfloat16)
    k = torch.randn(1, hkv, length, d, generator=g).to(torch.bfloat16)
    v = torch.randn(1, hkv, length, d, generator=g).to(torch.bfloat16)
    return q, k, v


def _reference(q, k, v, mask, scale):
    m = None if mask is None else mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hq,hkv,length,d", [(9, 3, 529, 64), (4, 4, 70, 32), (8, 2, 3000, 128), (12, 4, 1, 256),
                                             (16, 1, 200, 16)])
def test_kernel_matches_fp32_sdpa(hq, hkv, length, d, threads):
    q, k, v = _qkv(hq, hkv, length, d)
    mask = torch.rand(length, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[-1] = True
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in (None, mask):
            out = ops.decode_attention(q, k, v, m, d ** -0.5)
            assert out.shape == (1, 1, hq, d) and out.dtype == torch.bfloat16
            assert rel_err(out, _reference(q, k, v, m, d ** -0.5)) < TOL
    finally:
        torch.set_num_threads(saved)


@needs_native
def test_kernel_reads_strided_caches_and_ignores_masked_garbage():
    q, k, v = _qkv(6, 2, 40, 64)
    big_k = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    big_v = torch.zeros_like(big_k)
    big_k[:, :, :40], big_v[:, :, :40] = k, v
    big_k[:, :, 40:] = float("inf")  # a static cache's unused tail may hold anything; masked rows are never read
    big_v[:, :, 40:] = float("nan")
    mask = torch.arange(100) < 40
    out = ops.decode_attention(q, big_k, big_v, mask, 0.125)
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, _reference(q, k, v, None, 0.125)) < TOL
    view_k = big_k[:, :, :40]  # non-contiguous view (head stride 100 * 64)
    assert rel_err(ops.decode_attention(q, view_k, big_v[:, :, :40], None, 0.125), out) < 1e-6
    none = ops.decode_attention(q, k, v, torch.zeros(40, dtype=torch.bool), 0.125)
    assert torch.equal(none, torch.zeros_like(none))  # a query that sees nothing gets zeros, not NaN


@needs_native
def test_unsupported_inputs_are_refused_and_the_hf_function_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(4, 2, 30, 64)
    for bad in (q.float(), q.expand(2, -1, -1, -1), torch.cat([q, q], dim=2)):
        assert not ops.attention_supported(bad, k, v, None)
    assert not ops.attention_supported(q, k, v, torch.zeros(1, 1, 1, 30))  # additive float masks: not ours
    with pytest.raises(TypeError, match="decode_attention: q, k and v must be bf16"):
        ops.decode_attention(q.float(), k.float(), v.float(), None, 0.1)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    module.is_causal = True
    q2 = torch.randn(1, 4, 3, 64, dtype=torch.bfloat16)  # prefill: three queries
    got, _ = attention_forward(module, q2, k, v, None, scaling=0.125)
    want, _ = sdpa_attention_forward(module, q2, k, v, None, scaling=0.125)
    assert torch.equal(got, want)
    fast, _ = attention_forward(module, q, k, v, None, scaling=0.125)
    slow, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125)
    assert rel_err(fast, slow) < TOL


def test_resolve_and_set_attention():
    assert resolve("sdpa") == "sdpa" and resolve("eager", compiled=True) == "eager"
    assert resolve("model") is None and resolve(None) is None
    assert available("cpu") == ops.available() and not available("cuda")
    assert resolve("auto") == ("qcal" if ops.available() else None)  # else the model's own
    assert resolve("auto", compiled=True) == ("qcal" if ops.available() else "eager")
    assert resolve("auto", "cuda", compiled=True) == "eager"  # the kernel is CPU-only
    assert resolve("auto", "cuda") is None
    model = make_tiny_llama()
    set_attention(model, "eager")
    assert model.config._attn_implementation == "eager"
    set_attention(model, "model")  # the model's own: left as it is
    assert model.config._attn_implementation == "eager"
    register()
    set_attention(model, "qcal")
    assert model.config._attn_implementation == "qcal"


@needs_native
def test_tiny_llama_decodes_the_same_with_qcal_attention():
    model = make_tiny_llama(hidden=128).to(torch.bfloat16)  # head_dim 32, two query heads per KV head
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    ref = greedy_reference(model, prompt, 8)
    with torch.no_grad():
        ids = torch.cat([prompt, ref], dim=1)
        sdpa_logits = model(ids).logits
    set_attention(model, "qcal")
    assert torch.equal(greedy_reference(model, prompt, 8), ref)
    with torch.no_grad():  # step by step through the cache, every step through the kernel
        out = model(prompt, use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(ref.shape[1]):
            out = model(ref[:, t:t + 1], use_cache=True, past_key_values=out.past_key_values)
            steps.append(out.logits[:, -1])
    assert rel_err(torch.stack(steps[:-1], 1), sdpa_logits[:, prompt.shape[1] - 1:-1]) < 1e-2


@needs_native
def test_compiled_generator_uses_the_kernel_without_graph_breaks(monkeypatch):
    from qcal.runtime import StaticCacheGenerator
    from qcal.schemes import apply_scheme

    model = apply_scheme(make_tiny_llama(hidden=128), "int4wo-64", quantize_lm_head=True)
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = greedy_reference(model, prompt, 6)
    traced = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a: traced.append(a[0].shape) or real(*a))
    torch._dynamo.reset()
    gen = StaticCacheGenerator(model, max_cache_len=20, backend="eager")  # fullgraph: a graph break would raise
    assert gen.attn_implementation == "qcal"
    got = gen.generate(prompt, 6)
    # every decode step (6) of both layers took the kernel path (dynamo replays the list append each step)
    assert traced == [torch.Size([1, 4, 1, 32])] * 12
    assert (got == ref).float().mean() >= 0.8  # bf16 near-ties may flip a token of a random tiny model
    assert model.config._attn_implementation == "sdpa"
