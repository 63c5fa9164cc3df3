"""Eager greedy generation for Llama-family models on the CPU without Hugging Face's per-layer Python.

In an eager decode step of SmolLM2-135M, Hugging Face's modeling code spends 10-13 ms a token outside
the linear layers (module calls, ~25 small PyTorch ops a layer, a dynamic cache that re-concatenates
every step) against ~26 ms for the bf16 matmuls and ~7 ms for int4 ones: the same overhead caps every
quantized model's speed-up. :class:`LeanGenerator` runs the same modules (float or frozen quantized
linears, embeddings, lm_head) through a flat loop with a static bf16 KV cache and one native call for
each elementwise step (:mod:`qcal.kernels.native`: residual add + RMSNorm, rotary embedding into the
cache, SiLU x up, attention; a decode step's rotations, cache stores and attention are one call); the elementwise
steps follow Hugging Face's bf16 rounding step by step,
decode attention is qcal's kernel (as ``attn_implementation="qcal"``) and prefill attention qcal's flash-style
kernel (fp32 softmax, bf16 probabilities; ~2x PyTorch's SDPA on the CPU).

    gen = LeanGenerator(model, max_cache_len=1024)      # model: bf16 (quantized or not) on the CPU
    ids = gen.generate(prompt_ids, new_tokens=64)

``kv_bits=8`` (or 4) keeps the cache quantized as :class:`qcal.runtime.kv_cache.QuantizedKVCache` does (each
token's key and value quantized once when stored, a float16 scale and minimum per group): decode attention reads
the codes and dequantizes them in registers, prefill attention reads the cache dequantized, the new tokens included
(the same values), so generation equals the Hugging Face model's with that cache.

With a bf16 cache, a decode step whose projections are all single qcal operators (float linears and the native
rows of the quantized kernel tables) runs its layer loop as one native call (``torch.classes.qcal.DecodeStep``: the
same kernels on the same arguments, each projection's kernel bound to its weights once, bit for bit the Python loop,
without ~330 Python-level operator calls a token); ``native_step=False`` keeps the Python loop.

Which models qualify is decided by their structure (:mod:`qcal.runtime.family`); :func:`unsupported_reason` says
why a model cannot run here (then use the model's own ``generate``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..kernels import native
from ..kernels.common import bf16_panel, linear
from . import ops as runtime_ops
from .base import TokenGenerator
from .family import ATTENTION_PROJ, MLP_PROJ, attention_shape, structure_reason

__all__ = ["LeanGenerator", "unsupported_reason"]


def unsupported_reason(model: nn.Module) -> str | None:
    """None when :class:`LeanGenerator` can run ``model``, else the reason it cannot."""
    if not runtime_ops.available():
        return f"qcal native runtime operators unavailable (kernels {native.native_status()})"
    reason = structure_reason(model)
    if reason is not None:
        return reason
    heads, kv_heads, head_dim = attention_shape(model.config)
    if head_dim % 16 or head_dim > 256:
        return f"head_dim {head_dim} is not a multiple of 16 up to 256"
    if heads % kv_heads or heads // kv_heads > 16:
        return f"{heads} query heads over {kv_heads} KV heads (the decode kernel takes groups of up to 16)"
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.device.type != "cpu":
            return f"{name} is on {t.device}, not the CPU"
    if model.get_input_embeddings().weight.dtype != torch.bfloat16:
        return "the model is not in bf16 (cast it with model.to(torch.bfloat16))"
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.bfloat16:
                return "the RMSNorm weights are not bf16"
    return None


def _kv_group(bits: int, group_size: int | None | str, head_dim: int) -> int | None:
    """The quantized cache's group size (None: the whole head), checked for the decode kernel."""
    from .kv_cache import DEFAULT_GROUP

    if bits not in (4, 8):
        raise ValueError(f"LeanGenerator: kv_bits must be 8, 4 or None, got {bits!r}")
    if group_size == "default":
        group_size = DEFAULT_GROUP[bits]
        group_size = group_size if group_size is not None and head_dim % group_size == 0 else None
    g = head_dim if group_size is None else group_size
    if not isinstance(g, int) or g < 16 or g % 16 or head_dim % g:
        raise ValueError(f"LeanGenerator: kv_group_size must be a multiple of 16 dividing head_dim={head_dim} (or "
                         f"None), got {group_size!r}")
    return group_size


def _quantized_cache(layers: int, kv_heads: int, length: int, head_dim: int, bits: int, group: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and minima of one of a quantized cache's keys or values, every layer."""
    groups = 1 if group is None else head_dim // group
    codes = torch.zeros(layers, kv_heads, length, head_dim if bits == 8 else head_dim // 2, dtype=torch.uint8)
    scale = torch.zeros(layers, kv_heads, length, groups, dtype=torch.float16)
    return codes, scale, torch.zeros_like(scale)


def _call_fn(mod: nn.Module, rows: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``mod`` as a function of contiguous bf16 rows without ``nn.Module.__call__`` where that is safe (no hooks):
    for a float ``nn.Linear``, qcal's bf16 small-M kernel for up to 4 ``rows`` (the weight streamed in place,
    2-6x ``F.linear``'s one-row GEMM on the CPU) and :func:`qcal.kernels.common.linear` otherwise; for a frozen
    qcal linear without bias and a known number of ``rows``, the implementation its kernel table chooses for them
    (what the module call would run, ~5 us less a call, 211 calls a token for SmolLM2); the module itself
    otherwise."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return mod
    if type(mod) is nn.Linear:
        weight, bias = mod.weight, mod.bias
        if rows is not None and rows <= 4 and weight.dtype == torch.bfloat16 and weight.is_contiguous() \
                and native.has("w16a16_mm_small"):
            mm = torch.ops.qcal.w16a16_mm_small
            if bias is None:
                return lambda x: mm(x, weight)
            b = bias.to(torch.bfloat16)
            return lambda x: mm(x, weight) + b
        return lambda x: linear(x, weight, bias)
    choose = getattr(getattr(mod, "kernel", None), "choose", None)
    if rows is not None and choose is not None and getattr(mod, "frozen", False) and mod._parameters.get("bias") \
            is None:
        run = choose(torch.bfloat16, rows).run

        def call(x: torch.Tensor) -> torch.Tensor:
            y = run(mod, x)
            return y if y.dtype == x.dtype else y.to(x.dtype)  # as the module call casts (int8dq's _int_mm: fp32)
        return call
    return mod


def _direct(mod: nn.Module) -> tuple[str, tuple] | None:
    """``mod`` on one bf16 row as one qcal operator, ``(name, args after the input)``, where its one-row function
    (:func:`_call_fn`) is exactly that call; None otherwise (hooks, a bias, another kernel)."""
    if mod._forward_hooks or mod._forward_pre_hooks:
        return None
    if type(mod) is nn.Linear:
        weight = mod.weight
        if mod.bias is None and weight.dtype == torch.bfloat16 and weight.is_contiguous() \
                and native.has("w16a16_mm_small"):
            return "w16a16_mm_small", (weight,)
        return None
    choose = getattr(getattr(mod, "kernel", None), "choose", None)
    if choose is None or not getattr(mod, "frozen", False) or mod._parameters.get("bias") is not None:
        return None
    direct = getattr(choose(torch.bfloat16, 1), "direct", None)
    return None if direct is None else (direct[0], tuple(direct[1](mod)))


def _multi(mods: tuple[nn.Module, ...], rows: int) -> Callable[[torch.Tensor], list[torch.Tensor]] | None:
    """``mods`` (one input: q / k / v, gate / up) on ``rows`` bf16 rows as one qcal operator where each module's
    own call (:func:`_call_fn`) would run the same kernel and it has a form for several weights (``Impl.multi``):
    the same outputs, bit for bit, the input prepared once (widened, or quantized per row) and the weights' units
    one pool for the threads (SmolLM2, 512 positions: k and v alone are 12 panel blocks each for 2 threads). None
    otherwise."""
    if rows <= 4 or any(m._forward_hooks or m._forward_pre_hooks for m in mods):
        return None
    if all(type(m) is nn.Linear for m in mods):
        weights = [m.weight for m in mods]
        if not native.has("w16a16_mm_panel_multi") or not all(bf16_panel(m.weight, m.bias, rows) for m in mods) \
                or len({w.shape[1] for w in weights}) != 1:
            return None
        op = torch.ops.qcal.w16a16_mm_panel_multi
        return lambda x: op(x, weights)
    impls = []
    for m in mods:
        kernel = getattr(m, "kernel", None)
        choose = getattr(kernel, "choose", None)
        if choose is None or not getattr(m, "frozen", False) or m._parameters.get("bias") is not None \
                or getattr(kernel, "compute_dtype", None) not in (None, torch.bfloat16):
            return None
        impls.append(choose(torch.bfloat16, rows))  # what the module call picks for bf16 rows
    first = impls[0]
    if first.multi is None or any(i is not first for i in impls) or not native.has(first.multi[0]):
        return None
    name, per, shared = first.multi
    common = shared(mods[0])
    if any(shared(m) != common for m in mods[1:]) or len({m.in_features for m in mods}) != 1:
        return None
    op = getattr(torch.ops.qcal, name)

    def call(x: torch.Tensor) -> list[torch.Tensor]:
        return op(x, *(list(col) for col in zip(*(per(m) for m in mods), strict=True)), *common)
    return call


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight as the native step reads it (contiguous bf16) and its epsilon."""
    return norm.weight.detach().to(torch.bfloat16).contiguous(), float(norm.variance_epsilon)


class _Layer:
    """One decoder layer: its modules, norm weights and views of its slice of the KV cache, read once."""

    def __init__(self, layer: nn.Module, k_cache, v_cache) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.modules = tuple(getattr(attn, p) for p in ATTENTION_PROJ) + tuple(getattr(mlp, p) for p in MLP_PROJ)
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm
        if isinstance(k_cache, tuple):  # quantized: (codes, scale, minimum), each (1, kv_heads, max_cache_len, .)
            self.kq, self.vq = k_cache, v_cache
            return self.bind()
        self.k, self.v = k_cache, v_cache  # (kv_heads, max_cache_len, head_dim): attention reads these
        self.k_rows, self.v_rows = k_cache.transpose(0, 1), v_cache.transpose(0, 1)  # (positions, kv_heads, D)
        self.bind()

    def bind(self) -> None:
        """(Re)read the norm weights and the projections' functions (after weights or modules changed)."""
        self.fns = tuple(_call_fn(m) for m in self.modules)
        self.fns1 = tuple(_call_fn(m, rows=1) for m in self.modules)  # decode: one row
        self.direct = tuple(_direct(m) for m in self.modules)  # the same, as operator calls (None: not all are)
        self.w_in, self.eps_in = _norm_weight(self.norm_in)
        self.w_post, self.eps_post = _norm_weight(self.norm_post)


class LeanGenerator(TokenGenerator):
    """Greedy generation of a Llama-family Hugging Face causal LM in bf16 on the CPU (see the module docstring).

    ``max_cache_len`` bounds prompt + generated tokens. The model's modules are used as they are (nothing is
    copied; a module's hooks run); the static KV cache takes ``2 * layers * kv_heads * max_cache_len * head_dim``
    bf16 values, or with ``kv_bits`` 8 / 4 int8 / int4 codes and a float16 scale and minimum per ``kv_group_size``
    values (``"default"``: :data:`~qcal.runtime.kv_cache.DEFAULT_GROUP`; a multiple of 16 dividing ``head_dim``, or
    None for the whole head). ``native_step``: run eligible decode steps' layer loops natively (see the module
    docstring). Raises ``ValueError`` naming the reason where :func:`unsupported_reason` finds one.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, kv_bits: int | None = None,
                 kv_group_size: int | None | str = "default", native_step: bool = True) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanGenerator: {type(model).__name__} is not supported: {reason}")
        if max_cache_len < 1:
            raise ValueError(f"LeanGenerator: max_cache_len must be >= 1, got {max_cache_len}")
        inner = model.model
        self.model = model
        self.device = torch.device("cpu")
        self.max_cache_len = max_cache_len
        self.heads, self.kv_heads, self.head_dim = attention_shape(model.config)
        self.scale = self.head_dim ** -0.5
        self.embed, self.lm_head = model.get_input_embeddings(), model.lm_head
        self.kv_bits = kv_bits
        n_layers = len(inner.layers)
        if kv_bits is None:
            shape = (n_layers, self.kv_heads, max_cache_len, self.head_dim)
            self.k_cache = torch.zeros(shape, dtype=torch.bfloat16)
            self.v_cache = torch.zeros(shape, dtype=torch.bfloat16)
            caches = [(self.k_cache[i], self.v_cache[i]) for i in range(n_layers)]
        else:
            self.kv_group = _kv_group(kv_bits, kv_group_size, self.head_dim)
            if not runtime_ops.has_kv():
                raise ValueError(f"LeanGenerator: kv_bits={kv_bits} needs the quantized-cache operators, which this "
                                 f"CPU's native library ({native.isa()}) lacks; use kv_bits=None")
            k, v = (_quantized_cache(n_layers, self.kv_heads, max_cache_len, self.head_dim, kv_bits, self.kv_group)
                    for _ in range(2))
            self.k_cache, self.v_cache = k, v
            caches = [(tuple(t[i].unsqueeze(0) for t in k), tuple(t[i].unsqueeze(0) for t in v))
                      for i in range(n_layers)]
        self.layers = [_Layer(layer, *caches[i]) for i, layer in enumerate(inner.layers)]
        self.final_norm = inner.norm
        self.w_final, self.eps_final = _norm_weight(inner.norm)
        self.head = _call_fn(self.lm_head, rows=1)  # the logits of the last position only
        with torch.no_grad():  # the rotary tables of every position, from the model's own rotary module
            positions = torch.arange(max_cache_len).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.zeros(1, 1, self.head_dim, dtype=torch.bfloat16), positions)
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"LeanGenerator: the rotary tables have {cos.shape[-1]} columns, not head_dim="
                             f"{self.head_dim}")
        self.cos, self.sin = cos[0].to(torch.bfloat16).contiguous(), sin[0].to(torch.bfloat16).contiguous()
        self.length = 0  # positions filled in the cache
        self.native_step = native_step
        self._bind_step()

    def cache_nbytes(self) -> int:
        """Bytes of the KV cache's storage (all ``max_cache_len`` positions)."""
        ts = (self.k_cache, self.v_cache) if self.kv_bits is None else (*self.k_cache, *self.v_cache)
        return sum(t.numel() * t.element_size() for t in ts)

    def reset(self) -> None:
        """Forget the cached positions and re-read the modules' functions and norm weights."""
        self.length = 0
        for layer in self.layers:
            layer.bind()
        self.w_final, self.eps_final = _norm_weight(self.final_norm)
        self.head = _call_fn(self.lm_head, rows=1)
        self._bind_step()

    def _bind_step(self) -> None:
        """The arguments of the native decode step (``qcal::decode_layers``): None unless ``native_step``, a bf16
        cache and every projection of every layer a qcal operator call."""
        self.step_args = self._step = None
        if not self.native_step or self.kv_bits is not None or not native.has("decode_layers"):
            return
        norms, eps, names, tensors, ints = [], [], [], [], []
        for layer in self.layers:
            if any(d is None for d in layer.direct):
                return
            norms += [layer.w_in, layer.w_post]
            eps += [layer.eps_in, layer.eps_post]
            for name, args in layer.direct:
                names.append(name)
                for a in args:
                    if isinstance(a, torch.Tensor):
                        tensors.append(a)
                    elif isinstance(a, int):  # bools too
                        ints.append(int(a))
                    else:
                        return
        self.step_args = (norms, eps, names, tensors, ints)
        self._step = torch.classes.qcal.DecodeStep(norms, eps, self.k_cache, self.v_cache, self.cos, self.sin,
                                                   self.scale, names, tensors, ints)

    def _quantized_attention(self, layer: _Layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                             cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Store the new keys (rotated) and values quantized, then attend over the quantized cache."""
        ops, bits = torch.ops.qcal, self.kv_bits
        n = q.shape[0]
        end = start + n
        k_rot = torch.empty_like(k)
        ops.rope_store(k, k_rot, cos, sin)
        for x, cache in ((k_rot, layer.kq), (v, layer.vq)):  # (n, kv_heads, D) -> (1, kv_heads, n, D) rows
            ops.kv_quantize(x.transpose(0, 1).unsqueeze(0), *(t[:, :, start:end] for t in cache), bits)
        kq, vq = (tuple(t[:, :, :end] for t in cache) for cache in (layer.kq, layer.vq))
        if n == 1:
            return ops.decode_attention_kv(q.view(1, self.heads, 1, self.head_dim), *kq, *vq, bits, self.scale)
        return ops.prefill_attention(q, ops.kv_dequant(*kq, bits)[0], ops.kv_dequant(*vq, bits)[0], start, self.scale)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (1, n) at the cache's current length; the logits of the last position, (1, vocab)."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"LeanGenerator.prefill: ids must be (1, n) with n >= 1, got {tuple(ids.shape)}")
        return self._forward(ids)

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token (1, 1); its logits, (1, vocab)."""
        if token.shape != (1, 1):
            raise ValueError(f"LeanGenerator.decode: token must be (1, 1), got {tuple(token.shape)}")
        return self._forward(token)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        n, start = ids.shape[1], self.length
        end = start + n
        if end > self.max_cache_len:
            raise ValueError(f"LeanGenerator: {start} cached + {n} new positions exceed max_cache_len="
                             f"{self.max_cache_len}")
        hd, kvh, heads, scale = self.head_dim, self.kv_heads, self.heads, self.scale
        x = self.embed(ids[0].cpu()).contiguous()  # (n, hidden), the residual stream, updated in place
        h = torch.empty_like(x)
        cos, sin = self.cos[start:end], self.sin[start:end]
        delta = None
        ops = torch.ops.qcal  # each operator checks its arguments (the wrappers in native add nothing here)
        add_rmsnorm, rope_store, silu_mul = ops.add_rmsnorm, ops.rope_store, ops.silu_mul
        step_attention = ops.decode_step_attention
        layers = self.layers
        if n == 1 and self._step is not None:  # the loop below as one native call, bit for bit
            delta = self._step.run(x, h, None, start)
            layers = ()
        for layer in layers:
            add_rmsnorm(x, delta, layer.w_in, h, layer.eps_in)
            f_q, f_k, f_v, f_o, f_gate, f_up, f_down = layer.fns1 if n == 1 else layer.fns
            if n == 1 and self.kv_bits is None:  # rotations, cache stores and attention in one call: (1, heads * hd)
                attn = step_attention(f_q(h), f_k(h), f_v(h), layer.k, layer.v, start, self.cos, self.sin, scale)
            else:
                qkv = _multi(layer.modules[:3], n)
                q, k, v = qkv(h) if qkv is not None else (f_q(h), f_k(h), f_v(h))
                q = q.view(n, heads, hd)
                rope_store(q, q, cos, sin)
                if self.kv_bits is not None:
                    attn = self._quantized_attention(layer, q, k.view(n, kvh, hd), v.view(n, kvh, hd), start, cos,
                                                     sin)
                else:
                    rope_store(k.view(n, kvh, hd), layer.k_rows[start:end], cos, sin)
                    rope_store(v.view(n, kvh, hd), layer.v_rows[start:end], None, None)
                    attn = ops.prefill_attention(q, layer.k, layer.v, start, scale)
                attn = attn.view(n, heads * hd)
            add_rmsnorm(x, f_o(attn), layer.w_post, h, layer.eps_post)
            gate_up = _multi(layer.modules[4:6], n)
            gate, up = gate_up(h) if gate_up is not None else (f_gate(h), f_up(h))
            silu_mul(gate, up)
            delta = f_down(gate)
        last = x[-1:].contiguous()
        add_rmsnorm(last, delta[-1:].contiguous(), self.w_final, h[-1:], self.eps_final)
        self.length = end
        return self.head(h[-1:])
