"""Speed and size: prefill/decode tokens per second (models timed alternately), model bytes, weight bytes read
per decoded token, peak memory, and the machine's streaming memory bandwidth."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..runtime.base import TokenGenerator, argmax_last
from ..runtime.family import forward_params
from .perplexity import model_device


@dataclass
class SpeedResult:
    """Median throughput over the timed repeats."""

    prefill_tok_s: float
    decode_tok_s: float


def _tensor_storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """Storages behind ``t``; wrapper tensor subclasses are opened through ``__tensor_flatten__``."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _tensor_storages(getattr(t, name))
        return
    if t.device.type != "meta":
        yield t.untyped_storage()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared storage counted once (tied weights too)."""
    seen: dict[tuple[str, int], int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        for storage in _tensor_storages(t):
            seen[(str(storage.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter once, the input embedding table one row.

    Quantized modules count their canonical state as :func:`qcal.explain.module_rows` reports it (integer weights,
    scales, zero points, bias); float modules their parameters' bytes, a parameter shared by several modules once.
    The input embedding is a lookup (one row per token), but an output head tied to it reads the whole table.
    """
    from ..explain import module_rows
    from ..quantize import quantized_modules

    quantized = {row["name"]: row["bytes"] for row in module_rows(model)}
    skip = {name for name, _ in quantized_modules(model)}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    total, seen = sum(quantized.values()), set()
    for name, module in model.named_modules():
        if name in skip or any(name.startswith(q + ".") for q in skip):
            continue
        for param in module.parameters(recurse=False):
            if module is embedding and param is getattr(module, "weight", None):
                total += math.prod(param.shape[1:]) * param.element_size()  # one row
            elif id(param) not in seen:
                seen.add(id(param))
                total += param.numel() * param.element_size()
    return total


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or the RSS high-water mark on CPU.

    :meth:`reset_peak` forgets the peak so far (e.g. a quantization transient) but keeps the entry
    level as the base. ``bytes`` is None where it cannot be measured (no /proc, or the CPU peak
    cannot be reset).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_kb("VmRSS")
        self.reset_peak()
        return self

    def reset_peak(self) -> None:
        """Start the peak afresh from the current usage."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset = _reset_rss_peak()

    def peak_bytes(self) -> int | None:
        """The peak above the entry level since the last reset (None where it cannot be measured)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        peak = _proc_status_kb("VmHWM")
        if self._reset and peak is not None and self._base is not None:
            return max(0, peak - self._base)
        return None

    def __exit__(self, *exc) -> None:
        self.bytes = self.peak_bytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_of(out: object) -> object:
    """The KV cache a forward returned (``cache`` in recent transformers, else ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def time_generation(model: torch.nn.Module | TokenGenerator, prompt: torch.Tensor,
                    new_tokens: int) -> tuple[float, float]:
    """Seconds for one prefill forward of ``prompt`` (1, n) and for ``new_tokens`` greedy KV-cache steps.

    ``model`` is a Hugging Face model (its forward and dynamic cache) or a :class:`qcal.runtime.TokenGenerator`.
    """
    if isinstance(model, TokenGenerator):
        return model.time_generation(prompt, new_tokens)
    device = model_device(model)
    prompt = prompt.to(device)
    params = forward_params(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generation does
    cache_kw = "cache" if "cache" in params else "past_key_values"
    _sync(device)
    start = time.perf_counter()
    out = model(prompt, use_cache=True, **last_only)
    token = argmax_last(out.logits[:, -1])
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{cache_kw: _cache_of(out)})
        token = argmax_last(out.logits[:, -1])
    _sync(device)
    return prefill, time.perf_counter() - start


def measure_speed(
    models: Mapping[str, torch.nn.Module | TokenGenerator],
    *,
    vocab_size: int,
    prefill_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, SpeedResult]:
    """Median prefill and decode tokens/s of each model, timing the models alternately, round after round.

    Every round runs each model once on the same seeded random prompt, so slow drifts of the machine
    (thermal, other load) hit all models alike. ``warmup`` untimed rounds come first.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prefill_len), generator=generator)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for round_ in range(warmup + repeats):
        for name, model in models.items():
            seconds = time_generation(model, prompt, new_tokens)
            if round_ >= warmup:
                timings[name].append(seconds)
    return {
        name: SpeedResult(
            prefill_tok_s=prefill_len / statistics.median(p for p, _ in runs),
            decode_tok_s=new_tokens / statistics.median(d for _, d in runs) if new_tokens else float("nan"),
        )
        for name, runs in timings.items()
    }


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` leaves the elapsed seconds in ``t[0]``."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


STREAM_BYTES = {"copy": 2, "scale": 2, "add": 3, "triad": 3, "read": 1}  # arrays each kernel moves, as STREAM counts


@torch.no_grad()
def stream_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """STREAM-like memory bandwidth in GB/s (10^9 bytes/s) per kernel, best of ``repeats``, on ``threads`` threads.

    Kernels over float32 arrays of ``mib`` MiB each (pick far more than the caches): copy ``c = a``, scale
    ``b = s*c``, add ``c = a + b``, triad ``a = b + s*c`` and read (``a . a``: a dot product reading ``a`` once);
    bytes counted as STREAM does (2, 2, 3, 3 and 1 arrays; no write-allocate traffic). torch's thread count is
    restored afterwards.
    """
    if threads <= 0 or mib <= 0 or repeats <= 0:
        raise ValueError(f"threads, mib and repeats must be positive, got {threads}, {mib}, {repeats}")
    n = mib * 2**20 // 4
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, c = (torch.full((n,), v, dtype=torch.float32) for v in (1.0, 2.0, 0.0))  # filled: pages touched
        s = math.sqrt(2) - 1  # a round of the four kernels then leaves a unchanged: (2s + s^2) a = a
        kernels = {
            "copy": lambda: c.copy_(a),
            "scale": lambda: torch.mul(c, s, out=b),
            "add": lambda: torch.add(a, b, out=c),
            "triad": lambda: torch.add(b, c, alpha=s, out=a),
            "read": lambda: torch.dot(a, a),  # one array read, both operands from it
        }
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(repeats):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                kernel()
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: STREAM_BYTES[name] * n * 4 / seconds / 1e9 for name, seconds in best.items()}
