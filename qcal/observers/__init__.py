"""Observers: record tensor statistics and turn them into quantization parameters."""

from __future__ import annotations

from .base import Observer
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
           "OBSERVERS", "get_observer"]

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def get_observer(name: str | type[Observer]) -> type[Observer]:
    """Observer class by registered name (or the class itself)."""
    if isinstance(name, type) and issubclass(name, Observer):
        return name
    if name not in OBSERVERS:
        raise ValueError(f"observer={name!r} is unknown; expected one of {sorted(OBSERVERS)} or an Observer class")
    return OBSERVERS[name]
