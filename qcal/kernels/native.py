"""Python side of qcal's native CPU kernels: weight layouts, shape rules and a few helpers over ``torch.ops.qcal``.

The operators themselves (built by :mod:`qcal.kernels.library`; schema, argument checks and Meta shapes live in
C++ next to each kernel, so nothing here restates a signature):

* ``w4a16_mm_small`` (int4 weight-only, small M: a nibble becomes a bf16 in one bit operation, 32 weights per
  ``vdpbf16ps``), ``w4a16_mm_panel`` (large M: panels of the canonical codes re-laid per thread);
* ``w8a16_mm_vnni`` (int8 weight-only, small M: each activation row as three exact fixed-point digit bytes times the
  int8 weight through VNNI, the weight read in place), ``w8a16_mm_small`` (the same product widening the weight to
  bf16; fp8 weights), ``w8a16_mm_panel`` (large M);
* ``w8a8_mm_small`` / ``w8a8_mm_panel`` (dynamic A8W8: per-row quantization fused, VNNI, the integers of
  ``torch._int_mm``);
* ``w4a8_mm`` (8da4w: int8 codes times 4-bit codes through VNNI, any number of rows);
* ``dequant_w4`` (one-pass int4 -> bf16), ``w4_fits`` / ``panel_fits`` (the shapes the kernels take);
* ``hadamard`` (the online Hadamard transform of activation rows: butterflies and a small mixing factor);
* the generation runtime's steps (``qcal/runtime/csrc``, :mod:`qcal.runtime.ops`): ``decode_attention``,
  ``prefill_attention``, ``add_rmsnorm``, ``rope_store``, ``silu_mul``.

On AVX2/FMA CPUs without AVX512-BF16/VNNI the library holds AVX2 versions of a subset of these (``qcal/kernels/
csrc_avx2``: ``w16a16_mm_small``, ``w8a16_mm_vnni``, ``w8a16_mm_small``, ``w8a8_mm_small``, ``w4_fits``,
``w4a16_mm_small``, ``w4a8_mm``, the weight-only panels ``panel_fits`` / ``w8a16_mm_panel`` / ``w4a16_mm_panel``
and the runtime's steps) with the same schemas, checks and numbers, plus ``w16a16_mm_panel`` (a bf16 weight at
large M: PyTorch's bf16 GEMM is emulated there) and the ``*_multi`` forms of ``w16a16_mm_panel``, ``w8a16_mm_panel``,
``w4a16_mm_panel``, ``w4a8_mm`` and ``w8a8_mm_small`` (several weights on one input in one call, each output the
one-weight operator's: the lean runtime's prefill of q / k / v and gate / up): :func:`has` tells which are
registered, :func:`available` is True only with the full set.

Figures: ``benchmarks/bench_kernels.py``, BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import os

import torch

from .library import available, disabled, has, isa
from .library import status as native_status

__all__ = ["available", "native_status", "disabled", "has", "isa", "pack_int4", "pack_int4_vnni", "pack_scales",
           "w4_fits", "panel_fits", "dequant_int4", "dequant_int8", "int8_row_sums", "amx"]


@functools.cache
def amx() -> bool:
    """Whether PyTorch's bf16 GEMMs run on Intel AMX here (the CPU has AMX-BF16 and PyTorch has oneDNN; the
    environment variable ``QCAL_AMX=0``/``1`` overrides). There a large-``M`` weight-only matmul is fastest as one
    dequantization plus oneDNN's AMX GEMM, 2-7x qcal's AVX512 panel kernels (``benchmarks/bench_kernels.py``)."""
    forced = os.environ.get("QCAL_AMX")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return {"amx_bf16", "amx_tile"} <= set(flags) and torch.backends.mkldnn.is_available()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``(N, K)`` (uint8, 0..15) -> ``w4a16_mm_small``'s layout, ``(N, K/2)`` uint8.

    Blocks of 16 rows; per block, octets of 8 columns as 32 16-bit words, nibble ``q`` of word ``j`` holding
    ``codes[row j // 2, 8 o + 2 q + j % 2]``.
    """
    n, k = codes.shape
    b = codes.view(n // 16, 16, k // 8, 4, 2).to(torch.int32).permute(0, 2, 1, 4, 3)  # [blk, oct, row, e, q]
    words = b[..., 0] | (b[..., 1] << 4) | (b[..., 2] << 8) | (b[..., 3] << 12)
    return words.to(torch.uint16).contiguous().view(torch.uint8).reshape(n, k // 2)


def pack_int4_vnni(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes ``(N, K)`` -> ``w4a8_mm``'s layout, ``(N, K/2)`` uint8.

    Blocks of 16 rows; per block, octets of 8 columns as 64 bytes, row ``r``'s 4 bytes at ``4 r``, byte ``i``
    holding ``codes[r, 8 o + i] | codes[r, 8 o + 4 + i] << 4``.
    """
    n, k = codes.shape
    b = codes.view(n // 16, 16, k // 8, 2, 4)
    packed = b[:, :, :, 0] | (b[:, :, :, 1] << 4)  # [blk, row, oct, i]
    return packed.permute(0, 2, 1, 3).contiguous().view(n, k // 2)


def pack_scales(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Per-group ``scale`` and ``offset`` ``(N, G)`` (``w = (u - 8) * scale - offset``) -> ``(N/16, G, 2, 16)`` bf16.

    Without ``offset`` (a symmetric weight) the scales alone, ``(N/16, G, 1, 16)``: the kernels read the plane of
    offsets only for ``has_zero``, and at group size 32 it would be a tenth of the bytes a decoded token reads.
    """
    n, g = scale.shape
    planes = [scale] if offset is None else [scale, offset]
    sz = torch.stack([p.float().view(n // 16, 16, g) for p in planes], dim=2)
    return sz.permute(0, 3, 2, 1).to(torch.bfloat16).contiguous()


def w4_fits(n: int, k: int, group_size: int) -> bool:
    """Whether ``w4a16_mm_small`` / ``w4a8_mm`` take an ``(n, k)`` weight in groups of ``group_size``."""
    return has("w4_fits") and torch.ops.qcal.w4_fits(n, k, group_size)


def panel_fits(n: int, k: int, group_size: int = 0) -> bool:
    """Whether the panel (large-M) kernels take an ``(n, k)`` weight (int4: in groups of ``group_size``)."""
    return has("panel_fits") and torch.ops.qcal.panel_fits(n, k, group_size)


def dequant_int4(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """The bf16 weight ``(u - 8 - zp) * s`` of canonical packed int4 codes ``(N, K/2)`` in one pass, or None where
    the kernel does not apply (groups not a multiple of 32, not available, tracing): the caller then dequantizes
    with PyTorch ops."""
    k = qweight.shape[1] * 2
    if (k // scale.shape[1]) % 32 or torch.compiler.is_compiling() or qweight.device.type != "cpu" \
            or not has("dequant_w4"):
        return None
    zp = None if zero_point is None else zero_point.float().contiguous()
    return torch.ops.qcal.dequant_w4(qweight.contiguous(), scale.float().contiguous(), zp)


def dequant_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The bf16 weight ``q * s`` of per-channel int8 codes ``(N, K)`` in one pass (fp32 math, rounded once: the
    reference's dequantization), or None where the kernel does not apply."""
    if torch.compiler.is_compiling() or qweight.device.type != "cpu" or not has("dequant_w8") \
            or not qweight.is_contiguous():
        return None
    return torch.ops.qcal.dequant_w8(qweight, scale.reshape(-1).float().contiguous())


def int8_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int32 row sums of an int8 weight ``(N, K)``, which the A8W8 kernels need (they read the weight in
    place)."""
    out = torch.empty(qweight.shape[0], dtype=torch.int32, device=qweight.device)
    for i in range(0, qweight.shape[0], 64):  # in row blocks: a whole-tensor int32 copy would inflate peak memory
        torch.sum(qweight[i:i + 64], dim=1, dtype=torch.int32, out=out[i:i + 64])
    return out
