"""MSE observer: searches the clipping range that minimises reconstruction error."""

from __future__ import annotations

import torch

from ..granularity import Granularity
from ..primitives import block_minmax, block_view, choose_qparams_from_minmax, fake_quantize
from ..qtypes import qtype
from .base import Observer

__all__ = ["MSEObserver"]


class MSEObserver(Observer):
    """For each block, shrink the min/max range by factors ``1, 1 - 1/steps, ...`` down to
    ``min_ratio`` and keep the one with the lowest ``sum |x - fq(x)|^norm``.

    Works for weights (one call) and activations (per-batch choices blended with ``momentum``).
    """

    def __init__(self, qt: qtype, granularity: Granularity | None = None, symmetric: bool = True,
                 momentum: float | None = 0.9, name: str = "", steps: int = 50, min_ratio: float = 0.5,
                 norm: float = 2.0) -> None:
        super().__init__(qt, granularity, symmetric, momentum, name)
        self.steps, self.min_ratio, self.norm = steps, min_ratio, norm

    def batch_range(self, x: torch.Tensor, block_size: tuple[int, ...], weight: torch.Tensor | None = None):
        """Per block, the (min, max) of the best shrunk range; ``weight`` (broadcastable to ``x``) weighs each
        element's error, e.g. the mean square of the activation each weight multiplies."""
        mn, mx = block_minmax(x, block_size)
        best_err = torch.full_like(mn, float("inf"))
        best_mn, best_mx = mn.clone(), mx.clone()
        v = block_view(x, block_size)
        dims = tuple(range(1, v.dim(), 2))
        n_candidates = max(1, int(round((1 - self.min_ratio) * self.steps)) + 1)
        for i in range(n_candidates):
            r = 1.0 - i / self.steps
            cmn, cmx = mn * r, mx * r
            scale, zp = choose_qparams_from_minmax(cmn, cmx, self.qtype, self.symmetric, torch.float32,
                                                   self.integer_zero_point)
            err = (fake_quantize(x, scale, zp, self.qtype) - x).abs().pow(self.norm)
            if weight is not None:
                err = err * weight
            err = block_view(err, block_size).sum(dim=dims)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_mn = torch.where(better, cmn, best_mn)
            best_mx = torch.where(better, cmx, best_mx)
        return best_mn, best_mx
