"""Calibration algorithms built on the core: GPTQ, SmoothQuant, Int8DynActInt4Weight, AWQ, rotations.

Their named schemes (``gptq-int4-64``, ``smoothquant-w8a8``, ``8da4w-gptq-64``, ...) are registered by
:mod:`qcal.schemes`, the layer above; nothing here imports it.
"""

from __future__ import annotations

from .awq import awq_smooth
from .gptq import GPTQQuantizer, GPTQResult, Int4WeightOnlyGPTQQuantizer, gptq_quantize_weight
from .inputs import InputRecorder
from .int8_dyn_act_int4_weight import Int8DynActInt4WeightGPTQQuantizer, Int8DynActInt4WeightQuantizer
from .rotation import rotate_model
from .smoothquant import (
    smooth_fq_linear_to_inference,
    smooth_model,
    smoothquant_w8a8,
    swap_linear_with_smooth_fq_linear,
)

__all__ = [
    "GPTQQuantizer", "GPTQResult", "Int4WeightOnlyGPTQQuantizer", "InputRecorder", "gptq_quantize_weight",
    "Int8DynActInt4WeightQuantizer", "Int8DynActInt4WeightGPTQQuantizer",
    "smooth_model", "smoothquant_w8a8", "swap_linear_with_smooth_fq_linear", "smooth_fq_linear_to_inference",
    "awq_smooth", "rotate_model",
]
