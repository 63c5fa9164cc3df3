"""CPU tables of the frozen linear layers: int4 / int8 / fp8 weight-only, dynamic A8W8 and 8da4w.

On AVX512-BF16/VNNI CPUs qcal's native operators (:mod:`qcal.kernels.native`) come first: small-``M`` (decode)
kernels reading the weight as it streams, and for large ``M`` (prefill) panel kernels that re-lay a few rows of the
canonical weight at a time. On AVX2/FMA CPUs without them, the AVX2 library's small-``M`` kernels (int8 / int4 / fp8 /
fp6-fp4 weight-only, A8W8), its 8da4w kernel (every ``M``) and its panels (bf16, int8, int4, grouped int8, fp8,
fp6-fp4), with the same layouts and results. int8 weights in groups run qcal's grouped kernel from either library.
Elsewhere PyTorch's ops: tinygemm int4 and ``_weight_int8pack_mm`` in bf16 for small ``M`` (10-100x slower with fp32
inputs), dequantize + GEMM above, ``torch._int_mm`` for dynamic int8 activations. The ``max_m`` crossovers were
measured with ``benchmarks/bench_kernels.py --crossover`` on 2 AVX512 cores.
"""

from __future__ import annotations

import torch

from ..qtypes import qfloat8_e4m3fn, qint4, qint8
from . import native
from .common import dequant_int4, int4_codes_u8, linear, quantize_per_token, tinygemm_group_size, tinygemm_scales_zeros
from .table import Impl, Layout, LinearTable

__all__ = ["TABLES_CPU", "weight_only", "dynamic_int8", "per_channel_int8", "tinygemm_int4", "per_token_int8",
           "dequant_a8"]

_BF16 = (torch.bfloat16,)
W8G_MAX_M = 32  # the grouped int8 kernel vs dequantize + GEMM (Zen 3: even at M = 48, ahead below)


# ---------------------------------------------------------------------------- what a module is


def weight_only(m) -> bool:
    return m.act_spec is None


def dynamic_int8(m) -> bool:
    a = m.act_spec
    return a is not None and a.dynamic and a.per_token and a.symmetric and a.qtype == qint8


def per_channel_int8(m) -> bool:
    return m.weight_spec.qtype == qint8 and m.weight_zero_point is None and m.weight_scale.shape[1] == 1


def _shape(m) -> tuple[int, int, int]:
    """``(N, K, group size)`` of a frozen linear (per channel: K)."""
    n, k = m.weight_shape[0], m.weight_shape[1]
    return n, k, k // m.weight_scale.shape[1]


def dynamic_fp8(m) -> bool:
    a = m.act_spec
    return a is not None and a.dynamic and a.qtype == qfloat8_e4m3fn


def per_channel_fp8(m) -> bool:
    return m.weight_spec.qtype == qfloat8_e4m3fn and m.weight_zero_point is None and m.weight_scale.shape[1] == 1


def subbyte_float(m) -> bool:
    return m.weight_spec.qtype.is_subbyte_float and m.weight_zero_point is None


def _fpx_fits(m) -> bool:
    n, k, g = _shape(m)
    return k % 32 == 0 and g % 32 == 0 and m.qweight.is_contiguous()


def _native_fpx(m) -> bool:
    return _fpx_fits(m) and native.available()


def tinygemm_int4(m) -> bool:
    return m.weight_spec.qtype == qint4 and m.qweight.shape[0] % 16 == 0 and tinygemm_group_size(m) is not None


def _native_int4(m) -> bool:
    """The native int4 kernels take this layer (tinygemm's group sizes; others keep the exact reference path)."""
    n, k, g = _shape(m)
    return (m.weight_spec.qtype == qint4 and (m.weight_scale.shape[1] == 1 or g in (32, 64, 128, 256))
            and native.w4_fits(n, k, g))


def _native_int8(m) -> bool:
    return m.qweight.is_contiguous() and native.available()


# ---------------------------------------------------------------------------- layouts


def _tinygemm(m) -> dict:
    g = tinygemm_group_size(m)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_codes_u8(m.qweight).to(torch.int32), 2)
    return {"_k_int4pack": packed, "_k_int4sz": tinygemm_scales_zeros(m, g, torch.bfloat16), "_k_group": g}


def _native_w4(pack):
    def derive(m) -> dict:
        s, zp = m.weight_scale, m.weight_zero_point
        return {"_k_n4w": pack(int4_codes_u8(m.qweight)), "_k_group": _shape(m)[2], "_k_has_zero": zp is not None,
                "_k_n4sz": native.pack_scales(s, None if zp is None else zp.float() * s.float())}
    return derive


def _int8_scales(m) -> dict:
    return {"_k_i8ws": m.weight_scale.reshape(-1).float().contiguous()}


def _int8_scales_sums(m) -> dict:
    return {**_int8_scales(m), "_k_i8sum": native.int8_row_sums(m.qweight)}


def _int8_group_scales(m) -> dict:
    s, zp = m.weight_scale.float(), m.weight_zero_point
    return {"_k_w8gsz": (s[None] if zp is None else torch.stack([s, zp.float()])).contiguous(),
            "_k_has_zero": zp is not None, "_k_group": _shape(m)[2]}


def _fpx_tables(m) -> dict:
    from ..primitives import float_grid

    return {"_k_fxws": m.weight_scale.float().contiguous(),
            "_k_fxlut": float_grid(m.weight_spec.qtype, m.qweight.device).to(torch.bfloat16)}


TINYGEMM = Layout("tinygemm int4pack", _tinygemm)
NATIVE_W4 = Layout("qcal int4 (vdpbf16ps order)", _native_w4(native.pack_int4))
NATIVE_W4_VNNI = Layout("qcal int4 (vpdpbusd order)", _native_w4(native.pack_int4_vnni))
INT8_SCALES = Layout("float32 weight scales", _int8_scales)
INT8_SCALES_SUMS = Layout("float32 weight scales + int32 row sums", _int8_scales_sums)
FP8DQ_SCALES = Layout("float32 weight scales + unit scales for the code product",
                      lambda m: {**_int8_scales(m), "_k_ones": torch.ones(m.weight_shape[0], device=m.qweight.device)})
INT8_GROUP_SCALES = Layout("float32 group scales (+ zero-points)", _int8_group_scales)
FPX_TABLES = Layout("float32 weight scales + the format's bf16 value table", _fpx_tables)


# ---------------------------------------------------------------------------- implementations


def _w4a16_args(m) -> tuple:
    b, d = m._buffers, m.__dict__
    return b["_k_n4w"], b["_k_n4sz"], d["_k_has_zero"], d["_k_group"]


def _w4a16_panel_args(m) -> tuple:
    zp = m.weight_zero_point
    return m.qweight, m.weight_scale.float().contiguous(), None if zp is None else zp.float().contiguous()


def _w4a16_panel(m, x2):
    return torch.ops.qcal.w4a16_mm_panel(x2, *_w4a16_panel_args(m), _shape(m)[2])


def _w4a8_args(m) -> tuple:
    b = m._buffers
    return b["_k_n4w"], b["_k_n4sz"], m.__dict__["_k_group"]


def _tinygemm_mm(m, xb):
    b = m._buffers
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, b["_k_int4pack"], m.__dict__["_k_group"], b["_k_int4sz"])


def per_token_int8(mm):
    """8da4w from an int4 product: ``mm(module, codes)`` on the input's per-token int8 codes (exact in bf16),
    rescaled per row."""
    def run(m, x2):
        xq, xs = quantize_per_token(x2)
        return mm(m, xq.to(torch.bfloat16)) * xs
    return run


def _dequant_mm(m, x2):
    return linear(x2, dequant_int4(m, x2.dtype))


_tinygemm_a8 = per_token_int8(_tinygemm_mm)
dequant_a8 = per_token_int8(_dequant_mm)


def _int8_sums_args(m) -> tuple:
    b = m._buffers
    return b["qweight"], b["_k_i8sum"], b["_k_i8ws"]


def _w8a16_panel_args(m) -> tuple:
    b = m._buffers
    return b["qweight"], b["_k_i8ws"]


def _w8a16_panel(m, x2):
    return torch.ops.qcal.w8a16_mm_panel(x2, *_w8a16_panel_args(m))


def _wf8a16_args(m) -> tuple:
    return m.qweight, m._buffers["_k_i8ws"]


def _dequant_weight_mm(m, x2):
    """The module's dequantized weight (its codes' values times the scales, rounded once) into a GEMM."""
    return linear(x2, m.dequantized_weight(x2.dtype))


def _fp8_codes(m, x2):
    """Float8 e4m3 codes of ``x2`` (as ``x2``'s dtype: exact in bf16) and their float32 scales, (M, 1) per row or
    (1, 1) per tensor (the module's spec): the reference's dynamic quantization (``amax / 448``); a row (per
    tensor: any element) holding NaN or Inf gives non-finite output rows."""
    xf = x2.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if m.act_spec.per_token else xf.abs().amax().view(1, 1)
    s = (amax / 448.0).clamp_min(torch.finfo(torch.float32).tiny)
    return (xf / s).clamp_(-448.0, 448.0).to(qfloat8_e4m3fn.dtype).to(x2.dtype), s


# fp8dq: the code product rounded to bf16 once, then both scales in fp32, rounded once more -- the same numbers
# from the native operator (the quantization above, the fp8 kernel on the codes with unit scales and the rescale in
# one call) and from a bf16 GEMM on the codes, so every M computes alike.
def _wf8a8_args(m) -> tuple:
    return m.qweight, m._buffers["_k_i8ws"], bool(m.act_spec.per_token)


def _fp8dq_panel(m, x2):
    xq, s = _fp8_codes(m, x2)
    y = torch.ops.qcal.wf8a16_mm_panel(xq, m.qweight, m._buffers["_k_ones"])
    return (y.float() * m._buffers["_k_i8ws"] * s).to(x2.dtype)


def _fp8dq_dequant(m, x2):
    xq, s = _fp8_codes(m, x2)
    y = linear(xq, m.qweight.to(x2.dtype))
    return (y.float() * m.weight_scale.float().view(1, -1) * s).to(x2.dtype)


def _w8g_args(m) -> tuple:
    d = m.__dict__
    return m.qweight, m._buffers["_k_w8gsz"], d["_k_has_zero"], d["_k_group"]


def _w8g_panel(m, x2):
    return torch.ops.qcal.w8a16_group_mm_panel(x2, *_w8g_args(m))


def _wf8a16_panel(m, x2):
    return torch.ops.qcal.wf8a16_mm_panel(x2, m.qweight, m._buffers["_k_i8ws"])


def _native_int8_group(m) -> bool:
    """The grouped int8 kernel takes this layer: int8 codes read in place, groups of a multiple of 32 columns."""
    n, k, g = _shape(m)
    return m.qweight.dtype == torch.int8 and m.qweight.is_contiguous() and g % 32 == 0 and k % g == 0


def _wfx_args(m) -> tuple:
    b = m._buffers
    return m.qweight, b["_k_fxws"], b["_k_fxlut"], m.weight_spec.qtype.bits


def _wfx_panel(m, x2):
    return torch.ops.qcal.wfx_mm_panel(x2, *_wfx_args(m))


def _int8pack_mm(m, x2):
    s = m.weight_scale.view(-1)
    return torch.ops.aten._weight_int8pack_mm(x2, m.qweight, s if s.dtype == x2.dtype else s.to(x2.dtype))


def _dequant_int8(m, x2):
    return linear(x2, m.qweight * m.weight_scale.to(x2.dtype))


def _native_dequant_int8(m, x2):
    return linear(x2, torch.ops.qcal.dequant_w8(m.qweight, m._buffers["_k_i8ws"]))


def _w8a8_panel(m, x2):
    b = m._buffers
    return torch.ops.qcal.w8a8_mm_panel(x2, b["qweight"], b["_k_i8sum"], b["_k_i8ws"])


def _int_mm(m, x2):
    xq, xs = quantize_per_token(x2)
    acc = torch._int_mm(xq.to(torch.int8), m.qweight.t())
    return (acc * xs).mul_(m.weight_scale.view(1, -1))


def _panel(m) -> bool:
    n, k, g = _shape(m)
    return native.panel_fits(n, k, g if m.weight_spec.qtype == qint4 else 0)


def _amx(m) -> bool:
    """PyTorch's bf16 GEMM runs on AMX here: weight-only layers dequantize for large M (see :func:`native.amx`)."""
    return native.amx()


def _op_run(direct: tuple):
    """The ``run`` of a row that is one qcal operator, ``direct = (name, args)``: ``op(x2, *args(module))``."""
    name, args = direct

    def run(m, x2):
        return getattr(torch.ops.qcal, name)(x2, *args(m))
    return run


_W4A16 = ("w4a16_mm_small", _w4a16_args)
_W4A8 = ("w4a8_mm", _w4a8_args)
_W8A8 = ("w8a8_mm_small", _int8_sums_args)
_W8A16 = ("w8a16_mm_vnni", _int8_sums_args)
_WF8A16 = ("wf8a16_mm_small", _wf8a16_args)
_WFX = ("wfx_mm_small", _wfx_args)
_W8G = ("w8a16_group_mm", _w8g_args)
_WF8A8 = ("wf8a8_mm", _wf8a8_args)
_w4a16_small, _w4a8, _w8a8_small = _op_run(_W4A16), _op_run(_W4A8), _op_run(_W8A8)
_w8a16_vnni, _wf8a16_small, _wfx_small, _w8g = _op_run(_W8A16), _op_run(_WF8A16), _op_run(_WFX), _op_run(_W8G)
_wf8a8 = _op_run(_WF8A8)

# Rows in order of preference. ``native=True`` rows need qcal's AVX-512 library, ``native="<operator>"`` rows the
# AVX2 library with that operator; a layer no row fits keeps the reference
# kernel (int4: the group sizes of tinygemm or the native kernels).
INT4WO = LinearTable("int4wo", "cpu", lambda m: weight_only(m) and m.weight_spec.qtype == qint4, (
    # vs the panel kernel: small wins to M=64, panel from 128
    Impl("qcal avx512-bf16 int4 mm", _w4a16_small, native=True, fits=lambda m: _native_int4(m) and not _amx(m),
         dtypes=_BF16, max_m=64, layout=NATIVE_W4, direct=_W4A16),
    # AMX: one dequantization + oneDNN's GEMM from M=32
    Impl("qcal avx512-bf16 int4 mm", _w4a16_small, native=True, fits=lambda m: _native_int4(m) and _amx(m),
         dtypes=_BF16, max_m=16, layout=NATIVE_W4, direct=_W4A16),
    Impl("qcal panel int4 mm", _w4a16_panel, native=True,
         fits=lambda m: _native_int4(m) and _panel(m) and not _amx(m), dtypes=_BF16, eager=True),
    # vs the AVX2 panel kernel: small wins to M=32, panel from 48
    Impl("qcal avx2 int4 mm", _w4a16_small, native="w4a16_mm_small", fits=_native_int4, dtypes=_BF16, max_m=32,
         layout=NATIVE_W4, direct=_W4A16),
    Impl("qcal panel avx2 int4 mm", _w4a16_panel, native="w4a16_mm_panel",
         fits=lambda m: _native_int4(m) and _panel(m), dtypes=_BF16, eager=True,
         multi=("w4a16_mm_panel_multi", _w4a16_panel_args, lambda m: (_shape(m)[2],))),
    Impl("tinygemm int4pack_mm", _tinygemm_mm, fits=lambda m: tinygemm_int4(m) and not _native_int4(m), max_m=64,
         layout=TINYGEMM),
    Impl("dequant + bf16 mm", _dequant_mm, fits=lambda m: tinygemm_int4(m) or _native_int4(m)),
), compute_dtype=torch.bfloat16)

INT8DA_INT4 = LinearTable("8da4w", "cpu", lambda m: dynamic_int8(m) and m.weight_zero_point is None
                          and m.weight_spec.qtype == qint4, (
    Impl("qcal avx512-vnni int8 x int4 mm, row quantization fused", _w4a8, native=True, fits=_native_int4,
         dtypes=_BF16, layout=NATIVE_W4_VNNI, direct=_W4A8),  # ahead of dequantize + GEMM at every M measured, to 2048
    Impl("qcal avx2 int8 x int4 mm, row quantization fused", _w4a8, native="w4a8_mm", fits=_native_int4,
         dtypes=_BF16, layout=NATIVE_W4_VNNI, direct=_W4A8,
         multi=("w4a8_mm_multi", lambda m: _w4a8_args(m)[:2], lambda m: (m.__dict__["_k_group"],))),
    Impl("per-token quant + tinygemm int4pack_mm", _tinygemm_a8, max_m=64, layout=TINYGEMM,
         fits=lambda m: tinygemm_int4(m) and not _native_int4(m)),  # native layers' fp32 inputs: dequantize
    Impl("per-token quant + dequant + bf16 mm", dequant_a8, fits=lambda m: tinygemm_int4(m) or _native_int4(m)),
))

INT8WO = LinearTable("int8wo", "cpu", lambda m: weight_only(m) and per_channel_int8(m), (
    Impl("qcal avx512-vnni int8 mm (weight in place, activations as exact fixed-point digits)", _w8a16_vnni,
         native=True, fits=_native_int8, dtypes=_BF16, max_m=4, layout=INT8_SCALES_SUMS,
         direct=_W8A16),  # panel from 8
    Impl("qcal panel avx512-bf16 int8 mm", _w8a16_panel, native=True,
         fits=lambda m: _native_int8(m) and _panel(m) and not _amx(m), dtypes=_BF16, eager=True, layout=INT8_SCALES),
    Impl("qcal panel avx512-bf16 int8 mm", _w8a16_panel, native=True,
         fits=lambda m: _native_int8(m) and _panel(m) and _amx(m), dtypes=_BF16, eager=True, max_m=32,
         layout=INT8_SCALES),  # AMX: one dequantization + oneDNN's GEMM from M=64
    Impl("qcal int8 dequant + bf16 mm", _native_dequant_int8, native=True, fits=_native_int8, dtypes=_BF16,
         eager=True, layout=INT8_SCALES),
    Impl("qcal avx2 int8 mm (weight in place, activations as exact fixed-point digits)", _w8a16_vnni,
         native="w8a16_mm_vnni", fits=lambda m: m.qweight.is_contiguous(), dtypes=_BF16, max_m=4,
         layout=INT8_SCALES_SUMS, direct=_W8A16),
    # from M=5 ahead of the digits (2x at M=16)
    Impl("qcal panel avx2 int8 mm", _w8a16_panel, native="w8a16_mm_panel",
         fits=lambda m: m.qweight.is_contiguous() and _panel(m), dtypes=_BF16, eager=True, layout=INT8_SCALES,
         multi=("w8a16_mm_panel_multi", _w8a16_panel_args, lambda m: ())),
    # _weight_int8pack_mm returns garbage (M=1) or crashes (M=2..16) where K % 32 != 0
    Impl("int8pack_mm", _int8pack_mm, max_m=16, fits=lambda m: m.weight_shape[1] % 32 == 0 and not _native_int8(m)),
    Impl("qcal int8 dequant + bf16 mm", _native_dequant_int8, native="dequant_w8",
         fits=lambda m: m.qweight.is_contiguous(), dtypes=_BF16, eager=True, layout=INT8_SCALES),
    Impl("dequant + bf16 mm", _dequant_int8),
), compute_dtype=torch.bfloat16)

INT8DQ = LinearTable("int8dq", "cpu", lambda m: dynamic_int8(m) and per_channel_int8(m), (
    # vs the panel kernel: small wins to M=8, panel from 16
    Impl("qcal avx512-vnni int8 mm, row quantization fused", _w8a8_small, native=True, fits=_native_int8,
         dtypes=_BF16, max_m=8, layout=INT8_SCALES_SUMS, direct=_W8A8),
    Impl("qcal panel avx512-vnni int8 mm", _w8a8_panel, native=True, fits=lambda m: _native_int8(m) and _panel(m),
         dtypes=_BF16, eager=True, layout=INT8_SCALES_SUMS),
    # no AVX2 panel: the fused kernel at every M (prefill, M = 512: 170-200 GOP/s where _int_mm ran 4 on Zen 3)
    Impl("qcal avx2 int8 mm, row quantization fused", _w8a8_small, native="w8a8_mm_small",
         fits=lambda m: m.qweight.is_contiguous(), dtypes=_BF16, layout=INT8_SCALES_SUMS, direct=_W8A8,
         multi=("w8a8_mm_small_multi", _int8_sums_args, lambda m: ())),
    Impl("per-token quant + _int_mm + rescale", _int_mm),
))

FP8WO = LinearTable("fp8wo", "cpu", lambda m: weight_only(m) and per_channel_fp8(m), (
    Impl("qcal avx512-bf16 fp8 mm (weight in place, widened in registers)", _wf8a16_small, native=True,
         fits=_native_int8, dtypes=_BF16, max_m=4, layout=INT8_SCALES, direct=_WF8A16),
    Impl("qcal avx2 fp8 mm (weight in place, widened in registers)", _wf8a16_small, native="wf8a16_mm_small",
         fits=lambda m: m.qweight.is_contiguous(), dtypes=_BF16, max_m=4, layout=INT8_SCALES, direct=_WF8A16),
    Impl("qcal panel avx2 fp8 mm", _wf8a16_panel, native="wf8a16_mm_panel",
         fits=lambda m: m.qweight.is_contiguous() and _panel(m), dtypes=_BF16, eager=True, layout=INT8_SCALES),
    Impl("dequant + bf16 mm", _dequant_weight_mm),
), compute_dtype=torch.bfloat16)

FP8DQ = LinearTable("fp8dq", "cpu", lambda m: dynamic_fp8(m) and per_channel_fp8(m), (
    Impl("qcal fp8 x fp8 mm, per-row/tensor fp8 quant fused (codes widened in registers)", _wf8a8, native=True,
         fits=_native_int8, dtypes=_BF16, max_m=4, layout=INT8_SCALES, direct=_WF8A8),
    Impl("qcal avx2 fp8 x fp8 mm, per-row/tensor fp8 quant fused (codes widened in registers)", _wf8a8,
         native="wf8a8_mm", fits=lambda m: m.qweight.is_contiguous(), dtypes=_BF16, max_m=4, layout=INT8_SCALES,
         direct=_WF8A8),
    Impl("per-row/tensor fp8 quant + qcal panel avx2 fp8 mm", _fp8dq_panel, native="wf8a16_mm_panel",
         fits=lambda m: m.qweight.is_contiguous() and _panel(m), dtypes=_BF16, eager=True, layout=FP8DQ_SCALES),
    Impl("per-row/tensor fp8 quant + dequant + bf16 mm", _fp8dq_dequant),
), compute_dtype=torch.bfloat16)

FPXWO = LinearTable("fpxwo", "cpu", lambda m: weight_only(m) and subbyte_float(m), (
    Impl("qcal avx512-bf16 fp6/fp5/fp4 mm (bit planes read in place, values looked up in registers)", _wfx_small,
         native=True, fits=_native_fpx, dtypes=_BF16, max_m=4, layout=FPX_TABLES,
         direct=_WFX),
    Impl("qcal avx2 fp6/fp5/fp4 mm (bit planes read in place, values looked up in registers)", _wfx_small,
         native="wfx_mm_small", fits=_fpx_fits, dtypes=_BF16, max_m=4, layout=FPX_TABLES, direct=_WFX),
    Impl("qcal panel avx2 fp6/fp5/fp4 mm", _wfx_panel, native="wfx_mm_panel",
         fits=lambda m: _fpx_fits(m) and native.panel_fits(*_shape(m)), dtypes=_BF16, eager=True, layout=FPX_TABLES),
    Impl("dequant + bf16 mm", _dequant_weight_mm),
), compute_dtype=torch.bfloat16)

# int8 weights the int8wo table does not take (groups: gguf-q8_0, gptq-int8-<g>; zero-points). Small M: qcal's grouped
# kernel (the codes read in place, each dequantized in registers to the fp32 value (q - z) s, before the reference's
# bf16 rounding; one source in both libraries; decode of gguf-q8_0 on Zen 3: 4.6 -> ~89 tok/s). Larger M: the AVX2
# library's grouped panel (the same weights), else the dequantized weight into qcal's GEMM, not the reference kernel's
# float op (PyTorch's emulated bf16 GEMM on an AVX2 CPU: prefill of gguf-q8_0 68 -> 419 -> ~460 tok/s with the panel)
INT8WO_DEQUANT = LinearTable("int8wo-dequant", "cpu", lambda m: weight_only(m) and m.weight_spec.qtype == qint8
                             and not per_channel_int8(m), (
    Impl("qcal grouped int8 mm (codes read in place, dequantized in registers)", _w8g, native=True,
         fits=_native_int8_group, dtypes=_BF16, max_m=W8G_MAX_M, layout=INT8_GROUP_SCALES, direct=_W8G),
    Impl("qcal grouped int8 mm (codes read in place, dequantized in registers)", _w8g, native="w8a16_group_mm",
         fits=_native_int8_group, dtypes=_BF16, max_m=W8G_MAX_M, layout=INT8_GROUP_SCALES, direct=_W8G),
    Impl("qcal panel avx2 grouped int8 mm", _w8g_panel, native="w8a16_group_mm_panel",
         fits=lambda m: _native_int8_group(m) and native.panel_fits(*_shape(m)), dtypes=_BF16, eager=True,
         layout=INT8_GROUP_SCALES),
    Impl("dequant + bf16 mm", _dequant_weight_mm),
))

TABLES_CPU = [INT4WO, INT8DA_INT4, INT8DQ, INT8WO, FP8WO, FP8DQ, FPXWO, INT8WO_DEQUANT]
