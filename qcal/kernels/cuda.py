"""CUDA tables of the frozen linear layers: tinygemm int4, ``_weight_int8pack_mm`` and ``_int_mm``.

Same dispatch as :mod:`qcal.kernels.cpu`; only the packing and the ops differ. ``_int_mm`` on
CUDA needs ``M > 16`` and ``K``, ``N`` multiples of 8, so small inputs are zero-padded to 32 rows.
Crossovers measured on an H100 (torch 2.11, ``benchmarks/bench_kernels.py --device cuda --crossover``,
SmolLM2-135M's layer shapes): at these sizes every call is launch-bound, so the path with fewer
kernel launches wins -- tinygemm for int4 weight-only at every M measured (up to 2048), for 8da4w up
to M=512 (dequantize + GEMM at 2048), dequantize + GEMM for int8 weight-only (``_weight_int8pack_mm``
was 1.4x slower at M=1). Tests in ``tests/test_cuda.py`` run where a GPU is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import qint4
from .common import dequant_int4, quantize_per_token, tinygemm_group_size, tinygemm_scales_zeros
from .cpu import dequant_a8, dynamic_int8, per_channel_int8, per_token_int8, tinygemm_int4, weight_only
from .table import Impl, Layout, LinearTable

__all__ = ["TABLES_CUDA"]


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def _tinygemm_cuda(m) -> bool:
    k = m.qweight.shape[1] * 2
    return tinygemm_int4(m) and _inner_k_tiles(k) is not None and m.qweight.shape[0] % 8 == 0


def _pack(m) -> dict:
    p = m.qweight  # canonical: low nibble = even column; tinygemm wants (even << 4) | odd
    swapped = ((p & 15) << 4) | (p >> 4)
    g = tinygemm_group_size(m)
    return {"_k_int4pack": torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(),
                                                                      _inner_k_tiles(p.shape[1] * 2)),
            "_k_int4sz": tinygemm_scales_zeros(m, g, torch.bfloat16), "_k_group": g}


TINYGEMM_CUDA = Layout("tinygemm int4pack (CUDA)", _pack)


def _tinygemm_mm(m, xb):
    b = m._buffers
    return torch.ops.aten._weight_int4pack_mm(xb, b["_k_int4pack"], m.__dict__["_k_group"], b["_k_int4sz"])




def _int_mm_padded(m, x2):
    xq, xs = quantize_per_token(x2)
    xq = xq.to(torch.int8)
    rows = xq.shape[0]
    acc = torch._int_mm(xq, m.qweight.t()) if rows > 16 else \
        torch._int_mm(F.pad(xq, (0, 0, 0, 32 - rows)), m.qweight.t())[:rows]
    return (acc * xs).mul_(m.weight_scale.view(1, -1))


TABLES_CUDA = [
    LinearTable("int4wo", "cuda", lambda m: weight_only(m) and m.weight_spec.qtype == qint4, (
        Impl("tinygemm int4pack_mm", _tinygemm_mm, fits=_tinygemm_cuda, max_m=4096, layout=TINYGEMM_CUDA),
        Impl("dequant + bf16 mm", lambda m, x2: F.linear(x2, dequant_int4(m, x2.dtype)), fits=_tinygemm_cuda),
    ), compute_dtype=torch.bfloat16),
    LinearTable("8da4w", "cuda", lambda m: dynamic_int8(m) and m.weight_zero_point is None
                and m.weight_spec.qtype == qint4, (
        Impl("per-token quant + tinygemm int4pack_mm", per_token_int8(_tinygemm_mm), fits=_tinygemm_cuda, max_m=512,
             layout=TINYGEMM_CUDA),
        Impl("per-token quant + dequant + bf16 mm", dequant_a8, fits=_tinygemm_cuda),
    )),
    LinearTable("int8dq", "cuda", lambda m: dynamic_int8(m) and per_channel_int8(m), (
        Impl("per-token quant + _int_mm (padded to 32 rows) + rescale", _int_mm_padded,
             fits=lambda m: m.qweight.shape[0] % 8 == 0 and m.qweight.shape[1] % 8 == 0),
    )),
    LinearTable("int8wo", "cuda", lambda m: weight_only(m) and per_channel_int8(m), (
        Impl("dequant + bf16 mm", lambda m, x2: F.linear(x2, m.qweight * m.weight_scale.to(x2.dtype))),
    ), compute_dtype=torch.bfloat16),
]
