"""Frozen ``QConv2d`` kernels on the CPU: int8 activations x int8 weights through oneDNN's int8 convolution.

A frozen convolution with symmetric per-channel int8 weights and symmetric per-tensor int8 activations (dynamic,
``int8dq``, or calibrated static, ``w8a8-static``) runs as: the input's codes in one native pass (two when the
scale is dynamic: min/max, then codes), shifted to uint8 with zero point 128, then oneDNN's u8 x s8 convolution
(AMX-INT8 or VNNI where the CPU has them) on a weight packed once, rescaled per output channel in float32 with the
float32 bias, and returned in the input's dtype. The integer part is exact; the reference path (dequantize both,
then a bf16 convolution) rounds the dequantized values to bf16 first, so this path is the closer of the two to
the quantized model's exact value.

Inputs it does not take (traced under ``torch.compile``, not bf16/float32, unbatched, another device, or holding
NaN) run the reference path. Layers of fewer than 64 inputs per output (``in_channels / groups * kh * kw``, e.g. a
latent's 4-channel input convolution) stay on the reference: oneDNN's int8 convolution is slower there than bf16.

Weight-only int8 and int4 convolutions (``int8wo``, ``int4wo-<g>``) dequantize the weight to bf16 in one native
pass per call (the same numbers as the reference's dequantization) and run PyTorch's bf16 convolution: the weight
stays int8 / int4 in memory, the convolution's arithmetic is bf16's. Channels-last inputs are the fast layout for
both (``model.to(memory_format=torch.channels_last)``); an NCHW input is converted (the int8 codes, or by PyTorch).
"""

from __future__ import annotations

import torch
from torch import nn

from ..qtypes import qint4, qint8
from . import Kernel, Opaque, native

__all__ = ["Int8Conv2d", "WeightOnlyConv2d", "CONV_KERNELS", "onednn_int8_conv_available"]

_ZP = 128  # uint8 codes = int8 codes + 128
_MIN_INPUTS = 64  # inputs per output below which the int8 convolution loses to bf16 (measured: 4 x 3 x 3 = 36)


def onednn_int8_conv_available() -> bool:
    """PyTorch was built with oneDNN and exposes its int8 convolution operators."""
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_prepack")
                and hasattr(torch.ops.onednn, "qconv2d_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _int8_act(m) -> bool:
    a = m.act_spec
    return a is not None and a.qtype == qint8 and a.symmetric


class Int8Conv2d(Kernel):
    """int8 x int8 ``Conv2d`` through oneDNN (see the module docstring)."""

    name = "cpu_int8_conv2d_onednn"

    def supports(self, m) -> bool:
        w = m.weight_spec
        return (isinstance(m, nn.Conv2d) and getattr(m, "frozen", False) and w is not None and w.qtype == qint8
                and getattr(m, "qweight", None) is not None and m.qweight.device.type == "cpu"
                and m.weight_zero_point is None and m.weight_scale.shape[1] == 1 and _int8_act(m)
                and (m.act_spec.dynamic or m.input_zero_point is None)
                and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and m.weight_2d_cols >= _MIN_INPUTS and native.available() and onednn_int8_conv_available())

    def prepare(self, m) -> None:
        ws = m.weight_scale.reshape(-1).float().contiguous()
        w = m.qweight.reshape(m.weight_shape).contiguous()
        packed = torch.ops.onednn.qconv_prepack(w, ws, 1.0, _ZP, list(m.stride), list(m.padding), list(m.dilation),
                                                m.groups, None)
        m._k_conv = Opaque(packed, w.numel())
        m.register_buffer("_k_ws", ws, persistent=False)
        m.register_buffer("_k_wzp", torch.zeros(ws.numel(), dtype=torch.int32), persistent=False)
        bias = m._parameters.get("bias")
        m.register_buffer("_k_bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @property
    def dispatch(self) -> str:
        return "int8 codes (qcal, per-tensor scale) + oneDNN u8 x s8 conv, fp32 rescale; else dequant + float conv"

    def __call__(self, m, x: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dim() != 4
                or x.dtype not in (torch.bfloat16, torch.float32)):
            return m.frozen_forward_reference(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        if x.shape[1] != m.in_channels:
            raise ValueError(f"{m.qcal_name}: the input has {x.shape[1]} channels, the layer takes {m.in_channels} "
                             f"(input shape {tuple(x.shape)})")
        if x.numel() == 0:
            return m.frozen_forward_reference(x)
        scale = 0.0 if m.act_spec.dynamic else float(m.input_scale.float().reshape(()))
        codes, s = torch.ops.qcal.act_quant_u8(x, scale)
        if s != s:  # NaN (or Inf with a dynamic scale): the reference's semantics for non-finite inputs
            return m.frozen_forward_reference(x)
        if not x.is_contiguous(memory_format=torch.channels_last):
            codes = codes.contiguous(memory_format=torch.channels_last)  # oneDNN's own reorder is slower
        packed = m.__dict__.get("_k_conv")
        if packed is None or packed.value is None:  # a copy of the module: pack again
            self.prepare(m)
            packed = m._k_conv
        b = m._buffers
        y = torch.ops.onednn.qconv2d_pointwise(codes, s, _ZP, packed.value, b["_k_ws"], b["_k_wzp"], b["_k_bias"],
                                               list(m.stride), list(m.padding), list(m.dilation), m.groups, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def _dequant_conv_weight(m) -> torch.Tensor | None:
    """The bf16 weight of a frozen weight-only convolution in one native pass (int8 per channel, int4 in groups of
    a multiple of 32), the reference's numbers; None where no native pass applies."""
    qt = m.weight_spec.qtype
    if qt == qint8 and m.weight_zero_point is None and m.weight_scale.shape[1] == 1:
        return native.dequant_int8(m.qweight, m.weight_scale)
    if qt == qint4:
        return native.dequant_int4(m.qweight, m.weight_scale, m.weight_zero_point)
    return None


class WeightOnlyConv2d(Kernel):
    """Weight-only int8 / int4 ``Conv2d``: one-pass native dequantization to bf16, then PyTorch's convolution (the
    weight stays int8 / int4 in memory)."""

    name = "cpu_weight_only_conv2d"

    def supports(self, m) -> bool:
        w = m.weight_spec
        return (isinstance(m, nn.Conv2d) and getattr(m, "frozen", False) and w is not None
                and m.act_spec is None and getattr(m, "qweight", None) is not None
                and m.qweight.device.type == "cpu" and m.qweight.is_contiguous() and native.available()
                and (w.qtype == qint8 and m.weight_zero_point is None and m.weight_scale.shape[1] == 1
                     or w.qtype == qint4 and (m.weight_2d_cols // m.weight_scale.shape[1]) % 32 == 0))

    @property
    def dispatch(self) -> str:
        return "bf16: qcal one-pass dequant + bf16 conv; else dequant + float conv"

    def __call__(self, m, x: torch.Tensor) -> torch.Tensor:
        w = None
        if not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            w = _dequant_conv_weight(m)
        if w is None:
            return m.frozen_forward_reference(x)
        return m.float_forward(x, w.view(m.weight_shape))  # a channels-last input gets a channels-last weight


CONV_KERNELS = [Int8Conv2d(), WeightOnlyConv2d()]
