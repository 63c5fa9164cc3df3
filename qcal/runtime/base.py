"""The interface of qcal's generation runtimes: a KV cache filled by ``prefill`` and ``decode``, greedy generation and
its timing on top."""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from ..kernels.native import has

__all__ = ["TokenGenerator", "argmax_last", "greedy_steps"]


class TokenGenerator(ABC):
    """Greedy generation of one sequence (batch 1) through a KV cache of ``max_cache_len`` positions.

    A generator implements :meth:`reset`, :meth:`prefill` and :meth:`decode`; :meth:`generate` and
    :meth:`time_generation` (what the eval harness times) are built on them. ``length`` counts the positions in the
    cache, ``device`` is where the ids go.
    """

    max_cache_len: int
    length: int
    device: torch.device

    @abstractmethod
    def reset(self) -> None:
        """Empty the cache: the next :meth:`prefill` starts a new sequence."""

    @abstractmethod
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Append ``ids`` (1, n) to the cache; the logits of the last position, (1, vocab)."""

    @abstractmethod
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token (1, 1) to the cache; its logits, (1, vocab)."""

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``prompt`` (1, n) from an empty cache: the ``new_tokens`` ids, (1, new_tokens)."""
        return self._run(prompt, new_tokens, keep=True)[2]

    def time_generation(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
        """``(prefill seconds, decode seconds)`` of one prefill of ``prompt`` (1, n) from an empty cache and
        ``new_tokens`` greedy decode steps."""
        prefill, decode, _ = self._run(prompt, new_tokens, keep=False)
        return prefill, decode

    def _sync(self) -> None:
        """Wait for the device (called before each clock reading)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def _decoding(self, new_tokens: int) -> Iterator[None]:
        """Context of the timed decode loop of :meth:`time_generation`, entered before its clock starts."""
        yield

    @torch.no_grad()
    def _run(self, prompt: torch.Tensor, new_tokens: int, keep: bool) -> tuple[float, float, torch.Tensor | None]:
        n = prompt.shape[-1]
        if prompt.numel() != n or n < 1 or new_tokens < 0 or n + new_tokens > self.max_cache_len:
            raise ValueError(f"{type(self).__name__}: prompt ({n}) + new_tokens ({new_tokens}) must fit "
                             f"max_cache_len={self.max_cache_len}, with a prompt of one sequence of at least one "
                             f"token (shape {tuple(prompt.shape)})")
        prompt = prompt.reshape(1, n).to(self.device)
        self.reset()
        self._sync()
        start = time.perf_counter()
        token = argmax_last(self.prefill(prompt))
        self._sync()
        prefill = time.perf_counter() - start
        with self._decoding(new_tokens):
            decode, tokens = greedy_steps(lambda t: argmax_last(self.decode(t)), token, new_tokens, keep, self._sync)
        return prefill, decode, tokens


def argmax_last(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)`` (the same indices: the first largest, the first NaN where there is one);
    for (M, vocab) bf16 logits on the CPU qcal's native ``argmax_rows`` (~30x PyTorch's bf16 argmax)."""
    if logits.dim() == 2 and logits.dtype == torch.bfloat16 and logits.device.type == "cpu" \
            and logits.is_contiguous() and logits.shape[1] > 0 and has("argmax_rows"):
        return torch.ops.qcal.argmax_rows(logits)
    return logits.argmax(-1, keepdim=True)


def greedy_steps(step: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, new_tokens: int,
                 keep: bool = False, sync: Callable[[], None] = lambda: None) -> tuple[float, torch.Tensor | None]:
    """Time ``new_tokens`` calls ``token = step(token)`` (greedy decoding from the first token, ``(1, 1)`` ids);
    returns the seconds (``sync`` called before the clock stops) and, with ``keep``, the ``new_tokens`` tokens fed
    in, ``(1, new_tokens)``."""
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        if keep:
            tokens.append(token)
        token = step(token)
    sync()
    seconds = time.perf_counter() - start
    return seconds, (torch.cat(tokens, dim=1) if tokens else token[:, :0]) if keep else None
