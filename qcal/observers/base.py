"""Observer base: holds running range statistics in buffers; the math lives in qcal.primitives."""

from __future__ import annotations

import torch
from torch import nn

from ..granularity import Granularity, PerTensor, block_size_for
from ..primitives import block_minmax, check_float, choose_qparams_from_minmax
from ..qtypes import qtype

__all__ = ["Observer"]


class Observer(nn.Module):
    """Records per-block ranges of the tensors it sees and turns them into qparams.

    Subclasses define :meth:`batch_range` (the range of one tensor). ``momentum=None`` keeps
    the widest range seen (min of mins, max of maxes); a float blends ranges as
    ``old * momentum + new * (1 - momentum)``. Statistics live in ``min_val``/``max_val``
    buffers, so they travel with the module's state_dict.
    """

    integer_zero_point: bool = False  # set on weight observers of specs with integer zero-points

    def __init__(
        self,
        qt: qtype,
        granularity: Granularity | None = None,
        symmetric: bool = True,
        momentum: float | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        self.qtype = qt
        self.granularity = granularity if granularity is not None else PerTensor()
        self.symmetric = symmetric
        self.momentum = momentum
        self.name = name
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def observed(self) -> bool:
        """True once at least one tensor was recorded."""
        return self.min_val.numel() > 0

    def reset(self) -> None:
        """Forget the recorded statistics."""
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)

    def batch_range(self, x: torch.Tensor, block_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Range of one tensor per block; min/max by default."""
        return block_minmax(x, block_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, momentum: float | None = None) -> torch.Tensor:
        """Record ``x`` (returned unchanged). ``momentum`` overrides the observer's own."""
        check_float(x, f"{self.name or 'observer'} input")
        if not torch.isfinite(x).all():
            raise ValueError(
                f"{self.name or 'observer'}: calibration data contains NaN or Inf "
                f"(input of shape {tuple(x.shape)}); clean the samples before calibrating"
            )
        bs = block_size_for(self.granularity, tuple(x.shape), self.name or "observer input")
        mn, mx = self.batch_range(x.detach().float(), bs)
        m = self.momentum if momentum is None else momentum
        if not self.observed or self.min_val.shape != mn.shape:
            if self.observed:
                raise ValueError(
                    f"{self.name or 'observer'}: statistics of shape {tuple(self.min_val.shape)} cannot absorb "
                    f"a tensor whose blocks have shape {tuple(mn.shape)}"
                )
            self.min_val, self.max_val = mn.clone(), mx.clone()
        elif m is None:
            torch.minimum(self.min_val, mn, out=self.min_val)
            torch.maximum(self.max_val, mx, out=self.max_val)
        else:
            self.min_val.mul_(m).add_(mn, alpha=1 - m)
            self.max_val.mul_(m).add_(mx, alpha=1 - m)
        return x

    def calculate_qparams(self, scale_dtype: torch.dtype = torch.float32):
        """(scale, zero_point) from the recorded ranges; zero_point is None when symmetric."""
        if not self.observed:
            raise RuntimeError(f"{self.name or 'observer'}: no data was observed")
        return choose_qparams_from_minmax(self.min_val, self.max_val, self.qtype, self.symmetric, scale_dtype,
                                          self.integer_zero_point)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # statistics have a data-dependent shape: adopt the stored one
        for key in ("min_val", "max_val"):
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key], device=self.min_val.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"{self.qtype}, {self.granularity}, symmetric={self.symmetric}, momentum={self.momentum}"
