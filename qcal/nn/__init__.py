"""Quantized modules."""

from __future__ import annotations

from torch import nn

from .qconv2d import QConv2d
from .qlinear import QLinear
from .qmodule import QModuleMixin, unquantized

__all__ = ["QModuleMixin", "QLinear", "QConv2d", "QMODULE_FOR", "unquantized"]

QMODULE_FOR: dict[type[nn.Module], type[QModuleMixin]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}
