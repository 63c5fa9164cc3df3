"""Greedy generation with a static KV cache and one ``torch.compile``'d forward (the ``--compile`` speed path).

A dynamic cache grows every step, so a compiled model would see a new shape (and recompile, or run
with dynamic shapes) at every token. A ``transformers.StaticCache`` has a fixed size: the prefill
and every decode step then run two fixed-shape graphs, compiled once with ``fullgraph=True`` (a
graph break is an error, not a silent slowdown).
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable

import torch

from ..generation import greedy_steps
from .speed import _forward_params

__all__ = ["StaticCacheGenerator"]


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: Dynamo caches graphs per code object, so each generator's cache then
    holds just its prefill and decode graphs (no recompile limit to raise, and two graphs to tell apart)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") else \
        fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class StaticCacheGenerator:
    """Times greedy generation of a Hugging Face causal LM through a static cache.

    ``compile=True`` wraps the forward in ``torch.compile(fullgraph=True, dynamic=False)``; the
    first prompt/decode shapes compile (untimed warm-up is the caller's job). Dynamo's guards on the model's
    modules are dropped (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) and, after the first complete
    generation, decode steps run under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: guard
    evaluation cost 1.5-2 ms a token on the CPU. So do not change the model's modules, or its weights' shapes
    and dtypes, between generations of one generator (build a new one).
    ``attn_implementation`` is the Hugging Face attention used inside these calls only (the model
    is left as it was for everything else). The default ``"auto"`` is qcal's decode-attention kernel
    (:mod:`qcal.kernels.attention`, ~20 us per layer and token) where it runs, else ``"eager"``
    (matmul, softmax, matmul: what inductor fuses best); on CPU, SDPA's flash kernel costs about
    250 us per layer and token at one query position, more than the layer's int4 matmuls. ``None``
    keeps the model's own.
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, compile: bool = True,
                 attn_implementation: str | None = "auto", **compile_kwargs) -> None:
        from transformers import StaticCache

        from ..kernels.attention import resolve

        self.model = model
        if attn_implementation is not None:
            attn_implementation = resolve(attn_implementation, "eager", next(model.parameters()).device)
        self.attn_implementation = attn_implementation
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self._allocate_cache()
        cache_kw = "cache" if "cache" in _forward_params(model) else "past_key_values"

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

    def forward(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Logits of the last position; the attention implementation is switched for this call only."""
        cfg = self.model.config
        if self.attn_implementation is None or cfg._attn_implementation == self.attn_implementation:
            return self._forward(ids, position)
        previous = cfg._attn_implementation
        cfg._attn_implementation = self.attn_implementation
        try:
            return self._forward(ids, position)
        finally:
            cfg._attn_implementation = previous

    def _allocate_cache(self) -> None:
        """Allocate the cache now: a lazily allocated cache would make the first graph differ from the rest."""
        cfg = self.model.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        emb = self.model.get_input_embeddings().weight
        self.cache.early_initialization(1, heads, head_dim, emb.dtype, emb.device)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``prompt`` (1, n): the ``new_tokens`` generated ids, (1, new_tokens)."""
        return self.time_generation(prompt, new_tokens, _keep=True)[2]

    @torch.no_grad()
    def time_generation(self, prompt: torch.Tensor, new_tokens: int, _keep: bool = False):
        """``(prefill seconds, decode seconds)`` for one prefill of ``prompt`` and ``new_tokens`` steps."""
        prompt = prompt.to(next(self.model.parameters()).device)
        n = prompt.shape[1]
        if n + new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({n}) + new_tokens ({new_tokens}) exceed the static cache "
                             f"(max_cache_len={self.max_cache_len})")
        device = prompt.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.cache.reset()
        # one fresh tensor per step (views of one arange would differ in storage offset, a recompile each)
        positions = [torch.tensor([p], device=device) for p in range(n, n + new_tokens)]
        sync()
        start = time.perf_counter()
        token = self.forward(prompt, torch.arange(n, device=device))[:, -1:].argmax(-1)
        sync()
        prefill = time.perf_counter() - start
        # once warm, a decode step evaluates only the guards that tell this generator's two graphs apart: Dynamo's
        # full guard set (every parameter of the model) costs ~0.5-1 ms a token on the CPU
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.compiled and self._warm):
            decode, tokens = greedy_steps(lambda i, t: self.forward(t, positions[i])[:, -1:].argmax(-1), token,
                                          new_tokens, _keep, sync)
        self._warm = self._warm or new_tokens > 0
        return (prefill, decode, tokens) if _keep else (prefill, decode)
