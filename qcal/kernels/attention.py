"""``"qcal"`` attention for Hugging Face models: qcal's decode-attention kernel for one-query steps, SDPA otherwise.

A decode step attends one query to the whole KV cache. On the CPU, PyTorch's SDPA takes ~300 us per
layer for that in bf16 (its flash kernel is built for long queries) and Hugging Face's ``eager``
attention copies the cache for grouped-query heads and runs two batched matmuls (~270 us per layer
with SmolLM2-135M at 529 positions, 2 threads); :func:`qcal.kernels.native.decode_attention` does it in
~20 us. Everything else -- prefill, batches, fp32, GPUs, dropout, sliding windows -- goes to
transformers' own SDPA path, so numbers match the ``sdpa`` implementation up to bf16 rounding.

    from qcal.kernels.attention import set_attention
    set_attention(model, "qcal")          # model.config._attn_implementation = "qcal"

It changes attention only, for float and quantized models alike: compare speeds with every model
using it (the eval harness's ``--attention`` applies to the bf16 baseline too).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native

__all__ = ["NAME", "register", "available", "attention_forward", "set_attention", "resolve"]

NAME = "qcal"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "position_bias", "s_aux", "sinks")
_registered = False


def available() -> bool:
    """Whether the decode kernel is usable here (AVX512-BF16 CPU and a built native library)."""
    return native.available()


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-function signature; returns ``(output (B, q_len, H, D), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fast = (query.shape[2] == 1 and (dropout == 0.0 or not module.training)
            and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS)
            and native.attention_supported(query, key, value, attention_mask))
    if fast:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return native.decode_attention(query, key, value, attention_mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register() -> str:
    """Register ``"qcal"`` with transformers' attention and mask interfaces (boolean masks, as SDPA); idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME


def resolve(name: str, fallback: str | None = "sdpa", device: torch.device | str = "cpu") -> str | None:
    """``"auto"`` -> ``"qcal"`` where its kernel runs (a CPU with the native kernels), else ``fallback``;
    other names unchanged. ``"qcal"`` is registered with transformers whenever it is the answer."""
    if name == "auto":
        name = NAME if torch.device(device).type == "cpu" and available() else fallback
    if name == NAME:
        register()
    return name


def set_attention(model: nn.Module, name: str = NAME) -> nn.Module:
    """Switch a Hugging Face model (and its sub-configs) to attention ``name`` (``"qcal"``, ``"sdpa"``,
    ``"eager"``, ``"auto"``...); returns the model."""
    param = next(model.parameters(), None)
    name = resolve(name, device=param.device if param is not None else "cpu")
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
    return model
