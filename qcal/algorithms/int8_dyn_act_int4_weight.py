"""Int8DynActInt4Weight ("8da4w", the ExecuTorch scheme): int8 per-token dynamic activations times
int4 symmetric per-group weights, with round-to-nearest or GPTQ weights.

The modules are exactly those of the ``8da4w-<g>`` scheme (``qcal.quantize(model, weights=qint4,
group_size=g, symmetric=True, activations=qint8, dynamic=True)``), so a GPTQ model and an RTN
model differ only in their weight values and fixed scales.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..qtypes import qint4, qint8
from ..quantize import cast_model, freeze, quantize
from .gptq import GPTQQuantizer

__all__ = ["Int8DynActInt4WeightQuantizer", "Int8DynActInt4WeightGPTQQuantizer", "swap_8da4w"]


def swap_8da4w(model: nn.Module, groupsize: int, include: str | Iterable[str] | None = None,
               exclude: str | Iterable[str] | None = "lm_head") -> nn.Module:
    """Swap the selected linears for fake-quant 8da4w ``QLinear`` modules (in place)."""
    return quantize(model, weights=qint4, group_size=groupsize, symmetric=True, activations=qint8, dynamic=True,
                    include=include, exclude=exclude)


class Int8DynActInt4WeightQuantizer:
    """``Int8DynActInt4WeightQuantizer(groupsize=32).quantize(model)``: round-to-nearest 8da4w,
    frozen and cast to ``precision`` (the compute dtype of activations and scales)."""

    def __init__(self, groupsize: int = 32, precision: torch.dtype = torch.float32, *,
                 include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = "lm_head") -> None:
        self.groupsize = groupsize
        self.precision = precision
        self.include = include
        self.exclude = exclude

    @torch.no_grad()
    def quantize(self, model: nn.Module) -> nn.Module:
        swap_8da4w(model, self.groupsize, self.include, self.exclude)
        return cast_model(freeze(model), self.precision)


class Int8DynActInt4WeightGPTQQuantizer(GPTQQuantizer):
    """8da4w with GPTQ weights: ``Int8DynActInt4WeightGPTQQuantizer(blocksize, percdamp, groupsize)
    .quantize(model, inputs)``, frozen and cast to ``precision``. Other keywords as GPTQQuantizer."""

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, groupsize: int = 64,
                 precision: torch.dtype = torch.float32, **kwargs) -> None:
        super().__init__(bits=4, groupsize=groupsize, blocksize=blocksize, percdamp=percdamp, symmetric=True,
                         **kwargs)
        self.precision = precision

    @torch.no_grad()
    def quantize(self, model: nn.Module, inputs: Sequence) -> nn.Module:
        swap_8da4w(model, self.groupsize, self.include, self.exclude)
        super().quantize(model, inputs)
        return cast_model(freeze(model), self.precision)
