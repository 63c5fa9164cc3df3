"""Eager greedy generation for Llama-family models on the CPU without Hugging Face's per-layer Python.

In an eager decode step of SmolLM2-135M, Hugging Face's modeling code spends 10-13 ms a token outside
the linear layers (module calls, ~25 small PyTorch ops a layer, a dynamic cache that re-concatenates
every step) against ~26 ms for the bf16 matmuls and ~7 ms for int4 ones: the same overhead caps every
quantized model's speed-up. :class:`LeanGenerator` runs the same modules (float or frozen quantized
linears, embeddings, lm_head) through a flat loop with a static bf16 KV cache and one native call for
each elementwise step (:mod:`qcal.kernels.native`: residual add + RMSNorm, rotary embedding into the
cache, SiLU x up, attention); the elementwise steps follow Hugging Face's bf16 rounding step by step,
decode attention is qcal's kernel (as ``attn_implementation="qcal"``) and prefill attention qcal's flash-style
kernel (fp32 softmax, bf16 probabilities; ~2x PyTorch's SDPA on the CPU).

    gen = LeanGenerator(model, max_cache_len=1024)      # model: bf16 (quantized or not) on the CPU
    ids = gen.generate(prompt_ids, new_tokens=64)

:func:`unsupported_reason` says why a model cannot run here (then use the model's own ``generate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import native

__all__ = ["LeanGenerator", "unsupported_reason", "greedy_steps"]

_LAYER_TYPES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _decoder(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else None


def unsupported_reason(model: nn.Module) -> str | None:
    """None when :class:`LeanGenerator` can run ``model``, else the reason it cannot."""
    if not native.available():
        return f"qcal native kernels {native.native_status()}"
    inner = _decoder(model)
    if inner is None or not hasattr(model, "lm_head"):
        return "not a causal LM with model.model.layers and lm_head"
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "needs hidden_act='silu' and pretraining_tp=1"
    if getattr(cfg, "use_sliding_window", False) or getattr(cfg, "sliding_window", None) and \
            getattr(cfg, "model_type", "") == "mistral":
        return "sliding-window attention is not supported"
    for i, layer in enumerate(inner.layers):
        if type(layer).__name__ not in _LAYER_TYPES:
            return f"layer {i} is a {type(layer).__name__}, not one of {', '.join(_LAYER_TYPES)}"
        attn, mlp = layer.self_attn, layer.mlp
        if any(not hasattr(attn, p) for p in _PROJ) or any(not hasattr(mlp, p) for p in _MLP):
            return f"layer {i} lacks the q/k/v/o and gate/up/down projections"
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 16 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 16 up to 256"
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if heads % kv_heads or heads // kv_heads > 16:
        return f"{heads} query heads over {kv_heads} KV heads (the decode kernel takes groups of up to 16)"
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.device.type != "cpu":
            return f"{name} is on {t.device}, not the CPU"
    emb = model.get_input_embeddings()
    if getattr(emb, "weight", None) is None or emb.weight.dtype != torch.bfloat16:
        return "the model is not in bf16 (cast it with model.to(torch.bfloat16))"
    for layer in inner.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.bfloat16:
                return "the RMSNorm weights are not bf16"
    return None


def _row_fn(mod: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod`` as a function of one contiguous bf16 row ``(1, K)``, without ``nn.Module.__call__`` where that is
    safe (no hooks): ``F.linear`` for a float ``nn.Linear``, the kernel's small-M entry for a frozen qcal module
    (~5 us less per call, 211 calls a token for SmolLM2); the module itself otherwise."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return mod
    if type(mod) is nn.Linear:
        weight, bias = mod.weight, mod.bias
        return lambda x: F.linear(x, weight, bias)
    kernel = getattr(mod, "kernel", None)
    if getattr(mod, "frozen", False) and hasattr(kernel, "fast_mm") and mod._parameters.get("bias") is None \
            and getattr(kernel, "max_small_m", 0) >= 1:
        fast = kernel.fast_mm
        return lambda x: fast(mod, x)
    return mod


def _check(*outputs: torch.Tensor) -> None:
    """The native steps read raw memory: every projection output must be a contiguous bf16 CPU tensor."""
    for t in outputs:
        if t.dtype is not torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            raise TypeError(f"LeanGenerator: a projection returned {t.dtype} {tuple(t.shape)} on {t.device} "
                            f"(contiguous={t.is_contiguous()}); the native steps need contiguous bf16 CPU rows")


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight as the native step reads it (contiguous bf16) and its epsilon."""
    return norm.weight.detach().to(torch.bfloat16).contiguous(), float(norm.variance_epsilon)


class _Layer:
    """One decoder layer's modules and norm weights, read once."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.q, self.k, self.v, self.o = (getattr(attn, p) for p in _PROJ)
        self.gate, self.up, self.down = (getattr(mlp, p) for p in _MLP)
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        self.bind()

    def bind(self) -> None:
        """(Re)read the norm weights and the projections' row functions (after weights or kernels changed)."""
        self.row = tuple(_row_fn(m) for m in (self.q, self.k, self.v, self.o, self.gate, self.up, self.down))
        self.w_in, self.eps_in = _norm_weight(self.norm_in)
        self.w_post, self.eps_post = _norm_weight(self.norm_post)


class LeanGenerator:
    """Greedy generation of a Llama-family Hugging Face causal LM in bf16 on the CPU (see the module docstring).

    ``max_cache_len`` bounds prompt + generated tokens. The model's modules are used as they are (nothing is
    copied); the static KV cache takes ``2 * layers * kv_heads * max_cache_len * head_dim`` bf16 values.
    Raises ``ValueError`` naming the reason where :func:`unsupported_reason` finds one.
    """

    def __init__(self, model: nn.Module, max_cache_len: int) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanGenerator: {type(model).__name__} is not supported: {reason}")
        if max_cache_len < 1:
            raise ValueError(f"LeanGenerator: max_cache_len must be >= 1, got {max_cache_len}")
        cfg = model.config
        inner = _decoder(model)
        self.model = model
        self.max_cache_len = max_cache_len
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.embed, self.lm_head = model.get_input_embeddings(), model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.final_norm = inner.norm
        self.w_final, self.eps_final = _norm_weight(inner.norm)
        shape = (len(self.layers), self.kv_heads, max_cache_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=torch.bfloat16)
        self.v_cache = torch.zeros(shape, dtype=torch.bfloat16)
        with torch.no_grad():  # the rotary tables of every position, from the model's own rotary module
            positions = torch.arange(max_cache_len).unsqueeze(0)
            cos, sin = inner.rotary_emb(self.k_cache[0, :1, :1], positions)
        self.cos, self.sin = cos[0].to(torch.bfloat16).contiguous(), sin[0].to(torch.bfloat16).contiguous()
        self.length = 0  # positions filled in the cache
        self._verified: set[bool] = set()  # paths (decode: True, prefill: False) whose outputs were checked

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (1, n) at the cache's current length; the logits of the last position, (1, vocab)."""
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"LeanGenerator.forward: ids must be (1, n), got {tuple(ids.shape)}")
        n, start = ids.shape[1], self.length
        if start + n > self.max_cache_len:
            raise ValueError(f"LeanGenerator: {start} cached + {n} new positions exceed max_cache_len="
                             f"{self.max_cache_len}")
        lib, hd, kvh, heads = native._lib, self.head_dim, self.kv_heads, self.heads
        x = self.embed(ids[0]).contiguous()  # (n, hidden), the residual stream, updated in place
        h = torch.empty_like(x)
        cos, sin = self.cos[start:start + n], self.sin[start:start + n]
        cos_p, sin_p = cos.data_ptr(), sin.data_ptr()
        layer_stride, head_stride = self.k_cache.stride(0), self.k_cache.stride(1)
        k_base, v_base, esize = self.k_cache.data_ptr(), self.v_cache.data_ptr(), 2
        delta = None
        verify = (n == 1) not in self._verified  # check the projections' outputs once per path and generation
        attn_out = torch.empty((1, heads * hd), dtype=torch.bfloat16) if n == 1 else None
        for i, layer in enumerate(self.layers):
            lib.qcal_add_rmsnorm(x.data_ptr(), None if delta is None else delta.data_ptr(), layer.w_in.data_ptr(),
                                 h.data_ptr(), n, x.shape[1], layer.eps_in)
            f_q, f_k, f_v, f_o, f_gate, f_up, f_down = layer.row if n == 1 else (
                layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)
            q, k, v = f_q(h), f_k(h), f_v(h)
            if verify:
                _check(q, k, v)
            k_dst = k_base + (i * layer_stride + start * hd) * esize
            v_dst = v_base + (i * layer_stride + start * hd) * esize
            lib.qcal_rope_store(q.data_ptr(), heads * hd, q.data_ptr(), heads * hd, hd, n, heads, hd, cos_p, sin_p)
            lib.qcal_rope_store(k.data_ptr(), kvh * hd, k_dst, hd, head_stride, n, kvh, hd, cos_p, sin_p)
            lib.qcal_rope_store(v.data_ptr(), kvh * hd, v_dst, hd, head_stride, n, kvh, hd, None, None)
            if n == 1:  # (o_proj reads attn before the next layer overwrites it)
                attn = attn_out
                rc = lib.qcal_decode_attention(q.data_ptr(), k_base + i * layer_stride * esize,
                                               v_base + i * layer_stride * esize, None, attn.data_ptr(), heads, kvh,
                                               start + 1, hd, head_stride, hd, head_stride, hd, self.scale,
                                               torch.get_num_threads())
                native._checked(rc, "decode attention")
            else:
                attn = self._prefill_attention(q, i, start, n)
            x_delta = f_o(attn)
            lib.qcal_add_rmsnorm(x.data_ptr(), x_delta.data_ptr(), layer.w_post.data_ptr(), h.data_ptr(), n,
                                 x.shape[1], layer.eps_post)
            gate, up = f_gate(h), f_up(h)  # (keep `up` referenced: the C call reads it)
            if verify:
                _check(x_delta, gate, up)
            lib.qcal_silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel())
            delta = f_down(gate)
        _check(delta)
        self._verified.add(n == 1)
        last = x[-1:].contiguous()
        native.add_rmsnorm(last, self.w_final, self.eps_final, delta[-1:].contiguous(), out=h[-1:])
        self.length = start + n
        return self.lm_head(h[-1:])

    def _prefill_attention(self, q: torch.Tensor, i: int, start: int, n: int) -> torch.Tensor:
        """Causal attention of ``n`` query rows (positions ``start ..``) over layer ``i``'s cache; (n, heads * D)."""
        hd, heads = self.head_dim, self.heads
        out = torch.empty((n, heads * hd), dtype=torch.bfloat16)
        layer = i * self.k_cache.stride(0) * 2
        rc = native._lib.qcal_prefill_attention(q.data_ptr(), heads * hd, self.k_cache.data_ptr() + layer,
                                                self.v_cache.data_ptr() + layer, self.k_cache.stride(1), hd,
                                                out.data_ptr(), heads * hd, n, heads, self.kv_heads, start, hd,
                                                self.scale, torch.get_num_threads())
        native._checked(rc, "prefill attention")
        return out

    def reset(self) -> None:
        """Forget the cached positions (the next :meth:`forward` starts a new sequence) and re-read the modules'
        row functions."""
        self.length = 0
        self._verified.clear()
        for layer in self.layers:
            layer.bind()
        self.w_final, self.eps_final = _norm_weight(self.final_norm)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``prompt`` (1, n) from an empty cache: the ``new_tokens`` ids, (1, new_tokens)."""
        return self.time_generation(prompt, new_tokens, _keep=True)[2]

    @torch.no_grad()
    def time_generation(self, prompt: torch.Tensor, new_tokens: int, _keep: bool = False):
        """``(prefill seconds, decode seconds)`` for one prefill of ``prompt`` and ``new_tokens`` greedy steps."""
        n = prompt.shape[-1]
        if n < 1 or n + new_tokens > self.max_cache_len:
            raise ValueError(f"LeanGenerator: prompt ({n}) + new_tokens ({new_tokens}) must fit max_cache_len="
                             f"{self.max_cache_len}, with a prompt of at least one token")
        self.reset()
        start = time.perf_counter()
        token = self.forward(prompt.reshape(1, n).cpu()).argmax(-1, keepdim=True)
        prefill = time.perf_counter() - start
        decode, tokens = greedy_steps(lambda _, t: self.forward(t).argmax(-1, keepdim=True), token, new_tokens, _keep)
        return (prefill, decode, tokens) if _keep else (prefill, decode)


def greedy_steps(step: Callable[[int, torch.Tensor], torch.Tensor], token: torch.Tensor, new_tokens: int,
                 keep: bool = False, sync: Callable[[], None] = lambda: None) -> tuple[float, torch.Tensor | None]:
    """Time ``new_tokens`` calls ``token = step(i, token)`` (greedy decoding from the first token, ``(1, 1)`` ids);
    returns the seconds (``sync`` called before the clock stops) and, with ``keep``, the ``new_tokens`` tokens fed
    in, ``(1, new_tokens)``."""
    tokens = []
    start = time.perf_counter()
    for i in range(new_tokens):
        if keep:
            tokens.append(token)
        token = step(i, token)
    sync()
    seconds = time.perf_counter() - start
    return seconds, (torch.cat(tokens, dim=1) if tokens else token[:, :0]) if keep else None
