"""Quantization-aware training helpers.

qcal modules already fake-quantize in every forward with straight-through gradients, so QAT is
an ordinary training loop on a quantized model. This module adds what a loop needs around it:

* :func:`learnable_scales`: turn the scales into Parameters (LSQ, with its gradient scaling);
* :class:`ObserverSchedule`: observe ranges for the first N steps, then fix them;
* :func:`residual_latent_weights`: start QAT from PTQ (GPTQ) weights without being stuck on the grid;
* the torchao-style two-step quantizers ``prepare`` -> train -> ``convert``, whose ``convert``
  gives the same frozen modules as post-training quantization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..calibration import Calibration
from ..qtypes import qint4, qint8
from ..quantize import cast_model, freeze, quantize, quantized_modules

__all__ = [
    "learnable_scales",
    "residual_latent_weights",
    "ObserverSchedule",
    "Int8DynActInt4WeightQATQuantizer",
    "Int4WeightOnlyQATQuantizer",
]


@torch.no_grad()
def learnable_scales(model: nn.Module, weights: bool = True, activations: bool = True) -> list[nn.Parameter]:
    """Make weight (and static input) scales trainable, LSQ-style; returns the new Parameters.

    Weight scales start from the current (observer or GPTQ) values. The gradient reaching a scale
    is multiplied by ``1 / sqrt(n * qmax)`` (n = elements sharing the scale), as in LSQ, so one
    learning rate suits weights and scales. Zero-points stay fixed.
    """
    made: list[nn.Parameter] = []
    for name, m in quantized_modules(model):
        if m.frozen:
            raise ValueError(f"learnable_scales: module {name!r} is frozen; call before freeze()")
        if weights and m.weight_spec is not None and not m.weight_spec.qtype.is_floating_point:
            if m.weight_scale is None:
                m.fix_weight_qparams()
            if not isinstance(m.weight_scale, nn.Parameter):
                m.weight_scale = nn.Parameter(m.weight_scale.detach().clone())
            per_scale = m.weight_2d().numel() // m.weight_scale.numel()
            m.lsq_weight_grad = 1.0 / math.sqrt(per_scale * m.weight_spec.qtype.qmax)
            made.append(m.weight_scale)
        if activations and m.act_spec is not None and not m.act_spec.dynamic:
            if m.input_scale is None:
                raise ValueError(f"learnable_scales: module {name!r} has uncalibrated static activations; "
                                 f"calibrate first (Calibration or ObserverSchedule)")
            if not isinstance(m.input_scale, nn.Parameter):
                m.input_scale = nn.Parameter(m.input_scale.detach().clone())
            m.lsq_input_grad = 1.0 / math.sqrt(m.in_features * m.act_spec.qtype.qmax)
            made.append(m.input_scale)
    return made


@torch.no_grad()
def residual_latent_weights(model: nn.Module, float_model: nn.Module, margin: float = 0.499) -> int:
    """Move each fake-quant weight toward its float original, at most ``margin`` step from its grid point.

    GPTQ (or any PTQ that writes dequantized weights back) leaves every float weight exactly on a grid
    point; QAT's steps are far smaller than the half step needed to change a code, so training from
    there changes nothing. Clamping the original weight into the rounding cell keeps every integer
    code (the quantized model is unchanged, which is checked) while putting the weights that PTQ moved
    right at the boundary toward where they came from, as round-to-nearest weights are. Needs fixed
    weight qparams (as GPTQ leaves them). Returns the number of modules updated.
    """
    if not 0 <= margin < 0.5:
        raise ValueError(f"residual_latent_weights: margin must be in [0, 0.5), got {margin}")
    done = 0
    for name, m in quantized_modules(model):
        if m.weight_spec is None or m.weight_spec.qtype.is_floating_point:
            continue
        if m.frozen or m.weight_scale is None:
            raise ValueError(f"residual_latent_weights: module {name!r} needs fixed weight qparams and float "
                             f"weights (run PTQ such as GPTQ on the prepared model, before freeze)")
        src = float_model.get_submodule(name).weight
        w = m.weight_2d()
        if src.numel() != w.numel():
            raise ValueError(f"residual_latent_weights: {name!r} has {w.numel()} weights, the float model's "
                             f"{src.numel()}")
        before, original = m.qweight_fake().detach().clone(), w.detach().clone()
        step = m.weight_scale.detach().float().repeat_interleave(w.shape[1] // m.weight_scale.shape[1], dim=1)
        delta = src.detach().reshape(w.shape).float() - w.float()
        bound = margin * step
        w.copy_((w.float() + torch.maximum(torch.minimum(delta, bound), -bound)).to(w.dtype))
        if not torch.equal(m.qweight_fake(), before):
            w.copy_(original)  # nothing left half-modified
            raise RuntimeError(f"residual_latent_weights: {name!r}: moving the weights changed their codes "
                               f"(margin {margin} too close to 0.5 for this dtype)")
        done += 1
    return done


class ObserverSchedule:
    """Observe activation ranges (and let weight ranges follow the weights) for the first
    ``observe_steps`` calls of :meth:`step`, then fix every range.

    Use in a training loop: ``sched = ObserverSchedule(model, 100)`` before the loop, then
    ``sched.step()`` after each optimizer step. Gradients flow while observing.
    """

    def __init__(self, model: nn.Module, observe_steps: int, momentum: float | None = 0.9) -> None:
        if observe_steps < 1:
            raise ValueError(f"ObserverSchedule: observe_steps must be >= 1, got {observe_steps}")
        self.model = model
        self.observe_steps = observe_steps
        self.steps = 0
        self._calibration: Calibration | None = Calibration(momentum=momentum, no_grad=False)
        self._calibration.__enter__()

    @property
    def observing(self) -> bool:
        return self._calibration is not None

    def step(self) -> None:
        """Count one training step; fix the ranges once ``observe_steps`` is reached."""
        self.steps += 1
        if self.observing and self.steps >= self.observe_steps:
            self.fix()

    @torch.no_grad()
    def fix(self) -> None:
        """Stop observing and fix weight and activation ranges now."""
        if self._calibration is not None:
            self._calibration.__exit__(None, None, None)
            self._calibration = None
        for _, m in quantized_modules(self.model):
            if m.weight_spec is not None and m.weight_scale is None:
                m.fix_weight_qparams()


class _TwoStepQATQuantizer:
    """prepare (swap in fake-quant modules) -> train -> convert (freeze, same modules as PTQ)."""

    def __init__(self, groupsize: int, precision: torch.dtype, exclude: str | list[str] | None) -> None:
        self.groupsize = groupsize
        self.precision = precision
        self.exclude = exclude

    def _quantize_kwargs(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap linear layers for fake-quantizing QLinear modules (in place)."""
        return quantize(model, exclude=self.exclude, group_size=self.groupsize, **self._quantize_kwargs())

    def convert(self, model: nn.Module) -> nn.Module:
        """Freeze the trained model to integer weights and cast to ``precision``."""
        freeze(model)
        return cast_model(model, self.precision)


class Int8DynActInt4WeightQATQuantizer(_TwoStepQATQuantizer):
    """QAT for 8da4w: int8 dynamic per-token activations x int4 symmetric grouped weights."""

    def __init__(self, groupsize: int = 32, precision: torch.dtype = torch.float32,
                 exclude: str | list[str] | None = "lm_head") -> None:
        super().__init__(groupsize, precision, exclude)

    def _quantize_kwargs(self) -> dict:
        return dict(weights=qint4, symmetric=True, activations=qint8, dynamic=True)


class Int4WeightOnlyQATQuantizer(_TwoStepQATQuantizer):
    """QAT for int4 weight-only: asymmetric grouped int4 weights (float zero-point)."""

    def __init__(self, groupsize: int = 64, precision: torch.dtype = torch.bfloat16,
                 exclude: str | list[str] | None = "lm_head") -> None:
        super().__init__(groupsize, precision, exclude)

    def _quantize_kwargs(self) -> dict:
        return dict(weights=qint4, symmetric=False)
