"""Greedy generation with a static KV cache and one ``torch.compile``'d forward (the eval harness's ``--compile``).

A dynamic cache grows every step, so a compiled model would see a new shape (and recompile, or run
with dynamic shapes) at every token. A ``transformers.StaticCache`` has a fixed size: the prefill
and every decode step then run two fixed-shape graphs, compiled once with ``fullgraph=True`` (a
graph break is an error, not a silent slowdown).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch

from .base import TokenGenerator
from .family import attention_shape, forward_params
from .hf_attention import resolve

__all__ = ["StaticCacheGenerator"]


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: Dynamo caches graphs per code object, so each generator's cache then
    holds just its prefill and decode graphs (no recompile limit to raise, and two graphs to tell apart)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") else \
        fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class StaticCacheGenerator(TokenGenerator):
    """Greedy generation of a Hugging Face causal LM through a static cache, on the model's device.

    ``compile=True`` wraps the forward in ``torch.compile(fullgraph=True, dynamic=False)`` (``compile_kwargs`` go
    to ``torch.compile``); the first prompt/decode shapes compile (untimed warm-up is the caller's job). Dynamo's
    guards on the model's modules are dropped (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) and, after
    the first complete generation, the decode steps of :meth:`time_generation` run under
    ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: guard evaluation cost 1.5-2 ms a token on the CPU.
    So do not change the model's modules, or its weights' shapes and dtypes, between generations of one generator
    (build a new one).

    ``attn_implementation`` is the Hugging Face attention used inside these calls only (the model is left as it
    was for everything else): a name (``"qcal"``, ``"sdpa"``, ``"eager"``...), ``"auto"`` (resolved by
    :func:`qcal.runtime.hf_attention.resolve` for this device and ``compile``) or None (the model's own).
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, compile: bool = True,
                 attn_implementation: str | None = "auto", **compile_kwargs) -> None:
        from transformers import StaticCache

        if max_cache_len < 1:
            raise ValueError(f"StaticCacheGenerator: max_cache_len must be >= 1, got {max_cache_len}")
        self.model = model
        self.device = next(model.parameters()).device
        self.attn_implementation = resolve(attn_implementation, self.device, compiled=compile)
        self.max_cache_len = max_cache_len
        self.length = 0
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self._allocate_cache()
        # one tensor per decode position, made once: views of one arange differ in storage offset (a recompile each)
        self._positions: list[torch.Tensor] = []
        cache_kw = "cache" if "cache" in forward_params(model) else "past_key_values"

        def forward(ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            out = model(ids, use_cache=True, cache_position=position, logits_to_keep=1, **{cache_kw: self.cache})
            return out.logits

        self.compiled = compile
        self._warm = False  # both graphs compiled (set after the first complete generation)
        if compile:
            options = dict(compile_kwargs.pop("options", None) or {})
            skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
            if skip is not None and compile_kwargs.get("mode") is None:  # (mode and options exclude each other)
                options.setdefault("guard_filter_fn", skip)
            if options:
                compile_kwargs["options"] = options
        self._forward = (torch.compile(_own_code(forward, f"qcal_static_step_{id(self):x}"), fullgraph=True,
                                       dynamic=False, **compile_kwargs) if compile else forward)

    def _allocate_cache(self) -> None:
        """Allocate the cache now: a lazily allocated cache would make the first graph differ from the rest."""
        _, kv_heads, head_dim = attention_shape(self.model.config)
        emb = self.model.get_input_embeddings().weight
        self.cache.early_initialization(1, kv_heads, head_dim, emb.dtype, emb.device)

    def _position(self, p: int) -> torch.Tensor:
        while len(self._positions) <= p:
            self._positions.append(torch.tensor([len(self._positions)], device=self.device))
        return self._positions[p]

    def _call(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The logits of the last position, (1, vocab); the attention implementation is switched for this call."""
        cfg = self.model.config
        if self.attn_implementation is None or cfg._attn_implementation == self.attn_implementation:
            return self._forward(ids, position)[:, -1]
        previous = cfg._attn_implementation
        cfg._attn_implementation = self.attn_implementation
        try:
            return self._forward(ids, position)[:, -1]
        finally:
            cfg._attn_implementation = previous

    def _append(self, n: int) -> int:
        start = self.length
        if start + n > self.max_cache_len:
            raise ValueError(f"StaticCacheGenerator: {start} cached + {n} new positions exceed max_cache_len="
                             f"{self.max_cache_len}")
        self.length = start + n
        return start

    def reset(self) -> None:
        """Empty the cache."""
        self.cache.reset()
        self.length = 0

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (1, n); the logits of the last position, (1, vocab)."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"StaticCacheGenerator.prefill: ids must be (1, n) with n >= 1, got {tuple(ids.shape)}")
        start = self._append(ids.shape[1])
        return self._call(ids, torch.arange(start, self.length, device=self.device))

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token (1, 1); its logits, (1, vocab)."""
        if token.shape != (1, 1):
            raise ValueError(f"StaticCacheGenerator.decode: token must be (1, 1), got {tuple(token.shape)}")
        return self._call(token, self._position(self._append(1)))

    @contextlib.contextmanager
    def _decoding(self, new_tokens: int) -> Iterator[None]:
        """Make the decode positions before the clock starts; once warm, evaluate only the guards that tell this
        generator's two graphs apart (Dynamo's full guard set, every parameter of the model, costs ~0.5-1 ms a token
        on the CPU)."""
        self._position(self.length + new_tokens - 1)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.compiled and self._warm):
            yield
        self._warm = self._warm or new_tokens > 0
