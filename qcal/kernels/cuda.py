"""CUDA kernels for frozen linear layers: tinygemm int4, ``_weight_int8pack_mm`` and ``_int_mm``.

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

from .common import quantize_per_token
from .cpu import Int4WeightOnly, Int8DynamicInt4, Int8DynamicInt8, Int8WeightOnly

__all__ = ["CudaInt4WeightOnly", "CudaInt8WeightOnly", "CudaInt8DynamicInt8", "CudaInt8DynamicInt4"]


def _inner_k_tiles(k: int) -> int | None:
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


class _CudaInt4:
    device_type = "cuda"

    def supports_int4(self, module) -> bool:
        k = module.qweight.shape[1] * 2
        return super().supports_int4(module) and _inner_k_tiles(k) is not None and module.qweight.shape[0] % 8 == 0

    def pack(self, module) -> torch.Tensor:
        p = module.qweight  # canonical: low nibble = even column; tinygemm wants (even << 4) | odd
        swapped = ((p & 15) << 4) | (p >> 4)
        return torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), _inner_k_tiles(p.shape[1] * 2))

    def int4mm(self, x2, packed, group_size, sz):
        return torch.ops.aten._weight_int4pack_mm(x2, packed, group_size, sz)


class CudaInt4WeightOnly(_CudaInt4, Int4WeightOnly):
    name = "cuda_int4wo"
    max_small_m = 4096


class CudaInt8WeightOnly(Int8WeightOnly):
    name = "cuda_int8wo"
    device_type = "cuda"
    max_small_m = 0  # dequant + GEMM at every M (measured)

    def supports_linear(self, module) -> bool:
        return super().supports_linear(module) and hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _int_mm_padded(xq: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    m = xq.shape[0]
    if m > 16:
        return torch._int_mm(xq, wt)
    return torch._int_mm(F.pad(xq, (0, 0, 0, 32 - m)), wt)[:m]


class CudaInt8DynamicInt8(Int8DynamicInt8):
    name = "cuda_int8dq"
    device_type = "cuda"

    def supports_linear(self, module) -> bool:
        n, k = module.qweight.shape
        return super().supports_linear(module) and n % 8 == 0 and k % 8 == 0

    def large(self, module, x2):
        xq, xs = quantize_per_token(x2)
        acc = _int_mm_padded(xq.to(torch.int8), module.qweight.t())
        return (acc * xs).mul_(module.weight_scale.view(1, -1))


class CudaInt8DynamicInt4(_CudaInt4, Int8DynamicInt4):
    name = "cuda_8da4w"
    max_small_m = 512


KERNELS_CUDA = [CudaInt4WeightOnly(), CudaInt8WeightOnly(), CudaInt8DynamicInt8(), CudaInt8DynamicInt4()]
