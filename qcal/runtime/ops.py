"""The generation runtime's native steps (``qcal/runtime/csrc``, operators ``torch.ops.qcal.*``): attention over a
bf16 KV cache and a Llama layer's elementwise steps with Hugging Face's bf16 rounding. Each operator checks its
arguments in C++; these functions add the library check and Python signatures with defaults."""

from __future__ import annotations

import torch

from ..kernels.native import has, native_status

__all__ = ["RUNTIME_OPS", "KV_OPS", "available", "has_kv", "attention_supported", "decode_attention",
           "prefill_attention", "add_rmsnorm", "rope_store", "silu_mul"]

# the operators of a bf16-cache generation step, and those a quantized cache adds (the AVX2 library lacks these)
RUNTIME_OPS = ("add_rmsnorm", "rope_store", "silu_mul", "decode_attention", "decode_step_attention",
               "prefill_attention")
KV_OPS = ("kv_quantize", "kv_dequant", "decode_attention_kv")


def available() -> bool:
    """Whether the loaded native library has the runtime's operators (AVX-512 or AVX2)."""
    return has(*RUNTIME_OPS)


def has_kv() -> bool:
    """Whether the loaded native library also has the quantized KV cache's operators."""
    return has(*KV_OPS)


def attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes these inputs (one query, batch 1, bf16 on the CPU)."""
    return (q.dim() == 4 and k.dim() == 4 and q.shape[0] == 1 and q.shape[2] == 1 and k.shape == v.shape
            and k.shape[0] == 1 and k.shape[3] == q.shape[3] and q.shape[3] % 16 == 0 and q.shape[3] <= 256
            and q.shape[1] % k.shape[1] == 0 and q.shape[1] // k.shape[1] <= 16
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
            and k.stride(3) == 1 and v.stride(3) == 1
            and (mask is None or (mask.dtype == torch.bool and mask.numel() == k.shape[2]))
            and available())


def _library() -> None:
    if not available():
        raise RuntimeError(f"qcal native runtime operators unavailable: kernels {native_status()}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """``softmax(scale q K^T + mask) V`` for one query position: ``q (1, H, 1, D)``, ``k``/``v`` ``(1, H_kv, L, D)``
    (bf16, grouped heads allowed), ``mask`` a bool tensor of ``L`` entries (True = attend) or None; returns
    ``(1, 1, H, D)`` bf16 (Hugging Face's attention-output layout)."""
    _library()
    return torch.ops.qcal.decode_attention(q, k, v, mask, scale)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of ``q (n, H, D)`` (query ``i`` at position ``start + i``) over the first ``start + n``
    positions of ``k``/``v`` ``(H_kv, >= start + n, D)`` (bf16, last dimension contiguous); ``(n, H, D)`` bf16.
    fp32 scores and softmax, probabilities rounded to bf16 for the value product (as flash attention does)."""
    _library()
    return torch.ops.qcal.prefill_attention(q, k, v, start, scale)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` in place (when given), then ``LlamaRMSNorm`` of the rows of ``x (M, N)`` with ``weight (N,)``,
    rounded as Hugging Face's bf16 ops; returns ``out`` (allocated when None)."""
    _library()
    out = torch.empty_like(x) if out is None else out
    torch.ops.qcal.add_rmsnorm(x, delta, weight, out, eps)
    return out


def rope_store(src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """Rotary embedding (Hugging Face's rotate-half form, bf16 rounding) of ``src (M, H, D)`` written to ``dst``
    (any strides, last dimension contiguous; ``dst`` may be ``src``); ``cos``/``sin`` ``(M, D)``. With ``cos``
    None: a plain copy."""
    _library()
    torch.ops.qcal.rope_store(src, dst, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate = silu(gate) * up`` in place, each step rounded to bf16 as in Hugging Face's ``LlamaMLP``."""
    _library()
    torch.ops.qcal.silu_mul(gate, up)
    return gate
