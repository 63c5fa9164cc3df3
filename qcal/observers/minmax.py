"""Min/max observers."""

from __future__ import annotations

from ..granularity import Granularity
from ..qtypes import qtype
from .base import Observer

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver"]


class MinMaxObserver(Observer):
    """Keeps the widest range seen (a momentum passed by ``Calibration`` is ignored)."""

    def forward(self, x, momentum=None):
        return super().forward(x, None)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max (``Calibration(momentum=...)`` sets it)."""

    def __init__(self, qt: qtype, granularity: Granularity | None = None, symmetric: bool = True,
                 momentum: float | None = 0.9, name: str = "") -> None:
        super().__init__(qt, granularity, symmetric, momentum, name)
