"""Quantized KV cache: per-(token, head) int8 / int4 codes, appended without re-quantization; a transformers cache."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama, rel_err

from qcal.eval.perplexity import token_perplexity
from qcal.runtime.kv_cache import QuantizedKVCache, dequantize_kv, quantize_kv


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16), (8, 32)])
def test_round_trip_is_within_half_a_step(bits, group):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 64) * torch.logspace(-2, 1, 17).view(1, 1, 17, 1)
    codes, scale, mn = quantize_kv(x, bits, group)
    g = group or 64
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 17, 64 if bits == 8 else 32)
    assert scale.dtype == mn.dtype == torch.float16 and scale.shape == (2, 3, 17, 64 // g)
    y = dequantize_kv(codes, scale, mn, bits, torch.float32)
    step = scale.float().repeat_interleave(g, -1)
    err = (y - x).abs()
    # half a step, plus float16's rounding of the minimum (relative 2^-11)
    assert (err <= step * 0.5 + mn.float().abs().repeat_interleave(g, -1) * 2.0**-11 + 1e-7).all()
    if bits == 4:  # the two nibbles of a byte are two neighbouring codes
        wide = ((x - mn.float().repeat_interleave(g, -1)) / step).round().clamp(0, 15).to(torch.uint8)
        assert torch.equal(codes, wide[..., 0::2] | (wide[..., 1::2] << 4))


def test_constant_non_finite_and_bad_inputs():
    x = torch.full((1, 1, 2, 8), 3.0)
    x[0, 0, 1] = float("nan")
    codes, scale, mn = quantize_kv(x, 8)
    y = dequantize_kv(codes, scale, mn, 8, torch.float32)
    assert torch.equal(y[0, 0, 0], torch.full((8,), 3.0))  # a constant vector is exact
    assert torch.isnan(y[0, 0, 1]).all()  # a NaN vector stays NaN, its neighbours unaffected
    with pytest.raises(ValueError, match="odd"):
        quantize_kv(torch.randn(1, 1, 1, 7), 4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_kv(x, 3)
    with pytest.raises(TypeError, match="float"):
        quantize_kv(torch.ones(1, 1, 1, 8, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizedKVCache(make_tiny_llama().config, bits=2)
    with pytest.raises(ValueError, match="group_size 24 does not divide the head dimension 16"):
        QuantizedKVCache(make_tiny_llama().config, bits=4, group_size=24)
    with pytest.raises(ValueError, match="group_size 5 does not divide"):
        quantize_kv(torch.randn(1, 1, 1, 8), 8, 5)


@pytest.mark.parametrize("bits,group,tol", [(8, "default", 0.01), (4, "default", 0.1), (4, 8, 0.1)])
def test_logits_through_the_cache_stay_close_and_the_cache_is_small(bits, group, tol):
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        cache = QuantizedKVCache(model.config, bits, group)
        out = model(ids, past_key_values=cache, use_cache=True).logits
    assert 0 < rel_err(out, ref) < tol
    heads, d, layers = model.config.num_key_value_heads, model.config.hidden_size // 4, model.config.num_hidden_layers
    groups = 1 if cache.group_size is None else d // cache.group_size
    per_vector = (d if bits == 8 else d // 2) + 4 * groups  # codes + float16 scale and minimum per group
    assert cache.get_seq_length() == 40
    assert cache.nbytes() == layers * 2 * 2 * heads * 40 * per_vector
    assert cache.nbytes() / (layers * 2 * 2 * heads * 40 * d * 2) == pytest.approx(per_vector / (2 * d))


@pytest.mark.parametrize("bits", [8, 4])
def test_decoding_token_by_token_equals_one_forward(bits):
    """Each token is quantized once, on its own: chunked prefill and decode read the same cache as one forward."""
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(ids, past_key_values=QuantizedKVCache(model.config, bits), use_cache=True).logits
        cache = QuantizedKVCache(model.config, bits)
        steps = [model(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        for t in range(20, 30):
            steps.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-4)
    assert cache.get_seq_length() == 30


def test_generate_and_beam_search_run_through_it():
    model = make_tiny_llama()
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False,
                         past_key_values=QuantizedKVCache(model.config, 8))
    assert out.shape == ref.shape and (out == ref).float().mean() > 0.8  # int8 rarely flips a greedy token
    beams = model.generate(prompt, max_new_tokens=6, do_sample=False, num_beams=3,
                           past_key_values=QuantizedKVCache(model.config, 8))
    assert beams.shape == (1, 14)


def test_batch_reorder_moves_codes_with_their_scales():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    cache = QuantizedKVCache(model.config, 4)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    before = [t.clone() for t in layer._k.view()]
    layer.batch_select_indices(torch.tensor([2, 0]))
    after = layer._k.view()
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b[[2, 0]])


def test_token_perplexity_through_a_quantized_cache():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 4 * 48), generator=torch.Generator().manual_seed(5))
    base = token_perplexity(model, ids, 48)
    int8 = token_perplexity(model, ids, 48, kv_cache="int8")
    int4 = token_perplexity(model, ids, 48, kv_cache="int4")
    assert int8 != base and abs(math.log(int8 / base)) < 0.005 and abs(math.log(int4 / base)) < 0.05
    with pytest.raises(ValueError, match="kv_cache='int2'"):
        token_perplexity(model, ids, 48, kv_cache="int2")


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, None), (4, 16), (4, 2), (8, 48)])
def test_native_dequantization_equals_the_reference_bit_for_bit(bits, group):
    from qcal.kernels.native import available

    if not available():
        pytest.skip("qcal's native kernels are not built here")
    torch.manual_seed(0)
    d = 96 if group == 48 else 64
    x = torch.randn(2, 3, 40, d) * 3
    x[0, 1, 5] = float("nan")
    codes, scale, mn = quantize_kv(x, bits, group)
    # a store's view: the first 33 of 40 positions (strided), as the cache hands it over
    codes, scale, mn = codes[:, :, :33], scale[:, :, :33], mn[:, :, :33]
    native = torch.ops.qcal.kv_dequant(codes, scale, mn, bits)
    groups = scale.shape[-1]
    wide = torch.stack((codes & 0xF, codes >> 4), -1).flatten(-2) if bits == 4 else codes
    ref = (wide.float().unflatten(-1, (groups, d // groups)) * scale.float().unsqueeze(-1)
           + mn.float().unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
    assert native.is_contiguous() and native.shape == ref.shape
    assert torch.equal(torch.isnan(native), torch.isnan(ref)) and torch.isnan(ref).any()
    assert torch.equal(native.nan_to_num(0).view(torch.int16), ref.nan_to_num(0).view(torch.int16))
    assert torch.equal(dequantize_kv(codes, scale, mn, bits, torch.bfloat16).nan_to_num(0), ref.nan_to_num(0))


def test_native_dequantization_refuses_bad_arguments():
    from qcal.kernels.native import available

    if not available():
        pytest.skip("qcal's native kernels are not built here")
    codes = torch.zeros(1, 2, 3, 8, dtype=torch.uint8)
    s = torch.ones(1, 2, 3, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        torch.ops.qcal.kv_dequant(codes, s, s, 3)
    with pytest.raises(TypeError, match="float16"):
        torch.ops.qcal.kv_dequant(codes, s.float(), s, 8)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.qcal.kv_dequant(codes.to(torch.int8), s, s, 8)
    with pytest.raises(ValueError, match="groups do not split"):
        torch.ops.qcal.kv_dequant(codes, torch.ones(1, 2, 3, 3, dtype=torch.float16),
                                  torch.ones(1, 2, 3, 3, dtype=torch.float16), 8)
    with pytest.raises(ValueError, match=r"\(B, H, n, bytes\)"):
        torch.ops.qcal.kv_dequant(codes, s[:, :1], s[:, :1], 8)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.qcal.kv_dequant(torch.zeros(1, 2, 3, 16, dtype=torch.uint8)[..., ::2], s, s, 8)


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_cache_native_and_pytorch_paths_agree_exactly(bits, monkeypatch):
    from qcal.kernels.native import available
    from qcal.runtime import kv_cache

    if not available():
        pytest.skip("qcal's native kernels are not built here")
    model = make_tiny_llama(hidden=128).to(torch.bfloat16)  # head_dim 32: int4 in two groups of 16
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))

    def run():
        cache = QuantizedKVCache(model.config, bits)
        with torch.no_grad():
            first = model(ids[:, :20], past_key_values=cache, use_cache=True).logits
            rest = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(20, 24)]
        return torch.cat([first, *rest], 1), cache.layers[1]._k.view()

    native, native_k = run()
    monkeypatch.setattr(kv_cache, "_native", lambda: False)
    ref, ref_k = run()
    assert torch.equal(native, ref)
    for a, b in zip(native_k, ref_k, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- decode attention over the codes (LeanGenerator)


@pytest.mark.parametrize("bits,group,hq,hkv,d", [(8, None, 9, 3, 64), (4, 16, 9, 3, 64), (4, 32, 4, 4, 128),
                                                (8, 16, 6, 2, 32)])
def test_decode_attention_over_codes_is_attention_over_the_dequantized_cache(native_kernels, bits, group, hq, hkv, d):
    torch.manual_seed(0)
    cap, n = 300, 257  # views of a larger buffer, as the generator passes them
    q = torch.randn(1, hq, 1, d).bfloat16()
    parts = []
    for _ in range(2):
        codes, scale, mn = quantize_kv(torch.randn(1, hkv, cap, d).bfloat16() * 3, bits, group)
        parts.append((codes[:, :, :n], scale[:, :, :n], mn[:, :, :n]))
    (kc, ks, km), (vc, vs, vm) = parts
    k, v = (dequantize_kv(*p, bits, torch.bfloat16) for p in parts)
    ref = torch.ops.qcal.decode_attention(q, k, v, None, d ** -0.5)
    assert torch.equal(torch.ops.qcal.decode_attention_kv(q, kc, ks, km, vc, vs, vm, bits, d ** -0.5), ref)


def test_decode_attention_over_codes_refuses_bad_arguments(native_kernels):
    q = torch.zeros(1, 4, 1, 64, dtype=torch.bfloat16)
    c, s = torch.zeros(1, 2, 5, 64, dtype=torch.uint8), torch.ones(1, 2, 5, 1, dtype=torch.float16)
    op = torch.ops.qcal.decode_attention_kv
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        op(q, c, s, s, c, s, s, 2, 1.0)
    with pytest.raises(ValueError, match="k codes must be"):
        op(q, c, s, s, c, s, s, 4, 1.0)  # int4 codes are 32 bytes a row of 64
    with pytest.raises(ValueError, match="multiple of 16"):
        op(q, c, torch.ones(1, 2, 5, 8, dtype=torch.float16), torch.ones(1, 2, 5, 8, dtype=torch.float16), c, s, s,
           8, 1.0)
    with pytest.raises(TypeError, match="v scale must be a Half"):
        op(q, c, s, s, c, s.float(), s, 8, 1.0)
    with pytest.raises(ValueError, match="v codes must be"):
        op(q, c, s, s, c[:, :, :4], s, s, 8, 1.0)
