"""QLinear: an ``nn.Linear`` whose weight (and optionally input) is quantized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qmodule import QModuleMixin

__all__ = ["QLinear"]


class QLinear(QModuleMixin, nn.Linear):
    """Quantized linear layer; keeps ``weight``/``bias`` names until frozen. Bias stays float."""

    _per_token_ok = True

    def float_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.frozen and bias is not None and bias.dtype != x.dtype:  # as the fast kernels: the input's dtype
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)
