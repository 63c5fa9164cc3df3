"""QConv2d: an ``nn.Conv2d`` whose weight (and optionally input) is quantized."""

from __future__ import annotations

import torch
from torch import nn

from .qmodule import QModuleMixin

__all__ = ["QConv2d"]


class QConv2d(QModuleMixin, nn.Conv2d):
    """Quantized 2-D convolution. Weight granularity applies to the ``(out, in*kh*kw)`` view;
    dynamic activation quantization is per tensor. Bias stays float."""

    _per_token_ok = False

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)  # mixed layouts take a slow path
        return self._conv_forward(x, weight, self.bias)
