"""``Calibration``: a context in which quantized modules record their input activations; ``calibrate`` runs
inputs through a model inside it."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from .nn import QModuleMixin

__all__ = ["Calibration", "calibrate"]


class Calibration:
    """Inside the context, every forward of a quantized module with static activation
    quantization updates its input observer (and the input scale it derives); outside, the
    scales stay fixed.

    ``momentum`` blends successive batches (``old * m + new * (1 - m)``) for observers that
    average (the default moving-average observer); ``momentum=None`` keeps the widest range.
    Forward passes run under ``torch.no_grad()`` unless ``no_grad=False``.
    """

    def __init__(self, momentum: float | None = 0.9, no_grad: bool = True) -> None:
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"Calibration: momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.no_grad = no_grad
        self.observed_calls = 0
        self.quantized_calls = 0
        self._handle = None
        self._grad_ctx = None

    def _hook(self, module, args):
        if isinstance(module, QModuleMixin) and args:
            self.quantized_calls += 1
            if not module.frozen and module.observe_input(args[0], self.momentum):
                self.observed_calls += 1

    def __enter__(self) -> Calibration:
        self._handle = register_module_forward_pre_hook(self._hook)
        if self.no_grad:
            self._grad_ctx = torch.no_grad()
            self._grad_ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.remove()
        if self._grad_ctx is not None:
            self._grad_ctx.__exit__(exc_type, exc, tb)
        if exc_type is None and self.quantized_calls == 0:
            warnings.warn(
                "Calibration: no quantized module ran inside the context; call qcal.quantize(model, ...) "
                "first, and run the model inside `with Calibration():`",
                stacklevel=2,
            )


def calibrate(model: nn.Module, inputs: list[torch.Tensor], momentum: float | None = 0.9) -> None:
    """Run ``inputs`` (input_ids tensors) through ``model`` inside ``Calibration``."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with Calibration(momentum=momentum):
        for ids in tqdm(inputs, desc="calibrating", leave=False):
            model(ids.to(device))
