"""Calibration algorithms built on the core: GPTQ, SmoothQuant, Int8DynActInt4Weight.

Importing this package registers their named schemes with :mod:`qcal.schemes`.
"""

from __future__ import annotations

from .gptq import GPTQQuantizer, GPTQResult, Int4WeightOnlyGPTQQuantizer, gptq_quantize_weight
from .inputs import InputRecorder
from .int8_dyn_act_int4_weight import Int8DynActInt4WeightGPTQQuantizer, Int8DynActInt4WeightQuantizer

__all__ = [
    "GPTQQuantizer", "GPTQResult", "Int4WeightOnlyGPTQQuantizer", "InputRecorder", "gptq_quantize_weight",
    "Int8DynActInt4WeightQuantizer", "Int8DynActInt4WeightGPTQQuantizer",
]
