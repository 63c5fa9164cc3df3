"""``"qcal"`` attention for Hugging Face models: qcal's decode-attention kernel for one-query steps, SDPA otherwise.

A decode step attends one query to the whole KV cache. On the CPU, PyTorch's SDPA takes ~300 us per
layer for that in bf16 (its flash kernel is built for long queries) and Hugging Face's ``eager``
attention copies the cache for grouped-query heads and runs two batched matmuls (~270 us per layer
with SmolLM2-135M at 529 positions, 2 threads); :func:`qcal.kernels.ops.decode_attention` does it in
~20 us. Everything else -- prefill, batches, fp32, GPUs, dropout, sliding windows -- goes to
transformers' own SDPA path, so numbers match the ``sdpa`` implementation up to bf16 rounding.

    from qcal.runtime import set_attention
    set_attention(model, "qcal")          # model.config._attn_implementation = "qcal"

It changes attention only, for float and quantized models alike: compare speeds with every model
using it (the eval harness's ``--attention`` applies to the bf16 baseline too). :func:`resolve` holds the rule
for ``"auto"``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = ["NAME", "register", "available", "attention_forward", "set_attention", "resolve"]

NAME = "qcal"
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "position_bias", "s_aux", "sinks")
_registered = False


def available(device: torch.device | str = "cpu") -> bool:
    """Whether the decode kernel runs on ``device`` (a CPU with the native kernels built: AVX512-BF16 or AVX2)."""
    return torch.device(device).type == "cpu" and ops.available()


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-function signature; returns ``(output (B, q_len, H, D), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fast = (query.shape[2] == 1 and (dropout == 0.0 or not module.training)
            and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS)
            and ops.attention_supported(query, key, value, attention_mask))
    if fast:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return ops.decode_attention(query, key, value, attention_mask, scale), None
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


def resolve(name: str | None, device: torch.device | str = "cpu", *, compiled: bool = False) -> str | None:
    """The Hugging Face attention implementation ``name`` stands for on ``device``; None is the model's own.

    ``"auto"`` is ``"qcal"`` where its decode kernel runs (:func:`available`), else the model's own (None) -- or,
    for a ``compiled`` model, ``"eager"`` (matmul, softmax, matmul: what inductor fuses best; SDPA's CPU flash
    kernel costs ~250 us a layer at one query). ``"model"`` and None are the model's own; other names are returned
    as they are. ``"qcal"`` is registered with transformers whenever it is the answer.
    """
    if name == "auto":
        name = NAME if available(device) else ("eager" if compiled else None)
    elif name == "model":
        name = None
    if name == NAME:
        register()
    return name


def set_attention(model: nn.Module, name: str | None = NAME) -> nn.Module:
    """Switch a Hugging Face model (and its sub-configs) to attention ``name`` as :func:`resolve` reads it
    (``"qcal"``, ``"sdpa"``, ``"eager"``, ``"auto"``...; the model's own is left as it is); returns the model."""
    param = next(model.parameters(), None)
    name = resolve(name, param.device if param is not None else "cpu")
    if name is None:
        return model
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name
    return model
