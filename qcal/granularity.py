"""Granularity: which elements share one scale, expressed as a block size per dimension.

Every granularity turns into a ``block_size`` tuple for a given tensor shape: each block of
that size shares a scale (and zero-point). Per-tensor, per-channel, per-group and per-token
are all the same mechanism, so the math in :mod:`qcal.primitives` has one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Granularity", "PerTensor", "PerAxis", "PerChannel", "PerGroup", "PerToken", "block_size_for",
           "granularity_from_dict"]


@dataclass(frozen=True)
class Granularity:
    """Base class of granularities."""

    def to_dict(self) -> dict:
        return {"kind": type(self).__name__, **self.__dict__}


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale per index of ``axis`` (per output channel of a weight with ``axis=0``)."""

    axis: int = 0


PerChannel = PerAxis


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive elements of the last dimension, per row."""

    group_size: int


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale per row of the last dimension (per token of an activation), computed at run time."""


def block_size_for(granularity: Granularity, shape: tuple[int, ...], name: str = "tensor") -> tuple[int, ...]:
    """Return the block size that ``granularity`` means for a tensor of ``shape``.

    Raises ValueError (naming ``name``) when a group size does not divide the last dimension.
    """
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    if isinstance(granularity, PerTensor):
        return shape
    if isinstance(granularity, PerAxis):
        axis = granularity.axis % len(shape)
        return tuple(1 if i == axis else s for i, s in enumerate(shape))
    if isinstance(granularity, PerGroup):
        g = granularity.group_size
        if g <= 0 or shape[-1] % g != 0:
            raise ValueError(
                f"{name}: group_size={g} does not divide the last dimension {shape[-1]} (shape {shape}); "
                f"choose a group size that divides it, or per-channel quantization (group_size=None)"
            )
        return (1,) * (len(shape) - 1) + (g,)
    if isinstance(granularity, PerToken):
        return (1,) * (len(shape) - 1) + (shape[-1],)
    raise TypeError(f"{name}: unsupported granularity {granularity!r}")


def granularity_from_dict(d: dict) -> Granularity:
    """Inverse of :meth:`Granularity.to_dict`."""
    kinds = {"PerTensor": PerTensor, "PerAxis": PerAxis, "PerGroup": PerGroup, "PerToken": PerToken}
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"unknown granularity {kind!r}")
    return kinds[kind](**d)
