"""Named quantization schemes shared by the library and the eval harness.

``apply_scheme(model, "int4wo-64")`` quantizes a float (fp32) model in place, freezes it and
casts it to the scheme's compute dtype. Names are matched against registered patterns;
``available_schemes()`` lists them. The schemes of :mod:`qcal.algorithms` (GPTQ, SmoothQuant, 8da4w with
GPTQ weights) are registered here, the layer above them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .algorithms import GPTQQuantizer, smoothquant_w8a8
from .algorithms.int8_dyn_act_int4_weight import swap_8da4w
from .calibration import calibrate
from .qtypes import qint4, qint8
from .quantize import cast_model, freeze, quantize, quantized_modules
from .rtn import RTN_SCHEMES, scheme_regex

__all__ = ["SchemeContext", "register_scheme", "available_schemes", "apply_scheme", "describe_scheme",
           "quantize_kwargs", "check_scheme", "cast_model", "calibrate"]


@dataclass
class SchemeContext:
    """What a scheme may need beyond the model."""

    quantize_lm_head: bool = False
    calib: Callable[[], list[torch.Tensor]] | None = None
    dtype: torch.dtype = torch.bfloat16
    progress: bool = True  # the algorithms' progress bars

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
    finish: Callable[[nn.Module, torch.dtype], nn.Module] | None = None


_SCHEMES: list[_Scheme] = []


def register_scheme(pattern: str, description: str,
                    finish: Callable[[nn.Module, torch.dtype], nn.Module] | None = None):
    """Register ``fn(model, match, ctx) -> model`` for names matching ``pattern``.

    ``<g>`` in the pattern stands for a group size (digits). With ``finish(model, dtype)`` (freeze and cast), ``fn``
    only quantizes (fake-quant, qparams fixed) and works on any module, one decoder block included, so the scheme
    can stream a checkpoint block by block (:func:`qcal.pretrained.quantize_pretrained`).
    """
    regex = scheme_regex(pattern)

    def deco(fn):
        _SCHEMES.append(_Scheme(pattern, regex, fn, description, finish))
        return fn

    return deco


def available_schemes() -> list[str]:
    """Registered scheme patterns (``<g>`` = group size)."""
    return [s.pattern for s in _SCHEMES]


def describe_scheme(name: str) -> str:
    """One-line description of a scheme name."""
    return _find(name)[0].description


def _find(name: str) -> tuple[_Scheme, re.Match]:
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
    in_place = scheme.pattern not in (*RTN_SCHEMES, "fp32", "bf16", "w8a8-static")  # GPTQ, SmoothQuant, ...
    with transaction(model, snapshot_tensors=in_place):
        ctx = SchemeContext(quantize_lm_head, calib)
        model = scheme.fn(model, match, ctx)
        return model if scheme.finish is None else scheme.finish(model, ctx.dtype)


def streamable_scheme(name: str) -> tuple[Callable[[nn.Module, Callable | None], nn.Module],
                                          Callable[[nn.Module, torch.dtype], nn.Module], bool]:
    """``(solve(module, calib), finish(module, dtype), needs_calibration)`` of a scheme that can quantize a model
    one decoder block at a time; ValueError naming the ones that can for any other."""
    scheme, match = _find(name)
    if scheme.finish is None:
        ok = [s.pattern for s in _SCHEMES if s.finish is not None]
        raise ValueError(f"scheme {name!r} cannot be applied one block at a time yet; these can: {', '.join(ok)}")

    def solve(module: nn.Module, calib: Callable[[], list] | None) -> nn.Module:
        return scheme.fn(module, match, SchemeContext(False, calib, progress=False))
    return solve, scheme.finish, scheme.pattern not in RTN_SCHEMES and not scheme.pattern.startswith("gguf-")


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


def _finish(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    freeze(model)
    return cast_model(model, dtype)


@register_scheme("fp32", "float32, unquantized")
def _fp32(model, match, ctx):
    return model.float()


@register_scheme("bf16", "bfloat16, unquantized (the baseline)")
def _bf16(model, match, ctx):
    return cast_model(model, torch.bfloat16)


def quantize_kwargs(name: str) -> dict:
    """The ``quantize(...)`` arguments of a calibration-free scheme (``int8wo``, ``int4wo-64``, ...).

    Raises ValueError naming the scheme when it needs calibration data (GPTQ, SmoothQuant, static
    activations) or does not exist.
    """
    scheme, match = _find(name)
    if scheme.pattern not in RTN_SCHEMES:
        raise ValueError(f"scheme {name!r} needs calibration data and cannot be applied module by module; "
                         f"calibration-free schemes: {', '.join(RTN_SCHEMES)}")
    return RTN_SCHEMES[scheme.pattern][1](match)


# Calibration-free schemes (:mod:`qcal.rtn`): each is one ``quantize`` call.
def _rtn(kwargs: Callable[[re.Match], dict]):
    def apply(model, match, ctx):
        return quantize(model, exclude=ctx.exclude, **kwargs(match))
    return apply


for _pattern, (_description, _kwargs) in RTN_SCHEMES.items():
    register_scheme(_pattern, _description, finish=_finish)(_rtn(_kwargs))


@register_scheme("w8a8-static", "int8 static per-tensor activations (calibrated) x int8 per-channel weights")
def _w8a8_static(model, match, ctx):
    quantize(model, weights=qint8, activations=qint8, exclude=ctx.exclude)
    calibrate(model, ctx.calibration_inputs(match.string))
    return _finish(model, ctx.dtype)


# ---------------------------------------------------------------- GGUF (llama.cpp) block formats

_GGUF = {"q4_0": ("Q4_0", "int4 symmetric"), "q4_1": ("Q4_1", "int4 with integer zero-points"),
         "q8_0": ("Q8_0", "int8 symmetric")}


def _finish_gguf(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Freeze and cast, keeping the float32 scales (GGUF's float16 values: a bf16 cast would round them)."""
    freeze(model)
    kept = {n: (m.weight_scale, m.weight_zero_point) for n, m in quantized_modules(model)}
    cast_model(model, dtype)
    for n, m in quantized_modules(model):
        m._buffers["weight_scale"], m._buffers["weight_zero_point"] = kept[n]
        m.select_kernel()
    return model


def _gguf_rtn(kind: str):
    def apply(model, match, ctx):
        from .integrations.gguf import block_qparams

        quantize(model, weights=qint8 if kind == "Q8_0" else qint4, group_size=32, symmetric=kind != "Q4_1",
                 zero_point="int" if kind == "Q4_1" else "float", exclude=ctx.exclude)
        for _, m in quantized_modules(model):  # llama-quantize's grids (Q4_0: d = m / -8)
            w = m.weight_2d().detach()
            s, zp = block_qparams(w.reshape(-1, 32), kind)
            m.fix_weight_qparams(s.reshape(w.shape[0], -1), None if zp is None else zp.reshape(w.shape[0], -1))
        return model
    return apply


def _gguf_gptq(kind: str):
    def apply(model, match, ctx):
        # shrink 0.5: half GPTQ, half importance-matrix rounding (llama-perplexity on SmolLM2: BENCHMARKS.md)
        return GPTQQuantizer(gguf_type=kind, act_order=True, static_groups=True, shrink=0.5, exclude=ctx.exclude,
                             progress=ctx.progress).quantize(model, ctx.calibration_inputs(match.string))
    return apply


for _name, (_kind, _what) in _GGUF.items():
    register_scheme(f"gguf-{_name}", f"llama.cpp's {_kind}: {_what}, groups of 32, float16 scales, weight-only "
                    "(exports to GGUF bit for bit)", finish=_finish_gguf)(_gguf_rtn(_kind))
    register_scheme(f"gptq-gguf-{_name}", f"GPTQ (act_order, static groups, Hessian half-shrunk to its diagonal) "
                    f"to llama.cpp's {_kind}: {_what}, groups of 32, float16 scales searched against the input energy "
                    "(calibrated; exports to GGUF bit for bit)", finish=_finish_gguf)(
        _gguf_gptq(_kind))


# ---------------------------------------------------------------- the algorithms' schemes


def _gptq_scheme(bits: int, per_channel: bool, act_order: bool, zero_point: str = "float"):
    def apply(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
        group = None if per_channel else int(match.group("g"))
        return GPTQQuantizer(bits=bits, groupsize=group, act_order=act_order, static_groups=act_order,
                             zero_point=zero_point, exclude=ctx.exclude, progress=ctx.progress).quantize(
            model, ctx.calibration_inputs(match.string))
    return apply


for _bits in (2, 3, 4, 8):
    register_scheme(f"gptq-int{_bits}-<g>", f"GPTQ int{_bits} weight-only, asymmetric groups of <g> "
                    "(calibrated)", finish=_finish)(_gptq_scheme(_bits, False, False))
    register_scheme(f"gptq-int{_bits}-<g>-actorder", f"GPTQ int{_bits} weight-only, groups of <g>, act_order "
                    "with static groups (calibrated)", finish=_finish)(_gptq_scheme(_bits, False, True))
    register_scheme(f"gptq-int{_bits}-pc", f"GPTQ int{_bits} weight-only, asymmetric, per output channel "
                    "(calibrated)", finish=_finish)(_gptq_scheme(_bits, True, False))
    for _suffix, _pc, _ao in (("<g>", False, False), ("<g>-actorder", False, True), ("pc", True, False)):
        register_scheme(f"gptq-int{_bits}-{_suffix}-intzp", f"gptq-int{_bits}-{_suffix} with integer zero-points "
                        "(exports to compressed-tensors / vLLM)", finish=_finish)(_gptq_scheme(_bits, _pc, _ao, "int"))


@register_scheme("8da4w-gptq-<g>", "8da4w with GPTQ weights: int8 dynamic per-token activations x int4 "
                 "symmetric groups of <g>, act_order with static groups (calibrated)", finish=_finish)
def _8da4w_gptq(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
    """What ``Int8DynActInt4WeightGPTQQuantizer`` does, with the freeze and cast left to ``finish``."""
    group = int(match.group("g"))
    swap_8da4w(model, group, exclude=ctx.exclude)
    quantizer = GPTQQuantizer(bits=4, groupsize=group, symmetric=True, act_order=True, static_groups=True,
                              exclude=ctx.exclude, progress=ctx.progress)
    return quantizer.quantize(model, ctx.calibration_inputs(match.string))


def _smoothquant_scheme(dynamic: bool):
    def apply(model: nn.Module, match, ctx: SchemeContext) -> nn.Module:
        smoothquant_w8a8(model, ctx.calibration_inputs(match.string), dynamic=dynamic, exclude=ctx.exclude)
        return cast_model(freeze(model), ctx.dtype)
    return apply


register_scheme("smoothquant-w8a8", "SmoothQuant (alpha 0.5) + int8 dynamic per-token activations x int8 "
                "per-channel weights (calibrated)")(_smoothquant_scheme(True))
register_scheme("smoothquant-w8a8-static", "SmoothQuant (alpha 0.5) + int8 static per-tensor activations x int8 "
                "per-channel weights (calibrated)")(_smoothquant_scheme(False))
