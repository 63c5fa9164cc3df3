"""CPU kernels for frozen linear layers: int4/int8 weight-only, A8W8 dynamic and 8da4w.

Small ``M`` (decode) runs the packed weight-only ops (tinygemm int4, ``_weight_int8pack_mm``) in
bf16 -- they are 10-100x slower with fp32 inputs -- and large ``M`` (prefill) dequantizes the
weight once and runs a bf16 GEMM. Dynamic int8 activations always take ``torch._int_mm`` (the
int8 GEMM stays faster than bf16 at every ``M`` on AVX512-VNNI). ``max_small_m`` crossovers were
measured with ``benchmarks/bench_kernels.py`` on 2 AVX512 cores (torch 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import qint4, qint8
from .common import (
    LinearKernel,
    dequant_int4,
    int4_codes_u8,
    quantize_per_token,
    set_derived,
    tinygemm_group_size,
    tinygemm_scales_zeros,
)

__all__ = ["Int4WeightOnly", "Int8WeightOnly", "Int8DynamicInt8", "Int8DynamicInt4"]


def _weight_only(module) -> bool:
    return module.act_spec is None


def _dynamic_int8_sym(module) -> bool:
    a = module.act_spec
    return a is not None and a.dynamic and a.symmetric and a.qtype == qint8


def _per_channel_sym_int8(module) -> bool:
    return (module.weight_spec.qtype == qint8 and module.weight_zero_point is None
            and module.weight_scale.shape[1] == 1)


class _Int4Packed(LinearKernel):
    """tinygemm int4 layout derived once at ``prepare`` (``_k_int4pack``, ``_k_int4sz``)."""

    def supports_int4(self, module) -> bool:
        return (module.weight_spec.qtype == qint4 and module.qweight.shape[0] % 16 == 0
                and tinygemm_group_size(module) is not None)

    def pack(self, module) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes_u8(module.qweight).to(torch.int32), 2)

    def int4mm(self, x2: torch.Tensor, packed, group_size: int, sz: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, sz)

    @torch.no_grad()
    def prepare(self, module) -> None:
        g = tinygemm_group_size(module)
        module._k_group = g
        set_derived(module, "_k_int4pack", self.pack(module))
        set_derived(module, "_k_int4sz", tinygemm_scales_zeros(module, g, torch.bfloat16))

    def tinygemm(self, module, xb: torch.Tensor) -> torch.Tensor:
        sz = module._k_int4sz
        if sz.dtype != xb.dtype:  # the model was cast after freeze
            sz = sz.to(xb.dtype)
        return self.int4mm(xb, module._k_int4pack, module._k_group, sz)


class Int4WeightOnly(_Int4Packed):
    """A16W4 (asymmetric or symmetric, grouped or per channel): tinygemm for small M, dequant+GEMM above."""

    name = "cpu_int4wo"
    max_small_m = 64
    small_path = "tinygemm int4pack_mm"
    large_path = "dequant+bf16 mm"

    def supports_linear(self, module) -> bool:
        return _weight_only(module) and self.supports_int4(module)

    def small(self, module, x2):
        return self.tinygemm(module, x2)

    def large(self, module, x2):
        return F.linear(x2, dequant_int4(module, x2.dtype))


class Int8WeightOnly(LinearKernel):
    """A16W8 per-channel symmetric: ``_weight_int8pack_mm`` on the canonical int8 weight (no copy)."""

    name = "cpu_int8wo"
    max_small_m = 16
    small_path = "int8pack_mm"
    large_path = "dequant+bf16 mm"

    def supports_linear(self, module) -> bool:
        return _weight_only(module) and _per_channel_sym_int8(module)

    def small(self, module, x2):
        s = module.weight_scale.view(-1)
        return torch.ops.aten._weight_int8pack_mm(x2, module.qweight, s if s.dtype == x2.dtype else s.to(x2.dtype))

    def large(self, module, x2):
        return F.linear(x2, module.qweight * module.weight_scale.to(x2.dtype))


class Int8DynamicInt8(LinearKernel):
    """A8W8: per-token symmetric int8 activations x per-channel int8 weights, ``_int_mm`` + rescale."""

    name = "cpu_int8dq"
    compute_dtype = None
    small_path = large_path = "per-token quant + _int_mm(int8, int8^T view) + rescale"

    def supports_linear(self, module) -> bool:
        return _dynamic_int8_sym(module) and _per_channel_sym_int8(module)

    def large(self, module, x2):
        xq, xs = quantize_per_token(x2)
        acc = torch._int_mm(xq.to(torch.int8), module.qweight.t())
        return (acc * xs).mul_(module.weight_scale.view(1, -1))


class Int8DynamicInt4(_Int4Packed):
    """8da4w: per-token int8 activations x symmetric int4 grouped weights.

    The int8 codes are exact in bf16, so the product runs through the int4 weight-only paths
    on the integer activations and is rescaled per token afterwards.
    """

    name = "cpu_8da4w"
    compute_dtype = None
    max_small_m = 64
    small_path = "per-token quant + tinygemm int4pack_mm"
    large_path = "per-token quant + dequant+bf16 mm"

    def supports_linear(self, module) -> bool:
        return (_dynamic_int8_sym(module) and module.weight_zero_point is None and self.supports_int4(module))

    def small(self, module, x2):
        xq, xs = quantize_per_token(x2)
        return self.tinygemm(module, xq.to(torch.bfloat16)) * xs

    def large(self, module, x2):
        xq, xs = quantize_per_token(x2)
        return F.linear(xq.to(torch.bfloat16), dequant_int4(module, torch.bfloat16)) * xs


KERNELS_CPU = [Int4WeightOnly(), Int8WeightOnly(), Int8DynamicInt8(), Int8DynamicInt4()]
