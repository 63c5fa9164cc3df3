"""CPU kernels for frozen linear layers: int4/int8 weight-only, A8W8 dynamic and 8da4w.

Small ``M`` (decode) runs the packed weight-only ops (tinygemm int4, ``_weight_int8pack_mm``) in
bf16 -- they are 10-100x slower with fp32 inputs -- and large ``M`` (prefill) dequantizes the
weight once and runs a bf16 GEMM. Dynamic int8 activations take ``torch._int_mm``. On AVX512-BF16/VNNI
CPUs every scheme runs qcal's native kernels (:mod:`qcal.kernels.native`) instead: small-``M`` kernels
reading the weight as it streams, and for large ``M`` panel kernels that re-lay a few rows of the
canonical weight at a time for many input rows (A8W8 1.3-2x bf16 at M >= 16, where ``_int_mm`` falls
to 0.3-1.3x; weight-only on par with bf16, ahead of dequantize + GEMM). ``max_small_m`` crossovers were
measured with ``benchmarks/bench_kernels.py --crossover`` on 2 AVX512 cores (torch 2.13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qtypes import qint4, qint8
from . import native
from .common import (
    LinearKernel,
    dequant_int4,
    int4_codes_u8,
    quantize_per_token,
    set_derived,
    tinygemm_group_size,
    tinygemm_scales_zeros,
)

__all__ = ["Int4WeightOnly", "Int8WeightOnly", "Int8DynamicInt8", "Int8DynamicInt4", "Int4WeightOnlyNative",
           "Int8DynamicInt4Native", "Int8DynamicInt8Native", "Int8WeightOnlyNative"]


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
        if x2.shape[1] % 32:  # _weight_int8pack_mm returns garbage (M=1) or crashes (M=2..16) for these K
            return self.large(module, x2)
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


def _panel_input(x2: torch.Tensor) -> bool:
    """Whether the large-M native panel kernels take this input (eager bf16 CPU rows)."""
    return x2.dtype is torch.bfloat16 and x2.is_cpu and not torch.compiler.is_compiling() and native.available()


class _NativeFast:
    """Eager bf16 small-M calls straight into a native kernel (``fast_mm``), skipping the generic plumbing of
    :class:`LinearKernel` (~10 us less per call: eager decode is per-call overhead bound)."""

    def __call__(self, module, x):
        y = self.native_fast(module, x)
        return super().__call__(module, x) if y is None else y

    def native_fast(self, module, x: torch.Tensor) -> torch.Tensor | None:
        """The output, or None where the fast path does not apply (dtype, device, M, tracing)."""
        if x.dtype is not torch.bfloat16 or not x.is_cpu or torch.compiler.is_compiling():
            return None
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] > self.max_small_m or not x2.is_contiguous():
            return None
        y = self.fast_mm(module, x2)
        bias = module._parameters.get("bias")
        if bias is not None:
            y = (y + bias).to(torch.bfloat16)
        return y.view(*shape[:-1], y.shape[-1])


class _Int4Native(_NativeFast):
    """qcal's AVX512-BF16 small-M int4 kernel (:mod:`qcal.kernels.native`) on derived ``_k_n4w``/``_k_n4sz``."""

    small_path = "qcal avx512-bf16 int4 mm"
    pack = staticmethod(native.pack_int4)  # the weight layout the kernel reads

    def supports_native(self, module) -> bool:
        """Shapes the kernel takes, with tinygemm's group sizes (others keep the exact reference path)."""
        n, k = module.qweight.shape[0], module.qweight.shape[1] * 2
        groups = module.weight_scale.shape[1]
        return (module.weight_spec.qtype == qint4 and (groups == 1 or k // groups in (32, 64, 128, 256))
                and native.supports_shape(n, k, k // groups) and native.available())

    @torch.no_grad()
    def prepare(self, module) -> None:
        s, zp = module.weight_scale, module.weight_zero_point
        module._k_group = module.qweight.shape[1] * 2 // s.shape[1]
        module._k_has_zero = zp is not None
        set_derived(module, "_k_n4w", self.pack(int4_codes_u8(module.qweight)))
        set_derived(module, "_k_n4sz", native.pack_scales(s, None if zp is None else zp.float() * s.float()))

    def native_mm(self, module, xb: torch.Tensor) -> torch.Tensor:
        return native.int4_mm_small(xb, module._k_n4w, module._k_n4sz, module._k_has_zero, module._k_group)

    def fast_mm(self, module, x2: torch.Tensor) -> torch.Tensor:
        b, d = module._buffers, module.__dict__
        return native.mm_unchecked(x2, b["_k_n4w"], b["_k_n4sz"], d["_k_has_zero"], d["_k_group"])


class Int4WeightOnlyNative(_Int4Native, Int4WeightOnly):
    """A16W4 on AVX512-BF16 CPUs: qcal's native kernel for small M, its panel kernel above (bf16 inputs)."""

    name = "cpu_int4wo_native"
    max_small_m = 64  # vs the panel kernel: small wins to M=64, panel from 128 (bench_kernels --crossover)
    large_path = "qcal panel int4 mm (bf16 inputs; else dequant+bf16 mm)"

    def supports_linear(self, module) -> bool:
        return _weight_only(module) and self.supports_native(module)

    def small(self, module, x2):
        return self.native_mm(module, x2)

    def large(self, module, x2):
        s, zp = module.weight_scale, module.weight_zero_point
        n, k = module.qweight.shape[0], module.qweight.shape[1] * 2
        if _panel_input(x2) and native.panel_supported(n, k, k // s.shape[1]):
            return native.w4_mm_panel(x2.contiguous(), module.qweight.contiguous(), s.float().contiguous(),
                                      None if zp is None else zp.float().contiguous(), k // s.shape[1])
        return super().large(module, x2)


class Int8DynamicInt4Native(_Int4Native, Int8DynamicInt4):
    """8da4w on AVX512-VNNI CPUs: bf16 rows quantized inside qcal's native kernel, int8 codes times the 4-bit
    codes through VNNI (exact integer sums, one rounding); fp32 inputs take the dequantize + GEMM path."""

    name = "cpu_8da4w_native"
    max_small_m = 1 << 30  # ahead of dequant + bf16 GEMM at every M measured, to 2048 (bench_kernels --crossover)
    small_path = "qcal avx512-vnni int8 x int4 mm, row quantization fused"
    pack = staticmethod(native.pack_int4_vnni)

    def supports_linear(self, module) -> bool:
        return _dynamic_int8_sym(module) and module.weight_zero_point is None and self.supports_native(module)

    @property
    def dispatch(self) -> str:
        return f"bf16 inputs, any M: {self.small_path} | fp32 inputs: {self.large_path}"

    def fast_mm(self, module, x2: torch.Tensor) -> torch.Tensor:
        b = module._buffers
        return native.mm4q8_unchecked(x2, b["_k_n4w"], b["_k_n4sz"], module.__dict__["_k_group"])

    def small(self, module, x2):
        if x2.dtype != torch.bfloat16:
            return self.large(module, x2)
        return native.int4_mm_q8(x2, module._k_n4w, module._k_n4sz, module._k_group)


class _Int8Native(_NativeFast):
    """qcal's native int8 kernels read ``qweight`` in place; they need the weight scales as float32."""

    def supports_linear(self, module) -> bool:
        return super().supports_linear(module) and module.qweight.is_contiguous() and native.available()

    @torch.no_grad()
    def prepare(self, module) -> None:
        # float32 scales kept as their int32 bit patterns, so that model.to(dtype) leaves them alone
        set_derived(module, "_k_i8ws", module.weight_scale.reshape(-1).float().contiguous().view(torch.int32))


class Int8DynamicInt8Native(_Int8Native, Int8DynamicInt8):
    """A8W8 on AVX512-VNNI CPUs: bf16 rows quantized inside qcal's native int8 kernel (same codes and
    integer sums as ``quantize_per_token`` + ``_int_mm``, one rounding), for small M; the panel kernel above (the
    same integers; ``_int_mm`` for fp32 inputs)."""

    name = "cpu_int8dq_native"
    max_small_m = 8  # vs the panel kernel: small wins to M=8, panel from 16 (bench_kernels --crossover)
    small_path = "qcal avx512-vnni int8 mm, row quantization fused (bf16 inputs)"
    large_path = "qcal panel avx512-vnni int8 mm (bf16 inputs; else per-token quant + _int_mm + rescale)"

    def large(self, module, x2):
        if _panel_input(x2) and native.panel_supported(*module.qweight.shape):
            b = module._buffers
            return native.a8w8_mm_panel(x2.contiguous(), b["qweight"], b["_k_i8sum"], b["_k_i8ws"].view(torch.float32))
        return super().large(module, x2)

    @torch.no_grad()
    def prepare(self, module) -> None:
        super().prepare(module)
        set_derived(module, "_k_i8sum", native.int8_row_sums(module.qweight))

    def fast_mm(self, module, x2: torch.Tensor) -> torch.Tensor:
        b = module._buffers
        return native.mm8_unchecked(x2, b["qweight"], b["_k_i8sum"], b["_k_i8ws"])

    def small(self, module, x2):
        if x2.dtype != torch.bfloat16:  # fp32 models keep the exact fp32 rescale of the reference
            return self.large(module, x2)
        b = module._buffers
        return native.int8_mm_q8(x2, b["qweight"], b["_k_i8sum"], b["_k_i8ws"].view(torch.float32))


class Int8WeightOnlyNative(_Int8Native, Int8WeightOnly):
    """A16W8 on AVX512-BF16 CPUs: qcal's native kernel reads the int8 weight in place (bf16 activations)."""

    name = "cpu_int8wo_native"
    max_small_m = 4  # vs the panel kernel: small wins to M=4, panel from 8 on 3 of 4 shapes (bench_kernels --crossover)
    small_path = "qcal avx512-bf16 int8 mm (weight in place)"
    large_path = "qcal panel avx512-bf16 int8 mm (bf16 inputs; else dequant+bf16 mm)"

    def large(self, module, x2):
        if _panel_input(x2) and native.panel_supported(*module.qweight.shape):
            b = module._buffers
            return native.w8_mm_panel(x2.contiguous(), b["qweight"], b["_k_i8ws"].view(torch.float32))
        return super().large(module, x2)

    def fast_mm(self, module, x2: torch.Tensor) -> torch.Tensor:
        b = module._buffers
        return native.mm8wo_unchecked(x2, b["qweight"], b["_k_i8ws"])

    def small(self, module, x2):
        b = module._buffers
        return native.int8wo_mm(x2, b["qweight"], b["_k_i8ws"].view(torch.float32))


KERNELS_CPU = [Int4WeightOnlyNative(), Int8DynamicInt4Native(), Int8DynamicInt8Native(), Int8WeightOnlyNative(),
               Int4WeightOnly(), Int8WeightOnly(), Int8DynamicInt8(), Int8DynamicInt4()]
