"""Percentile observer: clips outliers by taking per-block quantiles instead of extremes."""

from __future__ import annotations

import math

import torch

from ..granularity import Granularity
from ..primitives import block_view
from ..qtypes import qtype
from .base import Observer

__all__ = ["PercentileObserver"]


class PercentileObserver(Observer):
    """Range = the ``percentile`` and ``100 - percentile`` quantiles of each block.

    Per-batch quantiles are blended across batches with ``momentum`` (default 0.9).
    """

    def __init__(self, qt: qtype, granularity: Granularity | None = None, symmetric: bool = True,
                 momentum: float | None = 0.9, name: str = "", percentile: float = 99.99) -> None:
        super().__init__(qt, granularity, symmetric, momentum, name)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
        self.percentile = percentile

    def batch_range(self, x: torch.Tensor, block_size: tuple[int, ...]):
        v = block_view(x, block_size)
        nd = v.dim()
        grid_dims = list(range(0, nd, 2))
        blk_dims = list(range(1, nd, 2))
        flat = v.permute(*grid_dims, *blk_dims).reshape(*[v.shape[d] for d in grid_dims], -1)
        n = flat.shape[-1]
        k_hi = max(1, min(n, math.ceil(self.percentile / 100.0 * n)))
        k_lo = max(1, min(n, n + 1 - k_hi))
        hi = flat.kthvalue(k_hi, dim=-1).values
        lo = flat.kthvalue(k_lo, dim=-1).values
        return lo, hi

    def extra_repr(self) -> str:
        return super().extra_repr() + f", percentile={self.percentile}"
