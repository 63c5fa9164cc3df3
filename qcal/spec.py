"""What a quantized module quantizes and how: small frozen records, serializable to JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from .granularity import Granularity, PerAxis, PerGroup, PerTensor, PerToken, granularity_from_dict
from .qtypes import get_qtype, qtype

__all__ = ["WeightSpec", "ActivationSpec"]


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantization: qtype, granularity (over the 2-D ``(out, -1)`` view), symmetry, observer."""

    qtype: qtype
    granularity: Granularity = field(default_factory=lambda: PerAxis(0))
    symmetric: bool = True
    observer: str = "minmax"
    integer_zero_point: bool = False  # asymmetric: zero-points rounded to integers (compressed-tensors, GPTQ, AWQ)

    @property
    def group_size(self) -> int | None:
        return self.granularity.group_size if isinstance(self.granularity, PerGroup) else None

    def to_dict(self) -> dict:
        d = {"qtype": self.qtype.name, "granularity": self.granularity.to_dict(),
             "symmetric": self.symmetric, "observer": self.observer}
        if self.integer_zero_point:
            d["integer_zero_point"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WeightSpec:
        return cls(get_qtype(d["qtype"]), granularity_from_dict(d["granularity"]), bool(d["symmetric"]),
                   d.get("observer", "minmax"), bool(d.get("integer_zero_point", False)))


@dataclass(frozen=True)
class ActivationSpec:
    """Input-activation quantization.

    ``dynamic=True``: scales computed at run time (per token for linear layers unless ``per_token=False``, per
    tensor for convolutions); no calibration needed. ``dynamic=False``: static per-tensor scale from a
    calibrated observer.
    """

    qtype: qtype
    dynamic: bool = False
    symmetric: bool = True
    observer: str = "moving_average"
    per_token: bool = True

    def granularity(self, per_token_ok: bool = True) -> Granularity:
        return PerToken() if self.dynamic and self.per_token and per_token_ok else PerTensor()

    def to_dict(self) -> dict:
        d = {"qtype": self.qtype.name, "dynamic": self.dynamic, "symmetric": self.symmetric,
             "observer": self.observer}
        return d if self.per_token or not self.dynamic else {**d, "per_token": False}

    @classmethod
    def from_dict(cls, d: dict) -> ActivationSpec:
        return cls(get_qtype(d["qtype"]), bool(d["dynamic"]), bool(d["symmetric"]),
                   d.get("observer", "moving_average"), bool(d.get("per_token", True)))
