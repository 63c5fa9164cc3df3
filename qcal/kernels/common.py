"""Shared pieces of the linear kernels: per-token int8 quantization, int4 codes, tinygemm layouts, bf16 GEMMs."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import native
from .native import dequant_int4 as _native_dequant

__all__ = ["quantize_per_token", "int4_codes_u8", "dequant_int4", "tinygemm_group_size", "tinygemm_scales_zeros",
           "is_frozen_linear", "linear", "bf16_panel"]

_TINY = torch.finfo(torch.float32).tiny


def is_frozen_linear(module) -> bool:
    """A frozen qcal linear layer with quantized weights."""
    return (getattr(module, "frozen", False) and getattr(module, "weight_spec", None) is not None
            and hasattr(module, "in_features") and getattr(module, "qweight", None) is not None)


@functools.cache
def _bf16_gemm_emulated() -> bool:
    """PyTorch's CPU bf16 GEMM has no bf16 hardware here (no AVX512-BF16 / AMX): oneDNN then runs it 4-6x slower
    than its fp32 GEMM on the same cores (AVX2 CPUs)."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def bf16_panel(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> bool:
    """Whether :func:`linear` runs ``weight`` on ``rows`` bf16 CPU rows as qcal's AVX2 panel kernel
    (``w16a16_mm_panel``)."""
    return (rows > 4 and bias is None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and not torch.compiler.is_compiling()
            and _bf16_gemm_emulated() and native.has("w16a16_mm_panel")
            and native.panel_fits(weight.shape[0], weight.shape[1]))


def linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; for bf16 on a CPU without bf16 GEMM hardware and more than 4 rows, fp32 accumulation of the
    (exactly widened) bf16 operands rounded once to bf16 -- what the bf16 GEMM computes, in another summation
    order, several times faster there: qcal's AVX2 panel kernel (``w16a16_mm_panel``, no bias, the weight's shape
    permitting: :func:`bf16_panel`), else an fp32 GEMM."""
    if (not torch.compiler.is_compiling() and x2.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x2.device.type == "cpu" and x2.dim() == 2 and x2.shape[0] > 4 and _bf16_gemm_emulated()):
        if bf16_panel(weight, bias, x2.shape[0]):
            return torch.ops.qcal.w16a16_mm_panel(x2, weight)
        return F.linear(x2.float(), weight.float(), None if bias is None else bias.float()).to(torch.bfloat16)
    return F.linear(x2, weight, bias)


_SCALE_DIV: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _scale_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = _SCALE_DIV.get(device)
    if c is None:  # 1-element float32 tensors: they promote a bf16 amax to float32 in the same op
        c = _SCALE_DIV[device] = (torch.full((1,), _TINY, device=device), torch.full((1,), 127.0, device=device))
    return c


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-row quantization of a 2-D tensor: ``(codes as float32, scale (M, 1) float32)``.

    Same math as the reference (``scale = max(amax / 127, tiny)`` in float32, ``round(x / scale)``
    half to even); the codes are exact integers in [-127, 127], so callers may cast them to int8 or
    bf16 without loss. Five small ops: eager decode is dominated by per-op overhead.
    """
    tiny, q = _scale_consts(x2.device)
    scale = torch.addcdiv(tiny, x2.abs().amax(dim=-1, keepdim=True), q)  # tiny + amax/127 == max(amax/127, tiny)
    return torch.round(x2 / scale), scale


def int4_codes_u8(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical packed int4 ``(N, K/2)`` -> unsigned nibble codes ``u = q + 8`` as uint8 ``(N, K)``."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], -1)


def dequant_int4(module, dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``(u - 8 - zp) * s`` of a frozen int4 linear, in ``dtype`` (fewest passes), computed in fp32
    and rounded once for 16-bit dtypes, so that every path (native, PyTorch ops, traced) builds the same weight.

    bf16 on an AVX512-BF16 CPU: qcal's one-pass native kernel."""
    if dtype == torch.bfloat16:
        w = _native_dequant(module.qweight, module.weight_scale, module.weight_zero_point)
        if w is not None:
            return w
    u = int4_codes_u8(module.qweight)
    n, k = u.shape
    math = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # fp32 math, one rounding
    s = module.weight_scale.to(math)
    groups = s.shape[1]
    u = u.view(n, groups, k // groups)
    zp = module.weight_zero_point
    # a 0-dim float tensor keeps uint8 - off in ``math`` (a Python 8.0 would promote to float32)
    off = torch.full((), 8.0, dtype=math, device=u.device) if zp is None else (zp.to(math) + 8.0).unsqueeze(-1)
    return ((u - off) * s.unsqueeze(-1)).view(n, k).to(dtype)


def tinygemm_group_size(module) -> int | None:
    """The tinygemm group size that represents this int4 weight (per-channel becomes one K-tile group)."""
    k = module.qweight.shape[1] * 2
    groups = module.weight_scale.shape[1]
    g = k // groups
    if groups == 1:  # per channel: repeat the scale over the largest supported group dividing K
        return next((c for c in (256, 128, 64, 32) if k % c == 0), None)
    return g if g in (32, 64, 128, 256) else None


def tinygemm_scales_zeros(module, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K/g, N, 2)`` scales and zeros with tinygemm's ``w = (u - 8) * scale + zero``; ours ``zero = -zp * s``."""
    s = module.weight_scale.float()
    zp = module.weight_zero_point
    z = torch.zeros_like(s) if zp is None else -zp.float() * s
    k = module.qweight.shape[1] * 2
    rep = (k // group_size) // s.shape[1]
    if rep > 1:
        s, z = s.repeat_interleave(rep, dim=1), z.repeat_interleave(rep, dim=1)
    return torch.stack((s.t(), z.t()), dim=-1).to(dtype).contiguous()
