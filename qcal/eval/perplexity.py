"""Token perplexity, GPTQ/torchao protocol: non-overlapping windows over the once-tokenized text."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def window_count(n_tokens: int, seqlen: int, limit: int | None = None) -> int:
    """Number of full ``seqlen`` windows in ``n_tokens`` tokens, capped at ``limit``."""
    n = n_tokens // seqlen
    return n if limit is None else min(n, limit)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (cpu for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _kv_cache(model: torch.nn.Module, bits: int):
    from qcal.runtime.kv_cache import QuantizedKVCache

    return QuantizedKVCache(model.config, bits)


def _cache_kwarg(model: torch.nn.Module, cache) -> dict:
    """``{"cache": cache}`` where the model's forward takes it (recent transformers), else ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


@torch.no_grad()
def window_nlls(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    limit: int | None = None,
    progress: bool = False,
    kv_cache: str | None = None,
) -> list[float]:
    """Mean next-token NLL (nats) of each window ``input_ids[i*seqlen:(i+1)*seqlen]``; logits in float32.

    ``kv_cache="int8"`` / ``"int4"``: each window runs through a fresh :class:`qcal.runtime.kv_cache.QuantizedKVCache`,
    so attention reads the keys and values as that cache stores them (the perplexity of generating with it)."""
    bits = {None: None, "int8": 8, "int4": 4}.get(kv_cache, -1)
    if bits == -1:
        raise ValueError(f"kv_cache={kv_cache!r}; choose None, 'int8' or 'int4'")
    ids = input_ids.reshape(-1)
    n = window_count(ids.numel(), seqlen, limit)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = model_device(model)
    cache_kw = None if bits is None else _cache_kwarg(model, None)  # the forward's keyword for a cache, looked up once
    windows = range(n)
    if progress:
        from tqdm.auto import tqdm

        windows = tqdm(windows, desc=f"perplexity ({seqlen}-token windows)", unit="win")
    nlls = []
    for i in windows:
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        if bits is None:
            logits = model(window, use_cache=False).logits
        else:
            logits = model(window, use_cache=True, **{k: _kv_cache(model, bits) for k in cache_kw}).logits
        logits = logits[0, :-1].float()
        nlls.append(F.cross_entropy(logits, window[0, 1:]).item())
    return nlls


def token_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    limit: int | None = None,
    progress: bool = False,
    kv_cache: str | None = None,
) -> float:
    """exp of the mean NLL over the first ``limit`` (default: all) non-overlapping windows of ``seqlen``
    (``kv_cache``: see :func:`window_nlls`)."""
    nlls = window_nlls(model, input_ids, seqlen, limit, progress, kv_cache)
    return math.exp(sum(nlls) / len(nlls))
