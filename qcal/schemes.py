"""Named quantization schemes shared by the library and the eval harness.

``apply_scheme(model, "int4wo-64")`` quantizes a float (fp32) model in place, freezes it and
casts it to the scheme's compute dtype. Names are matched against registered patterns;
``available_schemes()`` lists them. Algorithms register their own schemes on import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .calibration import Calibration
from .qtypes import qint3, qint4, qint8
from .quantize import freeze, quantize

__all__ = ["SchemeContext", "register_scheme", "available_schemes", "apply_scheme", "describe_scheme",
           "quantize_kwargs", "check_scheme", "cast_model"]


@dataclass
class SchemeContext:
    """What a scheme may need beyond the model."""

    quantize_lm_head: bool = False
    calib: Callable[[], list[torch.Tensor]] | None = None
    dtype: torch.dtype = torch.bfloat16

    @property
    def exclude(self) -> list[str] | None:
        return None if self.quantize_lm_head else ["lm_head"]

    def calibration_inputs(self, scheme: str) -> list[torch.Tensor]:
        if self.calib is None:
            raise ValueError(f"scheme {scheme!r} needs calibration data: pass calib=<callable returning input_ids>")
        return self.calib()


@dataclass(frozen=True)
class _Scheme:
    pattern: str
    regex: re.Pattern
    fn: Callable[[nn.Module, re.Match, SchemeContext], nn.Module]
    description: str


_SCHEMES: list[_Scheme] = []


def register_scheme(pattern: str, description: str):
    """Register ``fn(model, match, ctx) -> model`` for names matching ``pattern``.

    ``<g>`` in the pattern stands for a group size (digits).
    """
    regex = re.compile("^" + re.escape(pattern).replace(re.escape("<g>"), r"(?P<g>\d+)") + "$")

    def deco(fn):
        _SCHEMES.append(_Scheme(pattern, regex, fn, description))
        return fn

    return deco


def _load_algorithms() -> None:
    """Import qcal.algorithms so its schemes register (an import error there must surface, not hide them)."""
    import qcal.algorithms  # noqa: F401


def available_schemes() -> list[str]:
    """Registered scheme patterns (``<g>`` = group size)."""
    _load_algorithms()
    return [s.pattern for s in _SCHEMES]


def describe_scheme(name: str) -> str:
    """One-line description of a scheme name."""
    return _find(name)[0].description


def _find(name: str) -> tuple[_Scheme, re.Match]:
    _load_algorithms()
    for s in _SCHEMES:
        m = s.regex.match(name)
        if m:
            return s, m
    raise ValueError(f"unknown scheme {name!r}; available: {', '.join(s.pattern for s in _SCHEMES)}")


def apply_scheme(model: nn.Module, name: str, *, quantize_lm_head: bool = False,
                 calib: Callable[[], list[torch.Tensor]] | None = None) -> nn.Module:
    """Quantize the float ``model`` in place with scheme ``name``, freeze it and cast it to the
    scheme's compute dtype. Returns the model.

    All or nothing: on any error (or an interrupt) the model is left exactly as it was; schemes that rewrite
    weights in place (GPTQ, SmoothQuant) keep a copy of the model's tensors on disk meanwhile."""
    from .transaction import transaction

    scheme, match = _find(name)
    in_place = scheme.pattern not in (*_RTN_SCHEMES, "fp32", "bf16", "w8a8-static")  # GPTQ, SmoothQuant, ...
    with transaction(model, snapshot_tensors=in_place):
        return scheme.fn(model, match, SchemeContext(quantize_lm_head, calib))


def check_scheme(model: nn.Module, name: str, *, quantize_lm_head: bool = False) -> None:
    """Raise ValueError, naming the module, if scheme ``name`` cannot apply to ``model``: unknown, a group size
    of 0, or one that does not divide a linear layer's input size. Cheap: run it before any long work."""
    scheme, match = _find(name)
    g = match.groupdict().get("g")
    if g is None:
        return
    g = int(g)
    if g <= 0:
        raise ValueError(f"scheme {name!r}: the group size must be positive")
    for mname, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (not quantize_lm_head and mname.split(".")[-1] == "lm_head"):
            continue
        if m.in_features % g:
            raise ValueError(f"scheme {name!r}: group size {g} does not divide the {m.in_features} input features "
                             f"of {mname!r}")


def _group(match: re.Match) -> int:
    return int(match.group("g"))


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, except the non-persistent float32 buffers of float modules (rotary ``inv_freq``),
    which stay float32 as in a model transformers builds in ``dtype``: the same model ``from_pretrained``
    gives back."""
    from .nn import QModuleMixin

    keep = [(m, k, b) for m in model.modules() if not isinstance(m, QModuleMixin)
            for k in m._non_persistent_buffers_set
            if isinstance(b := m._buffers.get(k), torch.Tensor) and b.dtype == torch.float32]
    model.to(dtype)
    for m, k, b in keep:
        m._buffers[k] = b.to(m._buffers[k].device)
    return model


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    freeze(model)
    return cast_model(model, dtype)


def calibrate(model: nn.Module, inputs: list[torch.Tensor], momentum: float | None = 0.9) -> None:
    """Run ``inputs`` (input_ids tensors) through ``model`` inside ``Calibration``."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with Calibration(momentum=momentum):
        for ids in tqdm(inputs, desc="calibrating", leave=False):
            model(ids.to(device))


@register_scheme("fp32", "float32, unquantized")
def _fp32(model, match, ctx):
    return model.float()


@register_scheme("bf16", "bfloat16, unquantized (the baseline)")
def _bf16(model, match, ctx):
    return cast_model(model, torch.bfloat16)


# Calibration-free schemes: each is one ``quantize`` call, so it can also run module by module as the
# weights arrive (quantize on load, :mod:`qcal.integrations.transformers`).
_RTN_SCHEMES: dict[str, Callable[[re.Match], dict]] = {}


def _register_rtn(pattern: str, description: str, kwargs: Callable[[re.Match], dict]) -> None:
    _RTN_SCHEMES[pattern] = kwargs

    @register_scheme(pattern, description)
    def _apply(model, match, ctx):
        quantize(model, exclude=ctx.exclude, **kwargs(match))
        return _finish(model, ctx.dtype)


def quantize_kwargs(name: str) -> dict:
    """The ``quantize(...)`` arguments of a calibration-free scheme (``int8wo``, ``int4wo-64``, ...).

    Raises ValueError naming the scheme when it needs calibration data (GPTQ, SmoothQuant, static
    activations) or does not exist.
    """
    scheme, match = _find(name)
    if scheme.pattern not in _RTN_SCHEMES:
        raise ValueError(f"scheme {name!r} needs calibration data and cannot be applied module by module; "
                         f"calibration-free schemes: {', '.join(_RTN_SCHEMES)}")
    return _RTN_SCHEMES[scheme.pattern](match)


_register_rtn("int8wo", "int8 weight-only, per output channel, symmetric (A16W8)",
              lambda m: dict(weights=qint8))
_register_rtn("int8dq", "int8 dynamic per-token activations x int8 per-channel weights (A8W8 dynamic)",
              lambda m: dict(weights=qint8, activations=qint8, dynamic=True))
_register_rtn("int4wo-<g>", "int4 weight-only, asymmetric groups of <g> along the input dim (A16W4)",
              lambda m: dict(weights=qint4, group_size=_group(m), symmetric=False))
_register_rtn("int3wo-<g>", "int3 weight-only, asymmetric groups of <g> (reference kernel; the RTN baseline of "
              "gptq-int3-<g>)", lambda m: dict(weights=qint3, group_size=_group(m), symmetric=False))
_register_rtn("int4wo-pc", "int4 weight-only, asymmetric, per output channel",
              lambda m: dict(weights=qint4, symmetric=False))
_register_rtn("int4wo-<g>-intzp", "int4wo-<g> with integer zero-points (exports to compressed-tensors / vLLM)",
              lambda m: dict(weights=qint4, group_size=_group(m), symmetric=False, zero_point="int"))
_register_rtn("int4wo-pc-intzp", "int4wo-pc with integer zero-points (exports to compressed-tensors / vLLM)",
              lambda m: dict(weights=qint4, symmetric=False, zero_point="int"))
_register_rtn("8da4w-<g>", "int8 dynamic per-token activations x int4 symmetric groups of <g> (ExecuTorch)",
              lambda m: dict(weights=qint4, group_size=_group(m), symmetric=True, activations=qint8, dynamic=True))


@register_scheme("w8a8-static", "int8 static per-tensor activations (calibrated) x int8 per-channel weights")
def _w8a8_static(model, match, ctx):
    quantize(model, weights=qint8, activations=qint8, exclude=ctx.exclude)
    calibrate(model, ctx.calibration_inputs(match.string))
    return _finish(model, ctx.dtype)
