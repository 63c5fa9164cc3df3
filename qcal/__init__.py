"""qcal: eager-mode, module-swap calibration, PTQ and QAT for PyTorch models."""

from __future__ import annotations

from ._version import __version__
from .autoquant import autoquant
from .calibration import Calibration
from .explain import explain
from .export import export, load_pretrained
from .granularity import PerAxis, PerChannel, PerGroup, PerTensor, PerToken
from .nn import QConv2d, QLinear, QModuleMixin
from .observers import MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver
from .qtypes import (
    qfloat4_e2m1,
    qfloat5_e2m2,
    qfloat6_e3m2,
    qfloat8,
    qfloat8_e4m3fn,
    qfloat8_e5m2,
    qint2,
    qint3,
    qint4,
    qint8,
    qtype,
)
from .quantize import freeze, quantize, quantized_modules
from .serialization import load, save

try:  # register quant_method "qcal" with transformers' quantizer registry
    from .integrations.transformers import QcalConfig
except ImportError:  # transformers absent (or too old for its quantizer API): qcal works without it
    QcalConfig = None  # type: ignore[assignment,misc]

__all__ = [
    "quantize", "freeze", "Calibration", "quantized_modules", "explain", "autoquant", "save", "load",
    "QcalConfig", "export", "load_pretrained",
    "qtype", "qint2", "qint3", "qint4", "qint8", "qfloat8", "qfloat8_e4m3fn", "qfloat8_e5m2", "qfloat6_e3m2",
    "qfloat5_e2m2", "qfloat4_e2m1",
    "PerTensor", "PerAxis", "PerChannel", "PerGroup", "PerToken",
    "QLinear", "QConv2d", "QModuleMixin",
    "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
    "__version__",
]
